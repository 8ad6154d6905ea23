"""Large (|x_s| up to 30) and tiny (1e-6) norms: no NaN/Inf in outputs or gradients, any variant."""
import pytest
import torch

import hyptorch_flash as hf

from attention_cases import SCORES, coefficient_kw, outputs_for


def _points(shape, score, norm, g, dtype):
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    if score == "poincare_distance":
        # near the boundary of the smallest ball (radius sqrt(0.5): the image of far points) or its centre;
        # 0.99 keeps bf16-rounded points inside
        radius = 0.99 * 0.5 ** 0.5 if norm > 1 else norm
    else:
        radius = norm * (0.5 + torch.rand(shape[:-1] + (1,), generator=g, dtype=torch.float64))
    return (x * radius).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [30.0, 1e-6])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_no_nan_at_extreme_norms(dtype, norm, score, backend):
    g = torch.Generator().manual_seed(3)
    tensors = [_points((1, 2, 19, 8), score, norm, g, dtype).requires_grad_() for _ in range(3)]
    curv = torch.tensor([0.5, 2.0], requires_grad=True)
    coef = torch.tensor(1.5, requires_grad=True)
    for output in outputs_for(score):
        out = hf.hyperbolic_attention(*tensors, score=score, output=output, curvature=curv, causal=True,
                                      backend=backend, **coefficient_kw(score, coef))
        grads = torch.autograd.grad(out, tensors + [curv, coef], torch.randn_like(out), allow_unused=True,
                                    materialize_grads=True)
        assert torch.isfinite(out).all(), f"{output}: non-finite output"
        for name, grad in zip(("dq", "dk", "dv", "dcurvature", "dcoef"), grads):
            assert torch.isfinite(grad).all(), f"{output}: non-finite {name}"
