"""Lorentz transformer layers and stacks: manifold, backends, compile, state_dict, KV-cached decoding."""
import io
import os

import geoopt
import pytest
import torch

from hyptorch_flash import attention_backend
from hyptorch_flash.layers import (
    Curvature, LorentzEmbedding, LorentzMLR, LorentzTransformerDecoder, LorentzTransformerDecoderLayer,
    LorentzTransformerEncoder, LorentzTransformerEncoderLayer, lorentz_point,
)
from hyptorch_flash.layers.testing import assert_on_lorentz
from hyptorch_flash.layers.testing import random_lorentz_points as points

E, H = 8, 2


@pytest.mark.parametrize("scale", [1.0, 300.0])
@pytest.mark.parametrize("score", ["lorentz_dot", "distance"])
def test_layers_stay_on_manifold(scale, score):
    torch.manual_seed(0)
    k = 0.6
    enc = LorentzTransformerEncoderLayer(E, H, 16, curvature=k, dropout=0.1, score=score).train()
    dec = LorentzTransformerDecoderLayer(E, H, 16, curvature=k, dropout=0.1, score=score).train()
    x, mem = points(2, 5, E, k=k, scale=scale), points(2, 3, E, k=k, scale=scale, seed=1)
    assert_on_lorentz(enc(x), k)
    assert_on_lorentz(dec(x, mem), k)


def test_layer_gradcheck_float64():
    torch.manual_seed(1)
    curv = Curvature(0.9, learnable=True)
    for layer in (LorentzTransformerEncoderLayer(4, 2, 6, curvature=curv, score="distance", attn_backend="blockwise"),
                  LorentzTransformerDecoderLayer(4, 2, 6, curvature=curv, num_kv_heads=1)):
        layer = layer.double()
        names, params = zip(*layer.named_parameters())
        is_dec = isinstance(layer, LorentzTransformerDecoderLayer)

        def fn(xs, ms, *ps, layer=layer, is_dec=is_dec):
            kk = ps[names.index("curvature.log_k")].exp()
            lifted = lorentz_point(xs, kk), lorentz_point(ms, kk)
            return torch.func.functional_call(layer, dict(zip(names, ps)), lifted if is_dec else lifted[:1])

        args = [torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True),
                torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)]
        args += [p.detach().clone().requires_grad_() for p in params]
        assert torch.autograd.gradcheck(fn, args, atol=1e-6, rtol=1e-4, fast_mode=True)


def _encoder_outputs_and_grads(enc, x, backend):
    enc.zero_grad()
    xg = x.clone().requires_grad_()
    with attention_backend(backend):
        y = enc(xg, src_key_padding_mask=torch.tensor([[False] * 150, [False] * 140 + [True] * 10]))
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), xg.grad, {n: p.grad.clone() for n, p in enc.named_parameters()}


def test_encoder_reference_and_blockwise_agree():
    """N = 150 spans two blockwise tiles (128 + 22) with padding."""
    torch.manual_seed(2)
    enc = LorentzTransformerEncoder(2, E, H, 16, learnable_curvature="per_layer", score="distance",
                                    per_head_curvature=True)
    x = points(2, 150, E, scale=2.0)
    y_ref, gx_ref, g_ref = _encoder_outputs_and_grads(enc, x, "reference")
    y_blk, gx_blk, g_blk = _encoder_outputs_and_grads(enc, x, "blockwise")
    torch.testing.assert_close(y_blk, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_blk, gx_ref, atol=1e-5, rtol=1e-4)
    for name in g_ref:
        torch.testing.assert_close(g_blk[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    assert g_ref["layers.1.curvature.log_k"].abs() > 0


COMPILE_BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("HYPTORCH_FLASH_TEST_INDUCTOR") else [])


@pytest.mark.parametrize("compile_backend", COMPILE_BACKENDS)
def test_torch_compile_matches_eager(compile_backend):
    """aot_eager traces forward and backward through dynamo + AOTAutograd (seconds on CPU); set
    HYPTORCH_FLASH_TEST_INDUCTOR=1 to also generate code with inductor (~50 s cold on 2 cores)."""
    torch.manual_seed(3)
    layer = LorentzTransformerEncoderLayer(E, H, 16, attn_backend="reference")
    x = points(2, 5, E, scale=2.0)
    compiled = torch.compile(layer, backend=compile_backend)
    y_c = compiled(x)
    y_c.sum().backward()
    g_c = layer.ffn.fc1.linear.weight.grad.clone()
    layer.zero_grad()
    y_e = layer(x)
    y_e.sum().backward()
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_c, layer.ffn.fc1.linear.weight.grad, atol=1e-5, rtol=1e-5)


