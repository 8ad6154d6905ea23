"""The ``cuda`` backend: the fused FlashAttention-2-style forward kernel (``hyptorch_flash/csrc``).

Three layers (STYLE.md §1): the extension's ``fwd`` (built by :mod:`.cuda_build`) → the custom op
``hyptorch_flash::attention_fwd`` (``torch.library.custom_op`` + ``register_fake``, so
``torch.compile(fullgraph=True)`` traces it) → :func:`run`, the backend entry point.

The op computes, per query row i of head h (DESIGN.md §2-§3):
P_ij = softmax_j(s(q_i, k_j)) over the visible keys, O_i = Σ_j P_ij·lift(v_j), and returns

- ``out`` ``(B, H, N, Dv)`` in the input dtype: the centroid's space part in the chosen model
  (or O_s itself for the euclidean output);
- ``lse`` ``(B, H, N)`` float32: log Σ_j exp(s_ij), −inf for a row that sees no key;
- ``o0`` ``(B, H, N)`` float32: Σ_j P_ij v0_j, the time coordinate of the normalised Lorentz
  average (0 for masked rows and for the euclidean score);
- ``out_refine``: with ``refine_output=True`` and bf16/fp16 inputs, ``(B, H, N, Dv)`` int8 codes that
  refine ``out`` to 15/18 significant bits (:mod:`.output_refinement`), and P enters P·V as hi + lo so
  that the output is that accurate: the fused backward evaluates the epilogue's Jacobian there, and
  ``out_dtype=torch.float32`` returns it. Otherwise an empty tensor (float32 inputs have a float32 output).

Head dims up to 128 run natively at 64 or 128 (smaller ones are zero-padded, which changes no norm,
dot product or distance). bf16/fp16 run as they are; float32 inputs are split into three bf16 parts
(x = hi + mid + lo) and every tensor-core product takes the six part products that matter, which
keeps float32 accuracy (the role of the 3×tf32 split in DESIGN.md §3) at six times the tensor-core
work. The fused backward (:mod:`.cuda_backward`) runs every one of these dtypes, float32 with the same split.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from .. import geometry, numerics
from . import cuda_build
from .output_refinement import REFINE_SHIFT, refined_output
from .problem import AttentionProblem

SCORE_IDS = {"euclidean": 0, "lorentz_dot": 1, "distance": 2, "poincare_distance": 3}
OUTPUT_IDS = {"euclidean": 0, "lorentz": 1, "klein": 2, "poincare": 3}
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKWARD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NATIVE_HEAD_DIMS = (64, 128)

# Flipped to True by hyptorch_flash/ops/cuda_autograd.py once it registers the backward kernel.
BACKWARD_REGISTERED = False


def _padded_head_dim(*dims: int) -> int:
    return next(d for d in NATIVE_HEAD_DIMS if d >= max(dims))


def _pad_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def _fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, curvature: torch.Tensor, coef: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], score: int, output: int, causal: bool, squared: bool,
    acosh_eps: float, refine_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dv = v.shape[-1]
    dim = _padded_head_dim(q.shape[-1], dv)
    q, k, v = (_pad_to(x, dim) for x in (q, k, v))  # strided views are read in place (binding.cpp)
    out, lse, o0, out_refine = cuda_build.load().fwd(
        q, k, v, curvature.contiguous(), coef.contiguous(), key_padding_mask, score, output, causal, squared,
        float(acosh_eps), refine_output,
    )
    if dv != dim:
        out = out[..., :dv].contiguous()
        out_refine = out_refine[..., :dv].contiguous() if out_refine.numel() else out_refine
    return out, lse, o0, out_refine


@torch.library.custom_op("hyptorch_flash::attention_fwd", mutates_args=(), device_types="cuda")
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, curvature: torch.Tensor, coef: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], score: int, output: int, causal: bool, squared: bool,
    acosh_eps: float, refine_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward. q ``(B,H,N,D)``, k ``(B,Hkv,M,D)``, v ``(B,Hkv,M,Dv)`` space coordinates (bf16/fp16/fp32),
    curvature and coef float32 ``(H,)``, key_padding_mask bool ``(B,M)`` (True = padded) or None;
    score/output ids as ``SCORE_IDS``/``OUTPUT_IDS``; ``refine_output``: also return the refinement codes
    (what the fused backward of bf16/fp16 inputs needs).
    Returns ``(out, lse, o0, out_refine)`` (module docstring)."""
    return _fwd(q, k, v, curvature, coef, key_padding_mask, score, output, causal, squared, acosh_eps, refine_output)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, curvature, coef, key_padding_mask, score, output, causal, squared, acosh_eps,
                        refine_output=False):
    B, H, N, _ = q.shape
    out = q.new_empty((B, H, N, v.shape[-1]))
    stats = q.new_empty((B, H, N), dtype=torch.float32)
    refine_shape = out.shape if refine_output and q.dtype != torch.float32 else (0,)
    return out, stats, torch.empty_like(stats), q.new_empty(refine_shape, dtype=torch.int8)


