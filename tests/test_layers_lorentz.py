"""Lorentz building blocks: manifold membership, gradients, references (geoopt, float64 formulas), errors."""
import math

import geoopt
import pytest
import torch

from hyptorch_flash.layers import (
    Curvature, LorentzActivation, LorentzDistanceDecoder, LorentzDropout, LorentzEmbedding, LorentzFeedForward,
    LorentzLayerNorm, LorentzLinear, LorentzMLR, LorentzPositionalEncoding, LorentzResidual, lorentz_point, rescale,
)
from hyptorch_flash.layers.testing import assert_on_lorentz
from hyptorch_flash.layers.testing import random_lorentz_points as points

D = 6


def make(name, k):
    """Each one-input layer under test, D space dims in and out."""
    kw = dict(curvature=k)
    return {
        "linear_space": lambda: LorentzLinear(D, D + 2, mode="space", **kw),
        "linear_hybonet": lambda: LorentzLinear(D, D - 2, mode="hybonet", **kw),
        "layernorm": lambda: LorentzLayerNorm(D, **kw),
        "activation": lambda: LorentzActivation(torch.nn.functional.silu, **kw),
        "dropout": lambda: LorentzDropout(0.3, **kw),
        "feedforward": lambda: LorentzFeedForward(D, 2 * D, **kw),
    }[name]()


ONE_INPUT = ["linear_space", "linear_hybonet", "layernorm", "activation", "dropout", "feedforward"]


@pytest.mark.parametrize("name", ONE_INPUT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0.5, 2.0])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_one_input_layers_stay_on_manifold(name, dtype, k, scale):
    torch.manual_seed(1)
    layer = make(name, k).to(dtype).train()
    y = layer(points(3, 5, D, k=k, scale=scale, dtype=dtype))
    assert_on_lorentz(y, k)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_residual_and_heads_on_large_inputs(scale):
    k = 1.7
    x, y = points(4, D, k=k, scale=scale), points(4, D, k=k, scale=scale, seed=1)
    assert_on_lorentz(LorentzResidual(D, curvature=k)(x, y), k)
    assert torch.isfinite(LorentzMLR(D, 5, curvature=k)(x)).all()
    assert torch.isfinite(LorentzDistanceDecoder(D, curvature=k)(x, y)).all()


def test_bfloat16_outputs_on_manifold():
    layer = LorentzFeedForward(D, 2 * D, curvature=1.3).to(torch.bfloat16)
    assert_on_lorentz(layer(points(2, 3, D, k=1.3, scale=4.0, dtype=torch.bfloat16)), 1.3)


class _LiftInputs(torch.nn.Module):
    """Inputs given as space coordinates, lifted onto the layer's current H_k (so k may be perturbed)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *xs):
        k = self.layer.curvature()
        return self.layer(*(lorentz_point(x, k) for x in xs))


def gradcheck_module(module, *inputs_space):
    """float64 gradcheck w.r.t. the inputs' space coordinates and every parameter (curvature included)."""
    wrapped = _LiftInputs(module).double()
    names, params = zip(*wrapped.named_parameters())

    def fn(*args):
        xs, ps = args[: len(inputs_space)], args[len(inputs_space):]
        return torch.func.functional_call(wrapped, dict(zip(names, ps)), tuple(xs))

    args = [x.double().requires_grad_() for x in inputs_space] + [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in ONE_INPUT if n != "dropout"])
def test_one_input_layers_gradcheck(name):
    torch.manual_seed(2)
    layer = make(name, 1.4)
    layer.curvature = Curvature(1.4, learnable=True)
    for m in layer.modules():  # share the learnable curvature with sublayers
        if hasattr(m, "curvature"):
            m.curvature = layer.curvature
    gradcheck_module(layer, torch.randn(2, 3, D))


def test_dropout_gradcheck_with_fixed_mask():
    layer = LorentzDropout(0.5, curvature=0.8).train()
    torch.manual_seed(3)
    xs = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    k = torch.tensor(0.8, dtype=torch.float64)

    def fn(x):
        torch.manual_seed(4)  # the same dropout mask at every evaluation
        return layer(lorentz_point(x, k))

    assert torch.autograd.gradcheck(fn, (xs,))


def test_residual_gradcheck_and_heads_gradcheck():
    torch.manual_seed(5)
    gradcheck_module(LorentzResidual(D, curvature=Curvature(0.7, learnable=True)), torch.randn(3, D),
                     torch.randn(3, D))
    gradcheck_module(LorentzMLR(D, 4, curvature=Curvature(1.5, learnable=True)), torch.randn(3, D))
    gradcheck_module(LorentzDistanceDecoder(D, curvature=Curvature(1.5, learnable=True), learnable=True),
                     torch.randn(3, D), torch.randn(3, D))


