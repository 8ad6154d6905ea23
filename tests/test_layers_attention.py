"""HyperbolicMultiheadAttention against a float64 hand-written reference; masks, cache, backends, errors."""
import functools
import math

import pytest
import torch

import hyptorch_flash
from hyptorch_flash.layers import Curvature, HyperbolicMultiheadAttention, KVCache
from hyptorch_flash.ops import backends
from hyptorch_flash.ops.reference import reference_attention
from hyptorch_flash.layers.testing import random_lorentz_points

E, H = 8, 4
points = functools.partial(random_lorentz_points, dtype=torch.float64)


def lift(space, k):
    return torch.cat([(k + (space ** 2).sum(-1, keepdim=True)).sqrt(), space], -1)


def manual_attention(mha, x, kv=None, allowed=None):
    """Float64 reimplementation from the module's weights: projections, scores, centroid, concat, out_proj.

    ``allowed``: bool broadcastable to (B, H, N, M), True = may attend.
    """
    kv = x if kv is None else kv
    B, N, dh, hkv = x.shape[0], x.shape[1], mha.head_dim, mha.num_kv_heads
    k_model = mha.curvature().double()
    k_head = mha.head_curvature().double().reshape(-1, 1, 1) if mha.head_curvature().dim() else mha.curvature().double()

    def proj(lin, t, heads):
        s = t @ lin.linear.weight.T + lin.linear.bias
        return s.reshape(B, t.shape[1], heads, dh).transpose(1, 2)

    q = proj(mha.q_proj, x, H)
    keys = proj(mha.k_proj, kv, hkv).repeat_interleave(H // hkv, dim=1)
    vals = proj(mha.v_proj, kv, hkv).repeat_interleave(H // hkv, dim=1)
    ql, kl, vl = lift(q, k_head), lift(keys, k_head), lift(vals, k_head)
    inner = -ql[..., :1] @ kl[..., :1].transpose(-1, -2) + q @ keys.transpose(-1, -2)
    coef = mha.log_coef.exp().double().reshape(-1, 1, 1)
    if mha.score == "lorentz_dot":
        s = coef * inner
    else:
        z = (-inner / k_head).clamp_min(1 + 1e-12)
        s = -coef * k_head.sqrt() * torch.acosh(z)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = p @ vl
    centroid = k_head.sqrt() * o / (o[..., :1] ** 2 - (o[..., 1:] ** 2).sum(-1, keepdim=True)).sqrt()
    heads = centroid[..., 1:].transpose(1, 2).reshape(B, N, H * dh)
    z = lift(heads, k_model) @ mha.out_proj.linear.weight.T + mha.out_proj.linear.bias
    return lift(z, k_model), p


def random_allowed(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(*shape, generator=g) > 0.4
    allowed[..., 0] = True  # every query sees at least one key
    return allowed


@pytest.mark.parametrize("score", ["lorentz_dot", "distance"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("per_head_curvature", [False, True])
def test_matches_manual_reference(score, num_kv_heads, per_head_curvature):
    torch.manual_seed(0)
    k = 0.7
    mha = HyperbolicMultiheadAttention(E, H, num_kv_heads=num_kv_heads, score=score, curvature=k,
                                       per_head_curvature=per_head_curvature, learnable_scale=True,
                                       attn_backend="reference").double()
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))  # random per-head curvature/scale, non-zero biases
    x = points(2, 5, E, k=k, scale=2.0)
    blocked = ~random_allowed(5, 5)
    padded = torch.tensor([[False] * 5, [False, False, False, False, True]])
    out, _ = mha(x, attn_mask=blocked, key_padding_mask=padded)
    allowed = (~blocked)[None, None] & ~padded[:, None, None, :]
    expected, _ = manual_attention(mha, x, allowed=allowed)
    torch.testing.assert_close(out, expected)


def test_cross_attention_with_other_kdim_matches_reference():
    mha = HyperbolicMultiheadAttention(E, H, kdim=5, score="distance", attn_backend="blockwise").double()
    x, mem = points(2, 3, E), points(2, 7, 5, seed=3)
    out, _ = mha(x, mem, mem)
    torch.testing.assert_close(out, manual_attention(mha, x, kv=mem)[0])


def test_module_mask_conventions():
    mha = HyperbolicMultiheadAttention(E, H, attn_backend="reference").double()
    x = points(2, 6, E)
    blocked = ~random_allowed(6, 6)
    out_bool, _ = mha(x, attn_mask=blocked)
    out_float, _ = mha(x, attn_mask=torch.zeros(6, 6, dtype=torch.float64).masked_fill(blocked, float("-inf")))
    out_3d, _ = mha(x, attn_mask=blocked.expand(2 * H, 6, 6))
    torch.testing.assert_close(out_bool, out_float)
    torch.testing.assert_close(out_bool, out_3d)
    causal_explicit, _ = mha(x, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1))
    torch.testing.assert_close(mha(x, is_causal=True)[0], causal_explicit)
    per_batch = torch.stack([blocked, torch.zeros_like(blocked)]).repeat_interleave(H, dim=0)  # (B·H, N, M)
    out_pb, _ = mha(x, attn_mask=per_batch)
    torch.testing.assert_close(out_pb[0], out_bool[0])
    torch.testing.assert_close(out_pb[1], mha(x)[0][1])


def test_batch_first_false_is_transposed():
    torch.manual_seed(1)
    a = HyperbolicMultiheadAttention(E, H, batch_first=True).double()
    b = HyperbolicMultiheadAttention(E, H, batch_first=False).double()
    b.load_state_dict(a.state_dict())
    x = points(2, 5, E)
    torch.testing.assert_close(b(x.transpose(0, 1))[0].transpose(0, 1), a(x)[0])


def test_need_weights_match_manual_softmax():
    mha = HyperbolicMultiheadAttention(E, H, num_kv_heads=2, score="distance").double()
    x = points(2, 5, E, scale=1.5)
    out, w = mha(x, need_weights=True, is_causal=True)
    _, p = manual_attention(mha, x, allowed=torch.ones(5, 5, dtype=torch.bool).tril())
    torch.testing.assert_close(w, p.mean(dim=1))
    _, w_heads = mha(x, need_weights=True, average_attn_weights=False, is_causal=True)
    torch.testing.assert_close(w_heads, p)
    assert mha(x)[1] is None


@pytest.mark.parametrize("output", ["klein", "poincare"])
def test_output_charts_are_the_same_point(output):
    torch.manual_seed(2)
    k = 1.6
    lor = HyperbolicMultiheadAttention(E, H, curvature=k).double()
    other = HyperbolicMultiheadAttention(E, H, curvature=k, output=output).double()
    other.load_state_dict(lor.state_dict())
    x = points(2, 4, E, k=k, scale=3.0)
    y, p = lor(x)[0], other(x)[0]
    assert p.shape == (2, 4, E)
    radius_sq = (p ** 2).sum(-1)
    if output == "klein":
        torch.testing.assert_close(p, math.sqrt(k) * y[..., 1:] / y[..., :1])
        assert (radius_sq < k).all()
    else:
        torch.testing.assert_close(p, math.sqrt(k) * y[..., 1:] / (y[..., :1] + math.sqrt(k)))
        assert (radius_sq < k).all()  # PoincareBall(c = 1/k): c|p|² < 1


def test_gradcheck_all_parameters():
    torch.manual_seed(3)
    mha = HyperbolicMultiheadAttention(4, 2, num_kv_heads=1, score="distance", per_head_curvature=True,
                                       learnable_scale=True, curvature=Curvature(0.8, learnable=True),
                                       attn_backend="blockwise").double()
    names, params = zip(*mha.named_parameters())

    def fn(xs, *ps):
        x = lift(xs, ps[names.index("curvature.log_k")].exp())
        return torch.func.functional_call(mha, dict(zip(names, ps)), (x,), dict(is_causal=True))[0]

    args = [torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)]
    args += [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(fn, args, atol=1e-6, rtol=1e-4)


def test_kv_cache_chunks_match_full_causal():
    torch.manual_seed(4)
    mha = HyperbolicMultiheadAttention(E, H, num_kv_heads=2, attn_backend="blockwise")
    x = points(2, 9, E, scale=1.5, dtype=torch.float32)
    full, _ = mha(x, is_causal=True)
    cache = KVCache()
    chunks = [mha(x[:, a:b], is_causal=True, cache=cache)[0] for a, b in ((0, 4), (4, 5), (5, 8), (8, 9))]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


# --- backend switching -------------------------------------------------------------------------

@pytest.fixture
def spy_backend(monkeypatch):
    calls = []

    def run(problem):
        calls.append(problem.q.shape)
        return reference_attention(problem)

    monkeypatch.setitem(backends._REGISTRY, "spy", backends.Backend("spy", run, lambda p: None))
    return calls


def test_set_attention_backend_reaches_every_layer(spy_backend):
    model = torch.nn.Sequential(HyperbolicMultiheadAttention(E, H), HyperbolicMultiheadAttention(E, H))
    assert hyptorch_flash.set_attention_backend(model, "spy") is model
    assert all(m.attn_backend == "spy" for m in model)
    x = points(1, 3, E, dtype=torch.float32)
    model[0](x), model[1](x)
    assert len(spy_backend) == 2


def test_context_manager_applies_unless_layer_names_a_backend(spy_backend):
    free = HyperbolicMultiheadAttention(E, H)
    pinned = HyperbolicMultiheadAttention(E, H, attn_backend="reference")
    x = points(1, 3, E, dtype=torch.float32)
    with hyptorch_flash.attention_backend("spy"):
        free(x)
        pinned(x)
    assert len(spy_backend) == 1
    hyptorch_flash.set_attention_backend(pinned, None)
    with hyptorch_flash.attention_backend("spy"):
        pinned(x)
    assert len(spy_backend) == 2


def test_set_attention_backend_errors():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'; valid backends are"):
        hyptorch_flash.set_attention_backend(HyperbolicMultiheadAttention(E, H), "fast")
    with pytest.raises(TypeError, match="contains no hyperbolic attention layer"):
        hyptorch_flash.set_attention_backend(torch.nn.Linear(2, 2), "reference")


# --- errors ------------------------------------------------------------------------------------

def test_constructor_errors():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be a positive multiple of num_heads \(4\)"):
        HyperbolicMultiheadAttention(10, 4)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        HyperbolicMultiheadAttention(E, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="score must be one of"):
        HyperbolicMultiheadAttention(E, H, score="poincare_distance")
    with pytest.raises(ValueError, match="must be finite and > 0"):
        HyperbolicMultiheadAttention(E, H, curvature=-0.5)


def test_forward_errors():
    mha = HyperbolicMultiheadAttention(E, H)
    x = points(2, 5, E, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"query must be full Lorentz points with last dim 9 .* got shape \(2, 5, 8\)"):
        mha(x[..., 1:])
    with pytest.raises(ValueError, match=r"query must be 3-D"):
        mha(x[0])
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(5, 5\) or \(batch·num_heads, L, S\) = \(8, 5, 5\), got \(5, 4\)"):
        mha(x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        mha(x, attn_mask=torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, M\) = \(2, 5\), got \(2, 4\)"):
        mha(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    off = x.clone()
    off[0, 1, 0] *= 1.5
    with pytest.raises(ValueError, match="HyperbolicMultiheadAttention: query .* is not on the Lorentz manifold"):
        mha(off)
    with pytest.raises(ValueError, match="key .* must be .* with the query's batch"):
        mha(x, points(3, 5, E, dtype=torch.float32))


def test_kv_cache_with_padding_and_float_mask_matches_full():
    """Chunks with a key_padding_mask over all cached keys and a float mask over the chunk's rows."""
    torch.manual_seed(5)
    mha = HyperbolicMultiheadAttention(E, H, score="distance", attn_backend="reference").double()
    x = points(2, 8, E, scale=1.5)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, :2] = True  # left padding of the second sequence
    bias = 0.3 * torch.randn(8, 8, dtype=torch.float64)
    full, _ = mha(x, is_causal=True, key_padding_mask=pad, attn_mask=bias)
    cache, steps = KVCache(), []
    for a, b in ((0, 3), (3, 4), (4, 8)):
        out, _ = mha(x[:, a:b], is_causal=True, key_padding_mask=pad[:, :b], attn_mask=bias[a:b, :b], cache=cache)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full)