def _language_model(seed, curvature_mode):
    torch.manual_seed(seed)
    k = Curvature(1.0, learnable=True)
    dec = LorentzTransformerDecoder(2, E, H, 16, curvature=k, learnable_curvature=curvature_mode,
                                    cross_attention=False, num_kv_heads=1)
    return torch.nn.ModuleDict(dict(
        emb=LorentzEmbedding(30, E, curvature=k, init_std=0.5), dec=dec,
        head=LorentzMLR(E, 30, curvature=dec.output_curvature),
    ))


def test_state_dict_round_trip():
    a, b = _language_model(0, "per_layer"), _language_model(1, "per_layer")
    tokens = torch.randint(0, 30, (2, 7))
    run = lambda m: m["head"](m["dec"](m["emb"](tokens)))  # noqa: E731
    assert not torch.allclose(run(a), run(b))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(run(b), run(a), atol=0, rtol=0)
    assert isinstance(b["emb"].weight, geoopt.ManifoldParameter)


def test_curvature_modes():
    shared = _language_model(0, "shared")
    per_layer = _language_model(0, "per_layer")
    count = lambda m: sum(n.endswith("log_k") for n, _ in m.named_parameters())  # noqa: E731
    assert count(shared) == 1  # one k for embedding, every layer and the head
    assert count(per_layer) == 3  # embedding/input k + one per decoder layer (the head shares the last)
    assert per_layer["dec"].layers[0].curvature is not per_layer["dec"].layers[1].curvature


@pytest.mark.parametrize("curvature_mode", ["shared", "per_layer"])
def test_kv_cached_decoding_of_50_tokens_equals_full_recomputation(curvature_mode):
    model = _language_model(4, curvature_mode)
    with torch.no_grad():
        for layer in model["dec"].layers:  # make per-layer curvatures differ
            layer.curvature.log_k.add_(0.3 * torch.randn(()))
    tokens = torch.randint(0, 30, (2, 50))
    dec, emb = model["dec"], model["emb"]
    with torch.no_grad():
        full = dec(emb(tokens))
        cache = dec.new_cache()
        steps = [dec(emb(tokens[:, :10]), cache=cache)]  # prefill 10 tokens, then one at a time
        steps += [dec(emb(tokens[:, t : t + 1]), cache=cache) for t in range(10, 50)]
    assert cache[0].length == 50
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=2e-5)


def test_kv_cached_encoder_decoder_with_memory():
    torch.manual_seed(5)
    dec = LorentzTransformerDecoder(2, E, H, 16, learnable_curvature="per_layer")
    with torch.no_grad():
        dec.layers[1].curvature.log_k.fill_(0.4)
    tgt, memory = points(2, 12, E), points(2, 6, E, seed=1)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.no_grad():
        full = dec(tgt, memory, memory_key_padding_mask=pad)
        cache = dec.new_cache()
        steps = [dec(tgt[:, t : t + 3], memory if t == 0 else None, memory_key_padding_mask=pad, cache=cache)
                 for t in range(0, 12, 3)]  # chunks of 3 need the explicit offset causal mask
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=2e-5)


def test_stack_errors():
    dec = LorentzTransformerDecoder(1, E, H)
    with pytest.raises(ValueError, match="needs memory"):
        dec(points(1, 3, E))
    with pytest.raises(ValueError, match=r"cache has 2 entries for 1 layers"):
        LorentzTransformerDecoder(1, E, H, cross_attention=False)(points(1, 3, E), cache=[None, None])
    with pytest.raises(ValueError, match="learnable_curvature must be one of"):
        LorentzTransformerEncoder(1, E, H, learnable_curvature="per_head")
    with pytest.raises(ValueError, match=r"LorentzTransformerEncoder: src must be full Lorentz points with last dim 9"):
        LorentzTransformerEncoder(1, E, H)(points(1, 3, E + 1))
    off = points(1, 3, E)
    off[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="LorentzTransformerEncoder: src .* is not on the Lorentz manifold"):
        LorentzTransformerEncoder(1, E, H)(off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stack_stays_on_manifold(dtype):
    torch.manual_seed(7)
    dec = LorentzTransformerDecoder(2, E, H, 16, cross_attention=False, attn_backend="blockwise").to(dtype)
    x = points(2, 9, E, k=1.0, scale=4.0, dtype=dtype)
    y = dec(x)
    assert y.dtype == dtype
    assert_on_lorentz(y, 1.0)
