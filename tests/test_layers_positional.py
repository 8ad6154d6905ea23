"""Positional encodings: Lorentz absolute encodings (LResNet-merged) and hyperbolic rotary embeddings."""
import geoopt
import pytest
import torch

from hyptorch_flash.layers import (
    Curvature, HyperbolicMultiheadAttention, KVCache, LorentzPositionalEncoding, PoincareMultiheadAttention,
    lorentz_point, rotary, sinusoidal_table,
)
from hyptorch_flash.layers.testing import assert_on_lorentz
from hyptorch_flash.layers.testing import random_lorentz_points as points

D = 6


def test_sinusoidal_table_is_vaswani():
    t = sinusoidal_table(5, 4)
    torch.testing.assert_close(t[3], torch.tensor([torch.sin(torch.tensor(3.0)), torch.cos(torch.tensor(3.0)),
                                                   torch.sin(torch.tensor(0.03)), torch.cos(torch.tensor(0.03))],
                                                  dtype=torch.float64))


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_encoding_on_manifold_and_offsets_consistent(kind, scale):
    k = 0.7
    pe = LorentzPositionalEncoding(D, 32, kind=kind, curvature=k, scale=0.5)
    x = points(2, 9, D, k=k, scale=scale)
    y = pe(x)
    assert_on_lorentz(y, k)
    torch.testing.assert_close(pe(x[:, 4:6], offset=4), y[:, 4:6])
    assert not torch.allclose(pe(x[:, :1], offset=0), pe(x[:, :1], offset=1))  # positions differ
    if kind == "learned":
        assert isinstance(pe.table, geoopt.ManifoldParameter)


def test_encoding_follows_learnable_curvature_and_gradcheck():
    curv = Curvature(1.0, learnable=True)
    pe = LorentzPositionalEncoding(4, 8, kind="learned", curvature=curv).double()
    with torch.no_grad():
        curv.log_k.fill_(0.5)
    x = points(2, 5, 4, k=curv().item(), dtype=torch.float64)
    assert_on_lorentz(pe(x), curv().item())
    names, params = zip(*pe.named_parameters())

    def fn(xs, *ps):
        kk = ps[names.index("curvature.log_k")].exp()
        return torch.func.functional_call(pe, dict(zip(names, ps)), (lorentz_point(xs, kk),))

    args = [torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)]
    args += [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(fn, args, atol=1e-6, rtol=1e-4)


def test_encoding_errors():
    pe = LorentzPositionalEncoding(D, 8)
    with pytest.raises(ValueError, match=r"positions 6…9 exceed max_len=8"):
        pe(points(1, 4, D), offset=6)
    with pytest.raises(ValueError, match="kind must be one of"):
        LorentzPositionalEncoding(D, kind="rotary")


def test_rotary_is_an_isometry_with_relative_scores():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    m, n = torch.tensor([0, 3, 10]), torch.tensor([5, 1, 2])
    rq, rk = rotary(q, m), rotary(k, n)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # |x_s| kept → time coordinate kept
    torch.testing.assert_close(rq[:, -1], q[:, -1])  # odd last coordinate untouched
    shifted = (rotary(q, m + 17) * rotary(k, n + 17)).sum(-1)
    torch.testing.assert_close((rq * rk).sum(-1), shifted)  # depends on m − n only


@pytest.mark.parametrize("cls", [HyperbolicMultiheadAttention, PoincareMultiheadAttention])
def test_rotary_attention_cached_equals_full_and_is_position_aware(cls):
    torch.manual_seed(2)
    attn = cls(8, 2, rotary=True, attn_backend="blockwise")
    if cls is HyperbolicMultiheadAttention:
        x = points(2, 7, 8, scale=1.5)
    else:
        x = 0.15 * torch.randn(2, 7, 8)
    full, _ = attn(x, is_causal=True)
    cache = KVCache()
    steps = [attn(x[:, a:b], is_causal=True, cache=cache)[0] for a, b in ((0, 3), (3, 4), (4, 7))]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-6, rtol=1e-5)
    perm = torch.tensor([1, 0, 2, 3, 4, 5, 6])
    plain = cls(8, 2, attn_backend="blockwise")
    plain.load_state_dict(attn.state_dict())
    # without causality and positions, swapping two tokens only swaps their outputs; with rotary it does not
    torch.testing.assert_close(plain(x[:, perm])[0], plain(x)[0][:, perm], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(attn(x[:, perm])[0], attn(x)[0][:, perm], atol=1e-4)
