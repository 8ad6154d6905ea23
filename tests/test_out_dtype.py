"""``hyperbolic_attention(..., out_dtype=...)``: a wider output dtype than the inputs' keeps what the math
computed instead of rounding it (PyTorch backends on the CPU; the ``cuda`` backend, which returns its
output refined to 15/18 bits, on a GPU)."""
from __future__ import annotations

import pytest
import torch

import hyptorch_flash as hf

from attention_cases import random_points

CASES = (("lorentz_dot", "lorentz"), ("distance", "klein"), ("poincare_distance", "poincare"),
         ("euclidean", "euclidean"))


def make_inputs(score, *, device="cpu", N=40, M=33, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    curvature = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float64)
    pts = dict(score=score, generator=gen, norm_scale=0.6, curvature=curvature)
    q, k, v = (random_points((2, 3, n, D), **pts).to(device) for n in (N, M, M))
    pad = (torch.rand(2, M, generator=gen) < 0.2).to(device)
    return q, k, v, dict(score=score, curvature=curvature.to(device), key_padding_mask=pad, causal=True)


def rel_err(x, truth):
    return (x.double() - truth).abs().max().item() / truth.abs().max().item()


@pytest.mark.parametrize("backend", ("reference", "blockwise"))
@pytest.mark.parametrize("score,output", CASES)
def test_pytorch_backends_return_their_float32_result(score, output, backend):
    """bf16 inputs, out_dtype=float32: the float32 result of the same (rounded) inputs, far closer to float64
    math than the bf16 output; gradients flow to the bf16 inputs."""
    q, k, v, kw = make_inputs(score)
    args = [x.bfloat16() for x in (q, k, v)]
    truth = hf.hyperbolic_attention(*(x.double() for x in args), output=output, backend="reference", **kw)
    rounded = hf.hyperbolic_attention(*args, output=output, backend=backend, **kw)
    wide = hf.hyperbolic_attention(*[x.requires_grad_() for x in args], output=output, backend=backend,
                                   out_dtype=torch.float32, **kw)
    assert rounded.dtype == torch.bfloat16 and wide.dtype == torch.float32
    assert rel_err(wide, truth) <= 1e-5 and rel_err(wide, truth) <= rel_err(rounded, truth) / 50
    wide.square().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in args)


def test_out_dtype_full_lorentz_and_narrower():
    """full_lorentz output in float64 from float32 inputs; a narrower out_dtype rounds."""
    q, k, v, kw = make_inputs("distance")
    kw["curvature"] = 1.0
    lift = lambda x: torch.cat([(1.0 + x.square().sum(-1, keepdim=True)).sqrt(), x], -1)  # noqa: E731
    args = [lift(x).float() for x in (q, k, v)]
    out = hf.hyperbolic_attention(*args, full_lorentz=True, backend="blockwise", out_dtype=torch.float64, **kw)
    assert out.dtype == torch.float64 and out.shape[-1] == q.shape[-1] + 1
    half = hf.hyperbolic_attention(*args, full_lorentz=True, backend="blockwise", out_dtype=torch.bfloat16, **kw)
    assert half.dtype == torch.bfloat16 and torch.equal(half, out.bfloat16())


@pytest.mark.parametrize("bad", (torch.int32, "float32", torch.complex64))
def test_out_dtype_is_validated(bad):
    q, k, v, kw = make_inputs("lorentz_dot")
    with pytest.raises(TypeError, match="out_dtype"):
        hf.hyperbolic_attention(q, k, v, backend="reference", out_dtype=bad, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("score,output", CASES)
def test_cuda_returns_its_refined_output(score, output, dtype):
    """cuda, bf16/fp16 inputs, out_dtype=float32: within 2^-15 (bf16) / 2^-17 (fp16) of the float64 result of
    the same inputs, and of the reference backend's float32 result; autograd through it matches the
    reference backend's gradients (bf16-output autograd) within the usual 2× + floor."""
    q, k, v, kw = make_inputs(score, device="cuda", N=300, M=257, D=64)
    args = [x.to(dtype) for x in (q, k, v)]
    truth = hf.hyperbolic_attention(*(x.double() for x in args), output=output, backend="reference", **kw)
    got = hf.hyperbolic_attention(*args, output=output, backend="cuda", out_dtype=torch.float32, **kw)
    assert got.dtype == torch.float32
    bar = 2.0**-15 if dtype == torch.bfloat16 else 2.0**-17
    assert rel_err(got, truth) <= bar, rel_err(got, truth)
    leaves = [x.clone().requires_grad_() for x in args]
    out = hf.hyperbolic_attention(*leaves, output=output, backend="cuda", out_dtype=torch.float32, **kw)
    assert out.dtype == torch.float32 and rel_err(out.detach(), truth) <= bar
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to("cuda")
    grads = torch.autograd.grad(out, leaves, dout)
    leaves64 = [x.double().requires_grad_() for x in args]
    truth_grads = torch.autograd.grad(hf.hyperbolic_attention(*leaves64, output=output, backend="reference", **kw),
                                      leaves64, dout.double())
    leaves_ref = [x.clone().requires_grad_() for x in args]
    ref_grads = torch.autograd.grad(hf.hyperbolic_attention(*leaves_ref, output=output, backend="reference", **kw),
                                    leaves_ref, dout.to(dtype))
    for name, g, r, t in zip("qkv", grads, ref_grads, truth_grads):
        scale = max(t.abs().max().item(), 1.0)
        e_g, e_r = ((x.double() - t).abs().max().item() for x in (g, r))
        assert e_g <= 2 * e_r + 2.0**-8 * scale, f"d{name}: {e_g:.3e} vs reference {e_r:.3e}"