def test_embedding_gradcheck_through_learnable_curvature():
    emb = LorentzEmbedding(7, D, curvature=Curvature(1.2, learnable=True)).double()
    idx = torch.tensor([[0, 3, 3], [6, 1, 2]])
    names, params = zip(*emb.named_parameters())
    fn = lambda *ps: torch.func.functional_call(emb, dict(zip(names, ps)), (idx,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, [p.detach().clone().requires_grad_() for p in params])


# --- against independent formulas -------------------------------------------------------------

def test_linear_space_form_matches_formula():
    k = 0.9
    layer = LorentzLinear(D, 4, curvature=k).double()
    torch.nn.init.normal_(layer.linear.weight)
    x = points(5, D, k=k, dtype=torch.float64)
    ys = x @ layer.linear.weight.T + layer.linear.bias
    expected = torch.cat([(k + (ys ** 2).sum(-1, keepdim=True)).sqrt(), ys], -1)
    torch.testing.assert_close(layer(x), expected)


def test_linear_hybonet_form_matches_formula():
    k = 2.5
    layer = LorentzLinear(D, 4, curvature=k, mode="hybonet").double()
    torch.nn.init.normal_(layer.linear.weight)
    x = points(5, D, k=k, dtype=torch.float64)
    u = x @ layer.linear.weight.T + layer.linear.bias
    time = math.sqrt(k) * (1.1 + 10.0 * torch.sigmoid(u[:, :1]))
    space = u[:, 1:] / u[:, 1:].norm(dim=-1, keepdim=True) * (time ** 2 - k).sqrt()
    torch.testing.assert_close(layer(x), torch.cat([time, space], -1))


def test_residual_is_weighted_lorentz_centroid():
    k, w = 1.3, 0.6
    layer = LorentzResidual(D, curvature=k, weight=w).double()
    x, y = points(5, D, k=k, scale=3.0, dtype=torch.float64), points(5, D, k=k, scale=3.0, dtype=torch.float64, seed=2)
    z = x + w * y
    mink = -z[:, :1] ** 2 + (z[:, 1:] ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(layer(x, y), math.sqrt(k) * z / (-mink).sqrt())
    torch.testing.assert_close(layer(x, x), x)  # centroid of one point is the point


def test_layernorm_and_activation_act_on_space_part():
    x = points(4, D, k=0.5, scale=2.0, dtype=torch.float64)
    ln = LorentzLayerNorm(D, curvature=0.5).double()
    torch.testing.assert_close(ln(x)[..., 1:], torch.nn.functional.layer_norm(x[..., 1:], (D,)))
    act = LorentzActivation(torch.tanh, curvature=0.5)
    torch.testing.assert_close(act(x)[..., 1:], torch.tanh(x[..., 1:]))


def test_mlr_logit_is_norm_times_signed_distance_to_hyperplane():
    """|logit_c| / |z_c| equals geoopt's distance from x to the hyperplane's closest point."""
    k = 1.8
    mlr = LorentzMLR(D, 3, curvature=k).double()
    with torch.no_grad():
        mlr.a.normal_()
        mlr.z.normal_()
    x = points(4, D, k=k, scale=2.0, dtype=torch.float64)
    logits = mlr(x)
    sk = math.sqrt(k)
    zn = mlr.z.norm(dim=-1)
    w = torch.cat([(torch.sinh(mlr.a / sk) * zn)[:, None], torch.cosh(mlr.a / sk)[:, None] * mlr.z], -1)  # (C, D+1)
    manifold = geoopt.Lorentz(k=torch.tensor(k, dtype=torch.float64))
    for c in range(3):
        inner_xw = -x[:, 0] * w[c, 0] + x[:, 1:] @ w[c, 1:]
        inner_ww = -w[c, 0] ** 2 + (w[c, 1:] ** 2).sum()
        foot = x - (inner_xw / inner_ww)[:, None] * w[c]
        foot = foot * sk / (foot[:, :1] ** 2 - (foot[:, 1:] ** 2).sum(-1, keepdim=True)).sqrt()
        dist = manifold.dist(x, foot)
        torch.testing.assert_close(logits[:, c].abs() / zn[c], dist)
        assert torch.equal(torch.sign(logits[:, c]), torch.sign(inner_xw))


def test_distance_decoder_matches_geoopt():
    k = 0.6
    dec = LorentzDistanceDecoder(D, curvature=k, r=1.5, t=0.7).double()
    u, v = points(6, D, k=k, dtype=torch.float64), points(6, D, k=k, dtype=torch.float64, seed=3)
    d = geoopt.Lorentz(k=torch.tensor(k, dtype=torch.float64)).dist(u, v)
    torch.testing.assert_close(dec(u, v), (1.5 - d ** 2) / 0.7)
    sq = LorentzDistanceDecoder(D, curvature=k, distance="squared_lorentzian").double()
    inner = -u[:, 0] * v[:, 0] + (u[:, 1:] * v[:, 1:]).sum(-1)
    torch.testing.assert_close(sq(u, v), 2.0 - (-2 * k - 2 * inner))


# --- embeddings, curvature, Riemannian optimisation --------------------------------------------

def test_embedding_on_geoopt_manifold_and_padding():
    manifold = geoopt.Lorentz(k=torch.tensor(0.7))
    emb = LorentzEmbedding(10, D, curvature=manifold, padding_idx=0, init_std=0.5)
    assert emb.manifold is manifold and isinstance(emb.weight, geoopt.ManifoldParameter)
    ok, reason = manifold.check_point_on_manifold(emb.weight, atol=1e-5, rtol=1e-5, explain=True)
    assert ok, reason
    out = emb(torch.tensor([[0, 4], [9, 4]]))
    torch.testing.assert_close(out[0, 0], manifold.origin(D + 1))
    torch.testing.assert_close(out[1, 1], emb.weight[4])


def test_learnable_curvature_embedding_follows_current_k():
    curv = Curvature(1.0, learnable=True)
    emb = LorentzEmbedding(5, D, curvature=curv, init_std=1.0)
    with torch.no_grad():
        curv.log_k.fill_(math.log(3.0))
    assert_on_lorentz(emb(torch.arange(5)), 3.0)


def test_riemannian_adam_keeps_manifold_parameters_on_manifold():
    torch.manual_seed(6)
    curv = Curvature(1.0, learnable=True)
    model = torch.nn.ModuleDict(dict(
        fixed=LorentzEmbedding(20, D, curvature=0.5, init_std=1.0),
        learnable=LorentzEmbedding(20, D, curvature=curv, init_std=1.0),
        head=LorentzMLR(D, 3, curvature=curv),
        decoder=LorentzDistanceDecoder(D, curvature=0.5),
        positions=LorentzPositionalEncoding(D, 16, kind="learned", curvature=curv, scale=1.0),
    ))
    opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=0.1)
    labels, edges = torch.randint(0, 3, (20,)), torch.rand(20, 20).round()
    for _ in range(30):
        idx, other = torch.randint(0, 20, (16,)), torch.randint(0, 20, (16,))
        fixed = model["fixed"]
        link_logits = model["decoder"](fixed(idx), fixed(other))
        tokens = model["positions"](model["learnable"](idx)[None])[0]
        loss = (torch.nn.functional.cross_entropy(model["head"](tokens), labels[idx])
                + torch.nn.functional.binary_cross_entropy_with_logits(link_logits, edges[idx, other]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    manifold_params = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    assert len(manifold_params) == 3
    for p in manifold_params:
        assert_on_lorentz(p.detach(), p.manifold.k.item())
        assert p.detach()[:, 1:].abs().max() > 0.5  # they moved away from the origin
    assert curv().item() != 1.0 and curv().item() > 0


def test_learnable_curvature_stays_positive_under_large_steps():
    curv = Curvature(0.5, learnable=True)
    opt = torch.optim.SGD(curv.parameters(), lr=100.0)
    for _ in range(5):
        opt.zero_grad()
        curv().sum().backward()  # pushes k down hard
        opt.step()
    assert curv().item() > 0


def test_curvature_geoopt_interop_and_rescale():
    ball = geoopt.PoincareBall(c=2.0, learnable=True)
    curv = Curvature.from_manifold(ball)
    torch.testing.assert_close(curv(), torch.tensor(0.5))
    assert curv.learnable and curv.poincare_ball() is ball
    assert isinstance(Curvature(0.25).lorentz(), geoopt.Lorentz)
    torch.testing.assert_close(Curvature(0.25).poincare_ball().c, torch.tensor(4.0))  # default dtype
    x = points(3, D, k=0.5, scale=2.0, dtype=torch.float64)
    assert_on_lorentz(rescale(x, torch.tensor(0.5), torch.tensor(3.0)), 3.0)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_nonpositive_curvature_raises(bad):
    with pytest.raises(ValueError, match="must be finite and > 0"):
        LorentzLinear(D, D, curvature=bad)


def test_nonhyperbolic_geoopt_manifold_raises():
    with pytest.raises(ValueError, match="is not hyperbolic"):
        LorentzLayerNorm(D, curvature=geoopt.Stereographic(k=0.5))
    with pytest.raises(ValueError, match="curvature k must be > 0"):
        LorentzLayerNorm(D, curvature=geoopt.Lorentz(k=-1.0))(points(2, D))


def test_wrong_dim_raises_with_shapes():
    with pytest.raises(ValueError, match=r"last dim 7 \(time \+ 6 space coordinates\), got shape \(2, 5\)"):
        LorentzLinear(D, 3)(points(2, 4))


def test_off_manifold_input_raises():
    x = points(2, 3, D, k=1.0)
    x[1, 2, 0] += 0.5
    for layer in (LorentzLinear(D, 3), LorentzLayerNorm(D), LorentzMLR(D, 2), LorentzActivation()):
        with pytest.raises(ValueError, match=f"{type(layer).__name__}: input .* is not on the Lorentz manifold"):
            layer(x)
    with pytest.raises(ValueError, match="LorentzResidual: y .* is not on the Lorentz manifold"):
        LorentzResidual(D)(points(2, 3, D), x)
    LorentzLinear(D, 3, check_inputs=False)(x)  # the check can be turned off


def test_other_argument_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        LorentzLinear(D, D, mode="tangent")
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        LorentzDropout(1.0)
    with pytest.raises(IndexError, match=r"indices must be in \[0, 5\)"):
        LorentzEmbedding(5, D)(torch.tensor([5]))
    with pytest.raises(TypeError, match="curvature must be a float"):
        LorentzLinear(D, D, curvature="1.0")
