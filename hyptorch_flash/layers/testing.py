"""Random points and membership assertions for tests of hyperbolic models (yours and ours).

The assertions are written out in float64 from the definitions (they do not call the layers'
own checks): Lorentz |<y,y>_L + k| ≤ tol(dtype)·y0² with y0 > 0; Poincaré c|p|² < 1 with the
dtype's margin left (minus a few ulps of rounding).
"""
from __future__ import annotations

import math

import torch

from .. import numerics


def random_lorentz_points(*shape, k: float = 1.0, scale: float = 1.0, dtype=torch.float32, seed: int = 0):
    """Points ``(*shape[:-1], shape[-1] + 1)`` on H_k with space coordinates ~ N(0, scale²), lifted in float64."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    return torch.cat([(k + (xs * xs).sum(-1, keepdim=True)).sqrt(), xs], -1).to(dtype)


def random_ball_points(*shape, k: float = 1.0, radius: float = 0.5, dtype=torch.float32, seed: int = 0):
    """Points ``shape`` of the ball c = 1/k: random directions at radii uniform in [0, radius·sqrt(k))."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(*shape, generator=g, dtype=torch.float64)
    r = torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64) * radius
    return (u / u.norm(dim=-1, keepdim=True) * r * math.sqrt(k)).to(dtype)


def assert_on_lorentz(y: torch.Tensor, k) -> None:
    """Finite, y0 > 0 and |<y,y>_L + k| ≤ manifold_tol(y.dtype)·y0² (k a float or tensor broadcasting on y[..., 0])."""
    y64, k = y.detach().double(), torch.as_tensor(k, dtype=torch.float64)
    residual = (-y64[..., 0] ** 2 + (y64[..., 1:] ** 2).sum(-1) + k).abs()
    assert torch.isfinite(y64).all(), "non-finite coordinates"
    assert (y64[..., 0] > 0).all(), "time coordinate ≤ 0"
    worst = (residual / y64[..., 0] ** 2).max().item()
    assert worst <= numerics.manifold_tol(y.dtype), f"|<y,y>_L + k|/y0² = {worst:.3g}"


def assert_in_ball(p: torch.Tensor, k) -> None:
    """Finite and c|p|² ≤ 1 − margin(dtype)/2 (the margin, many ulps of 1, must survive rounding)."""
    p64 = p.detach().double()
    assert torch.isfinite(p64).all(), "non-finite coordinates"
    c_norm_sq = (p64 ** 2).sum(-1) / torch.as_tensor(k, dtype=torch.float64)
    assert (c_norm_sq <= 1.0 - 0.5 * numerics.ball_margin(p.dtype)).all(), f"max c|p|² = {c_norm_sq.max().item()}"
