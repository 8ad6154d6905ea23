"""Every input-validation error of hyperbolic_attention, with its message."""
import pytest
import torch

import hyptorch_flash as hf
from hyptorch_flash import geometry


def _qkv(B=2, H=4, N=5, M=6, D=3, Hkv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    Hkv = H if Hkv is None else Hkv
    return (torch.randn(B, H, N, D, generator=g).to(dtype), torch.randn(B, Hkv, M, D, generator=g).to(dtype),
            torch.randn(B, Hkv, M, D, generator=g).to(dtype))


def test_shapes_are_checked_and_printed():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D .* got shape \(4, 5, 3\)"):
        hf.hyperbolic_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"head dims differ: q \(2, 4, 5, 3\), k \(2, 4, 6, 2\)"):
        hf.hyperbolic_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match=r"same heads and length: k \(2, 4, 6, 3\), v \(2, 4, 5, 3\)"):
        hf.hyperbolic_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="batch sizes differ"):
        hf.hyperbolic_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        hf.hyperbolic_attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="empty dimensions"):
        hf.hyperbolic_attention(q[:, :, :0], k, v)


def test_dtypes_and_devices():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="share one dtype"):
        hf.hyperbolic_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="q has dtype torch.int64"):
        hf.hyperbolic_attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        hf.hyperbolic_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="one device, got cpu, meta, cpu"):
        hf.hyperbolic_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="curvature is on meta but the inputs are on cpu"):
        hf.hyperbolic_attention(q, k, v, curvature=torch.ones(4, device="meta"))


def test_curvature_and_coefficients():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"curvature k must be > 0 .* got -1.0"):
        hf.hyperbolic_attention(q, k, v, curvature=-1.0)
    with pytest.raises(ValueError, match="curvature k must be > 0"):
        hf.hyperbolic_attention(q, k, v, curvature=torch.tensor([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="per-head curvature has 3 entries but the query has 4 heads"):
        hf.hyperbolic_attention(q, k, v, curvature=torch.ones(3))
    with pytest.raises(ValueError, match="give tau or scale, not both"):
        hf.hyperbolic_attention(q, k, v, tau=1.0, scale=1.0)
    with pytest.raises(ValueError, match="beta applies to distance scores"):
        hf.hyperbolic_attention(q, k, v, beta=1.0)
    with pytest.raises(ValueError, match="tau/scale apply to dot-product scores"):
        hf.hyperbolic_attention(q, k, v, score="distance", tau=1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        hf.hyperbolic_attention(q, k, v, tau=-2.0)
    with pytest.raises(ValueError, match="per-head beta has 2 entries but the query has 4 heads"):
        hf.hyperbolic_attention(q, k, v, score="distance", beta=torch.ones(2))


def test_nan_inf_inputs_and_the_switch_that_skips_the_check():
    q, k, v = _qkv()
    k[0, 1, 2, 0] = float("nan")
    v[1, 0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"k of shape \(2, 4, 6, 3\) has 1 NaN/Inf entries"):
        hf.hyperbolic_attention(q, k, v)
    with pytest.raises(ValueError, match=r"v of shape \(2, 4, 6, 3\) has 1 NaN/Inf entries"):
        hf.hyperbolic_attention(q, k.nan_to_num(), v)
    out = hf.hyperbolic_attention(q, k, v, check_inputs=False, backend="reference")
    assert out.isnan().any()  # garbage in, garbage out once the check is off


def test_poincare_points_outside_the_ball():
    q, k, v = (0.1 * x for x in _qkv())
    k[0, 0, 0] = torch.tensor([0.8, 0.8, 0.0])  # |p|² = 1.28 > 1 = 1/c
    with pytest.raises(ValueError, match=r"k of shape .* outside the Poincaré ball .* max c\|p\|² = 1.28"):
        hf.hyperbolic_attention(q, k, v, score="poincare_distance")
    # the same point is inside the ball of curvature k = 2 (c = 0.5)
    hf.hyperbolic_attention(q, k, v, score="poincare_distance", curvature=2.0, backend="reference")


def test_full_lorentz_off_manifold():
    q, k, v = (geometry.lift(x, torch.tensor(1.0)) for x in _qkv())
    hf.hyperbolic_attention(q, k, v, full_lorentz=True, backend="reference")
    v[1, 2, 3, 0] += 0.05
    with pytest.raises(ValueError, match=r"v of shape \(2, 4, 6, 4\) is not on the Lorentz manifold"):
        hf.hyperbolic_attention(q, k, v, full_lorentz=True)
    with pytest.raises(ValueError, match="full_lorentz=True needs a Lorentz score"):
        hf.hyperbolic_attention(q, k, v, full_lorentz=True, score="euclidean")


def test_masks():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5, 5\) does not broadcast to \(B, H, N, M\) = \(2, 4, 5, 6\)"):
        hf.hyperbolic_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool .* or float"):
        hf.hyperbolic_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, M\) = \(2, 6\), got \(2, 5\)"):
        hf.hyperbolic_attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        hf.hyperbolic_attention(q, k, v, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(TypeError, match="causal must be a bool"):
        hf.hyperbolic_attention(q, k, v, causal="yes")


def test_score_and_output_names():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"unknown score 'cosine'; valid scores are \['distance', 'euclidean', 'linear', 'lorentz_dot', 'poincare_distance'\]"):
        hf.hyperbolic_attention(q, k, v, score="cosine")
    with pytest.raises(ValueError, match=r"output='euclidean' is not available for score='distance'"):
        hf.hyperbolic_attention(q, k, v, score="distance", output="euclidean")
    with pytest.raises(ValueError, match=r"output='klein' is not available for score='euclidean'"):
        hf.hyperbolic_attention(q, k, v, score="euclidean", output="klein")
