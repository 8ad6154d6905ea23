"""Backend selection (per call, context manager, env var, auto) and mask semantics."""
import logging

import pytest
import torch

import hyptorch_flash as hf
from hyptorch_flash.ops import backends

from attention_cases import SCORES, coefficient_kw, outputs_for, random_points


def _qkv(score="lorentz_dot", shape=(2, 2, 9, 4), seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [random_points(shape, score, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _spy(monkeypatch):
    calls = []
    for name in ("reference", "blockwise"):
        original = backends._REGISTRY[name]

        def run(problem, _orig=original, _name=name):
            calls.append(_name)
            return _orig.run(problem)

        monkeypatch.setitem(backends._REGISTRY, name, backends.Backend(name, run, original.unsupported))
    return calls


def test_precedence_call_over_context_over_env(monkeypatch):
    calls = _spy(monkeypatch)
    q, k, v = _qkv()
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    hf.hyperbolic_attention(q, k, v)
    with hf.attention_backend("blockwise"):
        hf.hyperbolic_attention(q, k, v)
        hf.hyperbolic_attention(q, k, v, backend="reference")
        with hf.attention_backend("reference"):
            hf.hyperbolic_attention(q, k, v)
        hf.hyperbolic_attention(q, k, v)
    monkeypatch.delenv(backends.ENV_VAR)
    hf.hyperbolic_attention(q, k, v)  # auto on CPU → blockwise
    assert calls == ["reference", "blockwise", "reference", "reference", "blockwise", "blockwise"]


def test_unknown_backend_names_list_the_valid_ones(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"unknown attention backend 'fast'; valid backends are \['auto', 'reference', 'blockwise', 'cuda'\]"):
        hf.hyperbolic_attention(q, k, v, backend="fast")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with hf.attention_backend("triton"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "flash")
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*from \$HYPTORCH_FLASH_BACKEND"):
        hf.hyperbolic_attention(q, k, v)


def test_explicit_backend_that_cannot_run_raises_instead_of_falling_back():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run these inputs: inputs are not on a CUDA device"):
        hf.hyperbolic_attention(q, k, v, backend="cuda")


def test_auto_logs_why_it_fell_back_once(caplog):
    q, k, v = _qkv(seed=5)
    backends._logged_reasons.clear()
    with caplog.at_level(logging.INFO, logger="hyptorch_flash"):
        hf.hyperbolic_attention(q, k, v, backend="auto")
        hf.hyperbolic_attention(q, k, v, backend="auto")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["hyptorch_flash auto backend chose 'blockwise' (cuda: inputs are not on a CUDA device)"]


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
@pytest.mark.parametrize("score", SCORES)
def test_fully_masked_rows_give_origin_and_zero_gradient(backend, score):
    q, k, v = _qkv(score, requires_grad=True)
    visible = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.4
    visible[:, :, 3] = False  # query 3 sees nothing
    visible[:, :, 5, 0] = True
    for output in outputs_for(score):
        out, lse = hf.hyperbolic_attention(q, k, v, score=score, output=output, attn_mask=visible,
                                           return_lse=True, backend=backend)
        assert (out[:, :, 3] == 0).all() and torch.isinf(lse[:, :, 3]).all()
        upstream = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), upstream, retain_graph=True)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        assert (dq[:, :, 3] == 0).all()
        # the masked row contributes nothing to dk/dv: upstream on that row alone gives zero gradient
        only_row = torch.zeros_like(out)
        only_row[:, :, 3] = upstream[:, :, 3]
        g_row = torch.autograd.grad(out, (q, k, v), only_row)
        assert all((g == 0).all() for g in g_row)


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_bool_float_padding_and_causal_masks_agree(backend):
    q, k, v = _qkv("distance", shape=(2, 3, 7, 4))
    visible = torch.ones(7, 7, dtype=torch.bool).tril()
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    additive = torch.zeros(2, 1, 1, 7).masked_fill(pad[:, None, None, :], float("-inf"))
    run = lambda **kw: hf.hyperbolic_attention(q, k, v, score="distance", backend=backend, **kw)
    a = run(causal=True, key_padding_mask=pad)
    b = run(attn_mask=visible, key_padding_mask=pad)
    c = run(attn_mask=visible & ~pad[:, None, None, :])
    d = run(attn_mask=additive, causal=True)
    for other in (b, c, d):
        torch.testing.assert_close(a, other)


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_float_mask_values_shift_scores(backend):
    q, k, v = _qkv("lorentz_dot", shape=(1, 2, 6, 3))
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    out, lse = hf.hyperbolic_attention(q, k, v, attn_mask=bias, return_lse=True, backend=backend)
    _, lse0 = hf.hyperbolic_attention(q, k, v, return_lse=True, backend="reference")
    assert not torch.allclose(lse, lse0)
    ref, lse_ref = hf.hyperbolic_attention(q, k, v, attn_mask=bias, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, lse_ref)


def test_cross_attention_causal_is_top_left_aligned():
    q, _, _ = _qkv(shape=(1, 1, 4, 3))
    k, v = _qkv(shape=(1, 1, 7, 3), seed=2)[:2]
    out = hf.hyperbolic_attention(q, k, v, causal=True, backend="blockwise")
    visible = torch.ones(4, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(out, hf.hyperbolic_attention(q, k, v, attn_mask=visible, backend="reference"))


def test_attention_weights_match_output():
    q, k, v = _qkv("distance")
    w = hf.hyperbolic_attention_weights(q, k, score="distance", causal=True)
    assert torch.allclose(w.sum(-1), torch.ones((), dtype=w.dtype)) and (w.triu(1) == 0).all()
    from hyptorch_flash import geometry
    o = w @ geometry.lift(v, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(geometry.centroid_epilogue(o, torch.tensor(1.0, dtype=torch.float64), "lorentz"),
                               hf.hyperbolic_attention(q, k, v, score="distance", causal=True))


def test_lse_gradient_flows_through_blockwise():
    q, k, v = _qkv("distance", shape=(1, 1, 6, 3), requires_grad=True)
    grads = {}
    for backend in ("reference", "blockwise"):
        out, lse = hf.hyperbolic_attention(q, k, v, score="distance", causal=True, return_lse=True, backend=backend,
                                           **coefficient_kw("distance", 0.7))
        grads[backend] = torch.autograd.grad(out.sum() + (lse * torch.arange(6.0, dtype=torch.float64)).sum(), (q, k, v))
    for a, b in zip(grads["reference"], grads["blockwise"]):
        torch.testing.assert_close(a, b)
