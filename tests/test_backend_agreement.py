"""blockwise vs reference in float32 and bfloat16, both measured against a float64 truth.

For outputs and every gradient (q, k, v, curvature, coefficient) with random upstream gradients:
err(blockwise) ≤ 2·err(reference, same dtype) + floor (STYLE.md §3).
"""
import pytest
import torch

import hyptorch_flash as hf

from attention_cases import SCORES, assert_close_to_truth, coefficient_kw, outputs_for, random_points

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
SHAPES = [(1, 16), (17, 64), (128, 5), (257, 16)]  # (N = M, D): odd lengths and an odd head dim


def _run(dtype, score, output, backend, tensors, curv, coef, causal, pad):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    curv_l = curv.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    coef_l = coef.detach().to(curv_l.dtype).requires_grad_()
    out = hf.hyperbolic_attention(*leaves, score=score, output=output, curvature=curv_l, causal=causal,
                                  key_padding_mask=pad, backend=backend, **coefficient_kw(score, coef_l))
    return out, leaves + [curv_l, coef_l]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("n,d", SHAPES)
def test_blockwise_matches_reference_relative_to_float64(dtype, score, n, d):
    g = torch.Generator().manual_seed(n * 1000 + d)
    output = outputs_for(score)[(n + d) % len(outputs_for(score))]  # every output model across the grid
    curv = torch.tensor(1.3, dtype=torch.float64)
    coef = torch.tensor(0.8, dtype=torch.float64) if score in ("distance", "poincare_distance") else torch.tensor(d ** 0.5, dtype=torch.float64)
    # inputs are rounded to the test dtype first so the float64 truth sees exactly the same numbers
    tensors = [random_points((1, 1, n, d), score, generator=g, curvature=1.3).to(dtype).double() for _ in range(3)]
    pad = torch.zeros(1, n, dtype=torch.bool)
    if n > 2:
        pad[0, -(n // 5 + 1):] = True
    causal = n % 2 == 1
    truth, truth_leaves = _run(torch.float64, score, output, "reference", tensors, curv, coef, causal, pad)
    upstream = torch.randn(truth.shape, generator=g, dtype=torch.float64)
    truth_grads = torch.autograd.grad(truth, truth_leaves, upstream, allow_unused=True, materialize_grads=True)
    results = {}
    for backend in ("reference", "blockwise"):
        out, leaves = _run(dtype, score, output, backend, tensors, curv, coef, causal, pad)
        grads = torch.autograd.grad(out, leaves, upstream.to(dtype), allow_unused=True, materialize_grads=True)
        results[backend] = (out, grads)
    names = ("dq", "dk", "dv", "dcurvature", "dcoef")
    assert_close_to_truth("output", results["blockwise"][0], results["reference"][0], truth, floor_rel=FLOOR[dtype])
    for name, g_blk, g_ref, g_true in zip(names, results["blockwise"][1], results["reference"][1], truth_grads):
        assert_close_to_truth(name, g_blk, g_ref, g_true, floor_rel=FLOOR[dtype])
