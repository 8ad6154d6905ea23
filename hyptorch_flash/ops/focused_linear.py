"""The math of Hypformer's focused linear attention: feature map, chunked causal scan, epilogue.

Hypformer (Yang, Ying, et al. 2024, "Hypformer: Exploring Efficient Transformer Fully in Hyperbolic
Space", KDD) attends with a kernel instead of a softmax, on the *space* coordinates of Lorentz points:

    φ(x) = f_p(ReLU(x) + ε),   f_p(u) = (|u| / |u^p|)·u^p   (elementwise power; ε = 1e-6)
    O_i = Σ_j (φ(q_i)·φ(k_j)) v_j / Σ_j φ(q_i)·φ(k_j) = φ(q_i)ᵀ(Σ_j φ(k_j) v_jᵀ) / φ(q_i)ᵀ(Σ_j φ(k_j))

so the whole layer costs O(N·D²) instead of O(N²·D). f_p keeps the norm of u and sharpens its
direction (Flatten Transformer's "focused" map, Han et al. 2023); p is Hypformer's ``power_k``.

This module holds the pieces that do not depend on an attention call's description, so both the
score functor (``scores.py``, for the quadratic reference) and the O(N) backend
(``linear_attention.py``) use them:

- :func:`focus_features` — φ, computed without overflow for any p > 0;
- :func:`chunked_scan` and :class:`CausalLinearScan` — out_i = Σ_{j≤i} (a_i·b_j) c_j in chunks
  (intra-chunk quadratic, inter-chunk state), with a backward made of three more scans, so nothing
  of size O(N·D²) is ever stored;
- :func:`space_epilogue` — the output point: the space part as computed, the time recomputed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import geometry

# Hypformer's ε in ReLU(x) + ε: every feature is > 0, so φ(q)·φ(k) > 0 and the normaliser never
# vanishes for a visible key (in exact arithmetic; see space_average for the floating-point guard).
FEATURE_EPS = 1e-6
DEFAULT_POWER = 2.0  # Hypformer's default power_k
CHUNK = 128  # causal scan chunk: O(chunk²) intra-chunk work per chunk, one state update per chunk


def focus_features(x: torch.Tensor, power) -> torch.Tensor:
    """φ(x) = f_p(ReLU(x) + ε), f_p(u) = |u|·u^p/|u^p|, over the last dim.

    ``x`` ``(..., D)`` float32/float64; ``power`` p > 0, a float or a tensor broadcastable to
    ``x[..., :1]`` (e.g. per head ``(1, H, 1, 1)``; differentiable). f_p is invariant to scaling u
    inside the power, so it is evaluated on u/max(u) ∈ (0, 1]: u^p cannot overflow for any p and
    |(u/max u)^p| ≥ 1. max(u) is detached, which is exact: the function does not depend on it.
    """
    u = F.relu(x) + FEATURE_EPS
    r = (u / u.detach().amax(dim=-1, keepdim=True)) ** power
    return u.norm(dim=-1, keepdim=True) * r / r.norm(dim=-1, keepdim=True)


def chunked_scan(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, chunk: int = CHUNK,
                 reverse: bool = False, state: Optional[torch.Tensor] = None):
    """out_i = Σ_{j ≤ i} (a_i·b_j)·c_j (``reverse``: Σ_{j ≥ i}) plus a_i·``state``, chunk by chunk.

    ``a``, ``b`` ``(B, H, L, Da)``, ``c`` ``(B, H, L, Dc)``; ``state`` ``(B, H, Da, Dc)`` holds
    Σ b_jᵀc_j of earlier positions (``None`` = 0). Returns ``out (B, H, L, Dc)`` and the final state
    (the previous state plus Σ_j b_jᵀ c_j over all L positions). Per chunk of n ≤ ``chunk`` rows:
    W = tril(a_c b_cᵀ) (n×n), out_c = W c_c + a_c S, then S += b_cᵀ c_c. Time O(L·(chunk + Da)·Dc),
    memory O(L·Dc + chunk² + Da·Dc): the per-position states are never formed.
    Plain differentiable PyTorch (autograd keeps one state per chunk); :class:`CausalLinearScan`
    wraps it with a backward that keeps only the inputs.
    """
    L = a.shape[-2]
    out = a.new_empty(a.shape[:-1] + (c.shape[-1],))
    S = a.new_zeros(a.shape[:-2] + (a.shape[-1], c.shape[-1])) if state is None else state
    starts = range(0, L, chunk)
    for s in (reversed(starts) if reverse else starts):
        a_c, b_c, c_c = a[..., s:s + chunk, :], b[..., s:s + chunk, :], c[..., s:s + chunk, :]
        w = a_c @ b_c.transpose(-1, -2)
        w = torch.triu(w) if reverse else torch.tril(w)  # j ≥ i, or j ≤ i, inside the chunk
        out[..., s:s + chunk, :] = w @ c_c + a_c @ S
        S = S + b_c.transpose(-1, -2) @ c_c
    return out, S


class CausalLinearScan(torch.autograd.Function):
    """out_i = Σ_{j≤i} (a_i·b_j) c_j with a chunked backward; saves only a, b, c (O(L·D) memory).

    Gradients (g = dL/dout), each one more scan of the same kind:
    da_i = Σ_{j≤i} (g_i·c_j) b_j,   db_j = Σ_{i≥j} (c_j·g_i) a_i,   dc_j = Σ_{i≥j} (b_j·a_i) g_i.
    ``a``, ``b`` ``(B, H, L, Da)``, ``c`` ``(B, H, L, Dc)`` of one dtype (equal lengths L).
    """

    @staticmethod
    def forward(ctx, a, b, c, chunk: int):
        ctx.save_for_backward(a, b, c)
        ctx.chunk = chunk
        return chunked_scan(a, b, c, chunk=chunk)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        a, b, c = ctx.saved_tensors
        need_a, need_b, need_c = ctx.needs_input_grad[:3]
        g = g.contiguous()
        da = chunked_scan(g, c, b, chunk=ctx.chunk)[0] if need_a else None
        db = chunked_scan(c, g, a, chunk=ctx.chunk, reverse=True)[0] if need_b else None
        dc = chunked_scan(b, a, g, chunk=ctx.chunk, reverse=True)[0] if need_c else None
        return da, db, dc, None


def space_average(numerator_and_normaliser: torch.Tensor):
    """Split [Σ w v | Σ w] ``(..., Dv+1)`` into the weighted mean ``(..., Dv)`` and the normaliser ``(..., 1)``.

    Rows whose normaliser is 0 (every key masked, or φ(q)·φ(k) underflowing to 0 for all keys —
    then the numerator is 0 too, since |Σ w v| ≤ Σ w·max|v|) give 0 with zero gradient, never 0/0.
    """
    num, den = numerator_and_normaliser[..., :-1], numerator_and_normaliser[..., -1:]
    seen = den > 0
    return torch.where(seen, num / torch.where(seen, den, torch.ones_like(den)), torch.zeros_like(num)), den


def space_epilogue(y_space: torch.Tensor, k: torch.Tensor, output: str, full_output: bool) -> torch.Tensor:
    """Hypformer's output point: ``y_space`` is its space part, time x0 = sqrt(k + |y_s|²) recomputed.

    ``output``: ``"lorentz"`` (space part, or the full ``(..., D+1)`` point with ``full_output``),
    ``"klein"`` or ``"poincare"`` (the same point in the other charts, ``geometry``'s maps).
    ``k`` broadcasts against ``y_space[..., :1]``.
    """
    if output == "lorentz":
        return geometry.lift(y_space, k) if full_output else y_space
    point = geometry.lift(y_space, k)
    if output == "klein":
        return geometry.lorentz_to_klein(point, k)
    if output == "poincare":
        return geometry.lorentz_to_poincare(point, k)
    raise ValueError(f"hyptorch_flash: output must be one of {geometry.OUTPUT_MODELS}, got {output!r}")