def _per_head(x: torch.Tensor, heads: int, device) -> torch.Tensor:
    # differentiable (a learnable curvature or β reaches the backward through the op's inputs)
    return x.to(device=device, dtype=torch.float32).expand(heads).contiguous()


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _needs_grad(problem: AttentionProblem) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in (problem.q, problem.k, problem.v, problem.curvature, problem.coef))


def unsupported(problem: AttentionProblem) -> Optional[str]:
    """``None`` when the fused kernel can run ``problem``, else why not (``auto`` logs it and falls back)."""
    q = problem.q
    if not q.is_cuda:
        return "inputs are not on a CUDA device"
    if q.dtype == torch.float64:
        return "float64 inputs (the fused kernels compute in float32; use the reference or blockwise backend)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"{q.dtype} inputs (the fused kernel runs bfloat16, float16 and float32)"
    if problem.mask.attn_mask is not None:
        return "a dense attn_mask (the fused kernel takes causal and key_padding_mask only)"
    head_dims = (q.shape[-1], problem.v.shape[-1])
    if max(head_dims) > max(NATIVE_HEAD_DIMS):
        return f"head dims {head_dims} (the fused kernel supports up to {max(NATIVE_HEAD_DIMS)})"
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) < (8, 0):
        return "a GPU older than sm_80 (mma.sync bf16 needs Ampere or newer)"
    if _needs_grad(problem) and q.dtype not in BACKWARD_DTYPES:
        return f"{q.dtype} inputs that require grad (the fused backward runs {', '.join(map(str, BACKWARD_DTYPES))})"
    if _needs_grad(problem) and not BACKWARD_REGISTERED:
        return "inputs require grad and the CUDA backward kernel is not registered"
    if _needs_grad(problem) and problem.return_lse:
        return ("return_lse=True with inputs that require grad (the fused backward differentiates the "
                "output only; blockwise and reference also propagate gradients through the LSE)")
    return cuda_build.build_error()


def run(problem: AttentionProblem):
    """Backend entry point: ``(output, lse)`` like the other backends; lse is float32 ``(B, H, N)``."""
    q = problem.q
    heads = problem.num_heads
    curvature = _per_head(problem.curvature, heads, q.device)
    # The custom op is what torch.compile traces and what carries the autograd formula; an eager call
    # that needs no gradient skips its Python dispatch overhead (which shows at short N).
    needs_grad = _needs_grad(problem)
    traced = torch.compiler.is_compiling() or needs_grad
    op = torch.ops.hyptorch_flash.attention_fwd if traced else _fwd
    # a wider out_dtype than bf16/fp16 inputs: return the output refined to 15/18 bits instead of rounded
    refined = problem.out_dtype != q.dtype and q.dtype in REFINE_SHIFT
    out, lse, _, out_refine = op(
        q, problem.k, problem.v, curvature, _per_head(problem.coef, heads, q.device),
        problem.mask.key_padding_mask, SCORE_IDS[problem.variant.name], OUTPUT_IDS[problem.output],
        problem.mask.causal, problem.squared, problem.acosh_margin(), needs_grad or refined,
    )
    if refined:
        out = refined_output(out, out_refine)
    if problem.full_output:
        out = geometry.lift(out.to(numerics.compute_dtype(out.dtype)), geometry.heads_view(curvature))
    return out.to(problem.out_dtype), lse


# The backward helper's module registers autograd for the op and flips BACKWARD_REGISTERED.
if importlib.util.find_spec(f"{__package__}.cuda_autograd") is not None:
    importlib.import_module(f"{__package__}.cuda_autograd")
