"""The layers on a GPU through the fused ``cuda`` backend (skipped without CUDA).

Accuracy rule (DESIGN.md §6): against a float64 copy of the same model, the bf16 model run with the
cuda backend errs at most 2× the bf16 model run with the eager reference backend, plus a small floor.
"""
import copy

import pytest
import torch

from hyptorch_flash import set_attention_backend
from hyptorch_flash.layers import (
    HyperbolicMultiheadAttention, LorentzTransformerDecoder, LorentzTransformerEncoder, PoincareTransformerEncoder,
)
from hyptorch_flash.layers.testing import assert_in_ball, assert_on_lorentz, random_ball_points, random_lorentz_points
from hyptorch_flash.ops import cuda_backend

pytestmark = pytest.mark.cuda
DEV = "cuda"


def _outputs(model, x, backend, **kwargs):
    set_attention_backend(model, backend)
    with torch.no_grad():
        return model(x, **kwargs).double()


def assert_cuda_as_accurate_as_eager(model, x, **kwargs):
    exact = _outputs(copy.deepcopy(model).double(), x.double(), "reference", **kwargs)
    low = model.to(torch.bfloat16)
    eager = _outputs(low, x.to(torch.bfloat16), "reference", **kwargs)
    fused = _outputs(low, x.to(torch.bfloat16), "cuda", **kwargs)
    err_fused, err_eager = (fused - exact).abs().max(), (eager - exact).abs().max()
    assert err_fused <= 2 * err_eager + 1e-3 * exact.abs().max(), (err_fused, err_eager)
    return fused


@pytest.mark.parametrize("score", ["lorentz_dot", "distance"])
def test_lorentz_encoder_on_cuda_backend(score):
    torch.manual_seed(0)
    enc = LorentzTransformerEncoder(2, 128, 2, 256, score=score, per_head_curvature=True).to(DEV)
    x = random_lorentz_points(2, 300, 128, scale=2.0, dtype=torch.float64).to(DEV)
    pad = torch.zeros(2, 300, dtype=torch.bool, device=DEV)
    pad[1, 250:] = True
    y = assert_cuda_as_accurate_as_eager(enc, x, src_key_padding_mask=pad, is_causal=True)
    assert_on_lorentz(y.to(torch.bfloat16), 1.0)


def test_poincare_encoder_on_cuda_backend():
    torch.manual_seed(1)
    enc = PoincareTransformerEncoder(2, 128, 2, 256).to(DEV)
    x = random_ball_points(2, 200, 128, radius=0.9).to(DEV)
    y = assert_cuda_as_accurate_as_eager(enc, x, is_causal=True)
    assert_in_ball(y.to(torch.bfloat16), 1.0)


class _OutputOnly(torch.nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, x, **kwargs):
        return self.attention(x, **kwargs)[0]  # drop the (None) weights


def test_gqa_attention_on_cuda_backend():
    torch.manual_seed(2)
    attn = HyperbolicMultiheadAttention(256, 4, num_kv_heads=2, score="distance").to(DEV)
    x = random_lorentz_points(2, 130, 256, dtype=torch.float64).to(DEV)
    assert_cuda_as_accurate_as_eager(_OutputOnly(attn), x, is_causal=True)


def test_kv_cached_decoding_on_cuda_backend():
    torch.manual_seed(3)
    dec = LorentzTransformerDecoder(2, 128, 2, 256, cross_attention=False).to(DEV, torch.bfloat16)
    set_attention_backend(dec, "cuda")  # prefill: causal (no cache yet); steps: one query, no mask
    x = random_lorentz_points(2, 40, 128, dtype=torch.bfloat16).to(DEV)
    with torch.no_grad():
        full = dec(x).float()
        cache = dec.new_cache()
        steps = [dec(x[:, :8], cache=cache)] + [dec(x[:, t : t + 1], cache=cache) for t in range(8, 40)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), full, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not cuda_backend.BACKWARD_REGISTERED, reason="the CUDA backward is not registered")
def test_lorentz_encoder_gradients_on_cuda_backend():
    torch.manual_seed(4)
    enc = LorentzTransformerEncoder(1, 128, 2, 256).to(DEV)
    x = random_lorentz_points(2, 150, 128, dtype=torch.float64).to(DEV)
    upstream = torch.randn(2, 150, 129, device=DEV, dtype=torch.float64)

    def grads(model, inputs, backend):
        set_attention_backend(model, backend)
        xg = inputs.clone().requires_grad_()
        y = model(xg, is_causal=True)
        (y.double() * upstream).sum().backward()
        return torch.cat([xg.grad.double().flatten()] + [p.grad.double().flatten() for p in model.parameters()])

    exact = grads(copy.deepcopy(enc).double(), x.double(), "reference")
    low = enc.to(torch.bfloat16)
    eager = grads(low, x.to(torch.bfloat16), "reference")
    low.zero_grad()
    fused = grads(low, x.to(torch.bfloat16), "cuda")
    err_fused, err_eager = (fused - exact).abs().max(), (eager - exact).abs().max()
    assert err_fused <= 2 * err_eager + 1e-3 * exact.abs().max(), (err_fused, err_eager)
