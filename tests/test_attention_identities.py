"""The attention variants against independent float64 references: geoopt distances, SDPA, identities."""
import geoopt
import pytest
import torch
import torch.nn.functional as F

import hyptorch_flash as hf
from hyptorch_flash import geometry
from hyptorch_flash.ops.scores import get_variant

from attention_cases import HYPERBOLIC_OUTPUTS, SCORES, random_points

BACKENDS = ("reference", "blockwise")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("squared", [False, True])
def test_distance_score_is_minus_beta_geoopt_lorentz_dist(k, squared):
    g = _gen(1)
    q, kk = random_points((1, 1, 6, 5), "distance", generator=g), random_points((1, 1, 8, 5), "distance", generator=g)
    kt, beta = torch.tensor(k, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    s = get_variant("distance").score(q, kk, kt, beta, squared=squared, acosh_eps=1e-12)
    d = geoopt.Lorentz(k=kt).dist(geometry.lift(q, kt)[..., :, None, :], geometry.lift(kk, kt)[..., None, :, :])
    torch.testing.assert_close(s, -beta * (d * d if squared else d), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_poincare_score_is_minus_beta_geoopt_poincare_dist(c):
    g = _gen(2)
    k = 1.0 / c
    q, kk = random_points((1, 1, 6, 4), "poincare_distance", generator=g, curvature=k), random_points((1, 1, 7, 4), "poincare_distance", generator=g, curvature=k)
    beta = torch.tensor(1.3, dtype=torch.float64)
    s = get_variant("poincare_distance").score(q, kk, torch.tensor(k, dtype=torch.float64), beta, squared=False, acosh_eps=1e-12)
    d = geoopt.PoincareBall(c=torch.tensor(c, dtype=torch.float64)).dist(q[..., :, None, :], kk[..., None, :, :])
    torch.testing.assert_close(s, -beta * d, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_lorentz_dot_equals_sdpa_on_lorentz_heads_with_negated_time(backend, causal):
    g = _gen(3)
    B, H, N, D, k, tau = 2, 3, 11, 6, 1.4, 1.7
    q, kk, v = (random_points((B, H, N, D), "lorentz_dot", generator=g) for _ in range(3))
    kt = torch.tensor(k, dtype=torch.float64)
    ql, kl, vl = (geometry.lift(x, kt) for x in (q, kk, v))
    ql_neg = torch.cat([-ql[..., :1], ql[..., 1:]], dim=-1)  # <q,k>_L = (-q0, qs)·(k0, ks)
    o = F.scaled_dot_product_attention(ql_neg, kl, vl, is_causal=causal, scale=2.0 / tau)
    expected = geometry.centroid_epilogue(o, kt, "lorentz")
    out = hf.hyperbolic_attention(q, kk, v, curvature=k, tau=tau, causal=causal, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_score_equals_sdpa(backend):
    g = _gen(4)
    q, k, v = (torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 13, 13, generator=g) > 0.3
    mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = hf.hyperbolic_attention(q, k, v, score="euclidean", attn_mask=mask, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["lorentz_dot", "distance", "poincare_distance"])
def test_three_outputs_are_one_point(backend, score):
    g = _gen(5)
    k = torch.tensor([0.6, 1.8], dtype=torch.float64)
    q, kk, v = (random_points((1, 2, 9, 4), score, generator=g, curvature=k) for _ in range(3))
    outs = {o: hf.hyperbolic_attention(q, kk, v, score=score, output=o, curvature=k, backend=backend) for o in HYPERBOLIC_OUTPUTS}
    kh = geometry.heads_view(k)
    y = geometry.lift(outs["lorentz"], kh)
    torch.testing.assert_close(geometry.lorentz_to_klein(y, kh), outs["klein"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(geometry.lorentz_to_poincare(y, kh), outs["poincare"], rtol=1e-10, atol=1e-10)
    # on the manifold: Lorentz point exact by construction; balls strictly inside
    assert (geometry.sq_norm(outs["klein"]) < kh).all() and (geometry.sq_norm(outs["poincare"]) < kh).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", SCORES)
def test_one_visible_key_returns_that_value(backend, score):
    g = _gen(6)
    q, k, v = (random_points((1, 2, 5, 3), score, generator=g) for _ in range(3))
    visible = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    visible[..., 2] = True
    out = hf.hyperbolic_attention(q, k, v, score=score, attn_mask=visible, backend=backend)
    torch.testing.assert_close(out, v[:, :, 2:3].expand_as(out), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_lorentz_inputs_and_output(backend):
    g = _gen(7)
    kt = torch.tensor(0.9, dtype=torch.float64)
    q, k, v = (random_points((1, 2, 6, 4), "distance", generator=g) for _ in range(3))
    space = hf.hyperbolic_attention(q, k, v, score="distance", curvature=0.9, backend=backend)
    full = hf.hyperbolic_attention(*(geometry.lift(x, kt) for x in (q, k, v)), score="distance", curvature=0.9,
                                   full_lorentz=True, backend=backend)
    torch.testing.assert_close(full, geometry.lift(space, kt))
    torch.testing.assert_close(geometry.minkowski_inner(full, full), -kt.expand(1, 2, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_equals_repeated_heads(backend):
    g = _gen(8)
    q = random_points((2, 6, 7, 4), "distance", generator=g)
    k, v = random_points((2, 2, 9, 4), "distance", generator=g), random_points((2, 2, 9, 4), "distance", generator=g)
    curv = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    out = hf.hyperbolic_attention(q, k, v, score="distance", curvature=curv, backend=backend)
    rep = hf.hyperbolic_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), score="distance", curvature=curv, backend="reference")
    torch.testing.assert_close(out, rep)


def test_lse_matches_logsumexp_of_scores():
    g = _gen(9)
    q, k, v = (random_points((1, 2, 10, 5), "lorentz_dot", generator=g) for _ in range(3))
    _, lse = hf.hyperbolic_attention(q, k, v, causal=True, return_lse=True, backend="blockwise")
    s = get_variant("lorentz_dot").score(q, k, torch.tensor(1.0, dtype=torch.float64), torch.tensor(2 / 5 ** 0.5, dtype=torch.float64), squared=False, acosh_eps=0)
    s = s.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
