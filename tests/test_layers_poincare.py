"""Poincaré layers: ball membership, HNN++ formulas against geoopt, attention against a geoopt gyromidpoint."""
import copy
import math

import geoopt
import pytest
import torch
from geoopt.manifolds.stereographic import math as gmath

from hyptorch_flash import set_attention_backend
from hyptorch_flash.layers import (
    Curvature, KVCache, PoincareActivation, PoincareDropout, PoincareEmbedding, PoincareFeedForward,
    PoincareLayerNorm, PoincareLinear, PoincareMultiheadAttention, PoincareResidual, PoincareTransformerDecoder,
    PoincareTransformerEncoder, PoincareTransformerEncoderLayer, poincare_distance,
)
from hyptorch_flash.layers import ball
from hyptorch_flash.layers.testing import assert_in_ball
from hyptorch_flash.layers.testing import random_ball_points as ball_points

D = 6


def make(name, k):
    kw = dict(curvature=k)
    return {
        "linear": lambda: PoincareLinear(D, D + 3, **kw),
        "layernorm": lambda: PoincareLayerNorm(D, **kw),
        "activation": lambda: PoincareActivation(torch.tanh, **kw),
        "dropout": lambda: PoincareDropout(0.3, **kw),
        "feedforward": lambda: PoincareFeedForward(D, 2 * D, **kw),
    }[name]()


