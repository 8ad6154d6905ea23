"""Float64 gradcheck of the blockwise backend (custom backward) for every score × output.

Small tiles (3 × 4) make every path of the tiled forward/backward run: several query and key tiles,
causal tile skipping, padding inside a tile, GQA, per-head learnable curvature and coefficient.
"""
import pytest
import torch

from hyptorch_flash.ops import blockwise
from hyptorch_flash.ops.problem import build_problem

from attention_cases import SCORES, coefficient_kw, outputs_for, random_points

CASES = [(s, o) for s in SCORES for o in outputs_for(s)]


def _problem(q, k, v, curv, coef, score, output, *, causal, key_padding_mask, squared=False):
    return build_problem(
        q, k, v, score=score, output=output, curvature=curv, scale=None, squared=squared, causal=causal,
        attn_mask=None, key_padding_mask=key_padding_mask, full_lorentz=False, check_inputs=True,
        acosh_eps=None, **{"tau": None, "beta": None, **coefficient_kw(score, coef)},
    )


@pytest.mark.parametrize("score,output", CASES)
def test_gradcheck_blockwise(score, output):
    g = torch.Generator().manual_seed(hash((score, output)) % 2**31)
    B, H, Hkv, N, M, D = 2, 2, 1, 7, 9, 3
    curv = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    q = random_points((B, H, N, D), score, generator=g, curvature=curv.detach()).requires_grad_()
    k = random_points((B, Hkv, M, D), score, generator=g, curvature=curv.detach()).requires_grad_()
    v = random_points((B, Hkv, M, D), score, generator=g, curvature=curv.detach()).requires_grad_()
    coef = torch.tensor([0.9, 1.6], dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(B, M, dtype=torch.bool)
    pad[0, -3:] = True

    def f(q, k, v, curv, coef):
        problem = _problem(q, k, v, curv, coef, score, output, causal=True, key_padding_mask=pad)
        return blockwise.blockwise_attention(problem, block_q=3, block_k=4)

    assert torch.autograd.gradcheck(f, (q, k, v, curv, coef), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_squared_distance_non_causal_scalar_parameters():
    g = torch.Generator().manual_seed(11)
    q, k, v = (random_points((1, 1, 5, 4), "distance", generator=g).requires_grad_() for _ in range(3))
    curv = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, curv, beta):
        problem = _problem(q, k, v, curv, beta, "distance", "lorentz", causal=False, key_padding_mask=None, squared=True)
        return blockwise.blockwise_attention(problem, block_q=2, block_k=2)

    assert torch.autograd.gradcheck(f, (q, k, v, curv, beta), eps=1e-6, atol=1e-6, rtol=1e-4)