NAMES = ["linear", "layernorm", "activation", "dropout", "feedforward"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radius", [0.5, 1 - 1e-4])
def test_outputs_inside_ball(name, dtype, radius):
    torch.manual_seed(0)
    k = 0.4
    layer = make(name, k).to(dtype).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(20.0)  # large weights push outputs to the boundary
    assert_in_ball(layer(ball_points(3, 4, D, k=k, radius=radius, dtype=dtype)), k)


def test_residual_and_attention_inside_ball_near_boundary():
    k = 2.0
    x, y = ball_points(2, 5, D, k=k, radius=1 - 1e-4), ball_points(2, 5, D, k=k, radius=1 - 1e-4, seed=1)
    assert_in_ball(PoincareResidual(D, curvature=k)(x, y), k)
    out, _ = PoincareMultiheadAttention(D, 2, curvature=k)(x, is_causal=True)
    assert_in_ball(out, k)


class _FromTangent(torch.nn.Module):
    """Inputs given as tangent vectors at the origin, mapped into the layer's current ball."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *us):
        k = self.layer.curvature()
        out = self.layer(*(ball.expmap0(u, k) for u in us))
        return out[0] if isinstance(out, tuple) else out  # attention returns (output, weights)


def gradcheck_module(module, *tangents, fast=False):
    wrapped = _FromTangent(module).double()
    names, params = zip(*wrapped.named_parameters())

    def fn(*args):
        return torch.func.functional_call(wrapped, dict(zip(names, args[len(tangents):])), args[: len(tangents)])

    args = [u.double().requires_grad_() for u in tangents] + [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(fn, args, atol=1e-6, rtol=1e-4, fast_mode=fast)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dropout"])
def test_layers_gradcheck(name):
    torch.manual_seed(1)
    layer = make(name, 1.0)
    shared = Curvature(1.3, learnable=True)
    for m in layer.modules():
        if hasattr(m, "curvature"):
            m.curvature = shared
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.endswith(".r") or n == "r":
                p.normal_(0, 0.3)  # non-zero hyperplane offsets
    gradcheck_module(layer, torch.randn(2, 3, D))


def test_dropout_and_embedding_gradcheck():
    layer = PoincareDropout(0.5, curvature=0.8).train()
    k = torch.tensor(0.8, dtype=torch.float64)

    def fn(u):
        torch.manual_seed(4)  # the same dropout mask at every evaluation
        return layer(ball.expmap0(u, k))

    assert torch.autograd.gradcheck(fn, (torch.randn(4, D, dtype=torch.float64, requires_grad=True),))
    emb = PoincareEmbedding(5, D, curvature=Curvature(0.8, learnable=True), init_std=0.5).double()
    names, params = zip(*emb.named_parameters())
    call = lambda *ps: torch.func.functional_call(emb, dict(zip(names, ps)), (torch.tensor([0, 3, 3]),))  # noqa: E731
    assert torch.autograd.gradcheck(call, [p.detach().clone().requires_grad_() for p in params])


def test_residual_and_attention_gradcheck():
    torch.manual_seed(2)
    gradcheck_module(PoincareResidual(D, curvature=Curvature(0.8, learnable=True)), torch.randn(3, D), torch.randn(3, D))
    attn = PoincareMultiheadAttention(4, 2, per_head_curvature=True, learnable_scale=True,
                                      curvature=Curvature(0.8, learnable=True), attn_backend="blockwise")
    gradcheck_module(attn, 0.5 * torch.randn(1, 3, 4), fast=True)


# --- against independent formulas -------------------------------------------------------------

def hnnpp_linear(x, z, r, c):
    """HNN++ eq. 6–7 written directly (float64, moderate inputs: no overflow handling)."""
    sc = math.sqrt(c)
    zn = z.norm(dim=0)
    lam = 2 / (1 - c * (x ** 2).sum(-1, keepdim=True))
    v = 2 * zn / sc * torch.asinh(sc * lam * (x @ z) / zn * torch.cosh(2 * sc * r) - (lam - 1) * torch.sinh(2 * sc * r))
    w = torch.sinh(sc * v) / sc
    return w / (1 + (1 + c * (w ** 2).sum(-1, keepdim=True)).sqrt())


def test_poincare_linear_matches_hnnpp_formula():
    k = 0.7
    layer = PoincareLinear(D, 4, curvature=k).double()
    with torch.no_grad():
        layer.z.normal_(0, 0.5)
        layer.r.normal_(0, 0.3)
    x = ball_points(5, D, k=k, radius=0.8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), hnnpp_linear(x, layer.z, layer.r, 1 / k))


def test_poincare_linear_coordinates_are_distances_to_hyperplanes():
    """With r = 0, v_j = 2|z_j|·(signed distance from x to the hyperplane through 0 orthogonal to z_j)."""
    k = 1.5
    c = 1 / k
    layer = PoincareLinear(D, 3, curvature=k).double()
    with torch.no_grad():
        layer.z.normal_()
    x = ball_points(4, D, k=k, radius=0.9, dtype=torch.float64)
    y = layer(x)
    w = 2 * y / (1 - c * (y ** 2).sum(-1, keepdim=True))  # invert y = w/(1 + sqrt(1 + c|w|²))
    v = torch.asinh(math.sqrt(c) * w) / math.sqrt(c)
    for j in range(3):
        a = layer.z[:, j]
        d = gmath.dist2plane(x, torch.zeros(D, dtype=torch.float64), a, k=torch.tensor(-c, dtype=torch.float64),
                             signed=True)
        torch.testing.assert_close(v[:, j], 2 * a.norm() * d)


def test_poincare_linear_huge_outputs_stay_finite():
    layer = PoincareLinear(D, 3)
    with torch.no_grad():
        layer.z.fill_(50.0)
    y = layer(ball_points(4, D, radius=1 - 1e-4))
    assert_in_ball(y, 1.0)


def test_beta_concat_inverts_beta_split():
    k, kh = torch.tensor(0.6, dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    p = ball_points(2, 3, 8, k=0.6, radius=0.9, dtype=torch.float64)
    heads = ball.beta_split(p, 2, k, kh)
    assert heads.shape == (2, 2, 3, 4)
    assert ((heads ** 2).sum(-1) < kh.squeeze(-1)).all()
    torch.testing.assert_close(ball.beta_concat(heads, kh, k), p)


def test_mobius_layers_match_geoopt():
    k = 0.9
    ballm = geoopt.PoincareBall(c=1 / k)
    x, y = ball_points(4, D, k=k, dtype=torch.float64), ball_points(4, D, k=k, dtype=torch.float64, seed=1)
    ballm = geoopt.PoincareBall(c=torch.tensor(1 / k, dtype=torch.float64))
    torch.testing.assert_close(PoincareResidual(D, curvature=k)(x, y), ballm.mobius_add(x, y))
    act = PoincareActivation(torch.tanh, curvature=k)
    torch.testing.assert_close(act(x), ballm.expmap0(torch.tanh(ballm.logmap0(x))))
    torch.testing.assert_close(poincare_distance(x, y, torch.tensor(k)), ballm.dist(x, y))


def manual_poincare_attention(attn, x, allowed):
    """β-split heads, −β·geoopt dist scores, geoopt weighted gyromidpoint, β-concat, out_proj (float64)."""
    k = attn.curvature().double()
    c = 1 / k
    q = ball.beta_split(attn.q_proj(x), attn.num_heads, k, k)
    keys = ball.beta_split(attn.k_proj(x), attn.num_heads, k, k)
    vals = ball.beta_split(attn.v_proj(x), attn.num_heads, k, k)
    beta = attn.log_coef.exp().double().reshape(1, -1, 1, 1)
    d = gmath.dist(q[..., :, None, :], keys[..., None, :, :], k=-c)
    p = torch.softmax((-beta * d).masked_fill(~allowed, float("-inf")), dim=-1)
    B, H, N, _ = q.shape
    out = torch.stack([torch.stack([torch.stack([
        gmath.weighted_midpoint(vals[b, h], p[b, h, i], k=-c, reducedim=[0])
        for i in range(N)]) for h in range(H)]) for b in range(B)])
    return attn.out_proj(ball.beta_concat(out, k, k))


def test_poincare_attention_matches_geoopt_gyromidpoint():
    torch.manual_seed(3)
    attn = PoincareMultiheadAttention(D, 2, curvature=0.8, beta=1.7, attn_backend="reference").double()
    x = ball_points(2, 4, D, k=0.8, radius=0.9, dtype=torch.float64)
    blocked = torch.tensor([[False, True, False, True]] * 4)
    out, _ = attn(x, attn_mask=blocked)
    torch.testing.assert_close(out, manual_poincare_attention(attn, x, ~blocked))


def test_poincare_attention_kv_cache_and_backends():
    torch.manual_seed(4)
    attn = PoincareMultiheadAttention(D, 2, num_kv_heads=1, attn_backend="blockwise")
    x = ball_points(2, 7, D, radius=0.9)
    full, _ = attn(x, is_causal=True)
    attn.attn_backend = "reference"
    torch.testing.assert_close(attn(x, is_causal=True)[0], full, atol=1e-6, rtol=1e-5)
    cache = KVCache()
    steps = [attn(x[:, a:b], is_causal=True, cache=cache)[0] for a, b in ((0, 3), (3, 4), (4, 7))]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-6, rtol=1e-5)


def test_poincare_stacks_cached_decoding_and_backends():
    torch.manual_seed(5)
    dec = PoincareTransformerDecoder(2, D, 2, 12, learnable_curvature="per_layer", cross_attention=False)
    with torch.no_grad():
        dec.layers[1].curvature.log_k.fill_(0.5)
    x = ball_points(2, 20, D, radius=0.9)
    with torch.no_grad():
        full = dec(x)
        cache = dec.new_cache()
        steps = [dec(x[:, :5], cache=cache)] + [dec(x[:, t : t + 1], cache=cache) for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=2e-5)
    enc = PoincareTransformerEncoder(2, D, 2, 12)
    upstream = torch.randn(2, 20, D)  # random: the final LayerNorm makes y.sum() constant

    def run(model, inputs, backend):
        set_attention_backend(model, backend)
        xg = inputs.clone().requires_grad_()
        y = model(xg)
        (g,) = torch.autograd.grad((y * upstream.to(y.dtype)).sum(), xg)
        return y.detach().double(), g.double()

    y64, g64 = run(copy.deepcopy(enc).double(), x.double(), "reference")
    (y_ref, g_ref), (y_blk, g_blk) = run(enc, x, "reference"), run(enc, x, "blockwise")
    # DESIGN.md §6: error of the blockwise backend ≤ 2 × error of eager (reference) math in fp32 + floor
    for ours, eager, exact in ((y_blk, y_ref, y64), (g_blk, g_ref, g64)):
        floor = 1e-6 * exact.abs().max()
        assert (ours - exact).abs().max() <= 2 * (eager - exact).abs().max() + floor


def test_encoder_layer_gradcheck():
    torch.manual_seed(6)
    layer = PoincareTransformerEncoderLayer(4, 2, 6, curvature=Curvature(1.2, learnable=True))
    gradcheck_module(layer, 0.5 * torch.randn(1, 3, 4), fast=True)


def test_riemannian_adam_keeps_poincare_embedding_in_ball():
    torch.manual_seed(7)
    emb = PoincareEmbedding(15, D, curvature=0.5, init_std=0.3)
    opt = geoopt.optim.RiemannianAdam(emb.parameters(), lr=0.3)
    targets = ball_points(15, D, k=0.5, radius=0.99)
    for _ in range(30):
        loss = poincare_distance(emb(torch.arange(15)), targets, torch.tensor(0.5)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert isinstance(emb.weight, geoopt.ManifoldParameter)
    assert_in_ball(emb.weight.detach(), 0.5)
    assert loss.item() < 1.0


# --- errors ------------------------------------------------------------------------------------

def test_errors():
    x = ball_points(2, 3, D)
    with pytest.raises(ValueError, match=r"PoincareLinear: input must be Poincaré-ball points with last dim 6, got shape \(2, 3, 5\)"):
        PoincareLinear(D, 2)(x[..., 1:])
    outside = x.clone()
    outside[0, 0] = 2.0
    with pytest.raises(ValueError, match=r"PoincareMultiheadAttention: query .* is not inside the Poincaré ball"):
        PoincareMultiheadAttention(D, 2)(outside)
    with pytest.raises(ValueError, match="per_head_curvature needs num_kv_heads == num_heads"):
        PoincareMultiheadAttention(D, 2, num_kv_heads=1, per_head_curvature=True)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        PoincareLayerNorm(D, curvature=0.0)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(3, 3\)"):
        PoincareMultiheadAttention(D, 2)(x, attn_mask=torch.zeros(3, 2, dtype=torch.bool))


def test_layernorm_keeps_wide_points_off_the_boundary():
    """exp_0 of a unit-gain LayerNorm output (norm sqrt(128)) would sit on the margin; the 1/sqrt(dim) gain
    gives tangent norm ≈ 1, so c|p|² ≈ tanh²(√c) with c = 1/k."""
    k = 0.5
    for affine in (True, False):
        y = PoincareLayerNorm(128, curvature=k, elementwise_affine=affine)(ball_points(4, 128, k=k, radius=0.9))
        c_norm_sq = (y.double() ** 2).sum(-1) / k
        expected = math.tanh(math.sqrt(1 / k)) ** 2  # 0.789; LayerNorm's eps lowers rows of tiny variance
        assert ((c_norm_sq <= expected + 1e-3) & (c_norm_sq > expected - 0.1)).all(), c_norm_sq
