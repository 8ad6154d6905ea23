"""Poincaré-ball operations used by the Poincaré layers (ball of curvature −c, c = 1/k, geoopt's PoincareBall).

Every function takes the Lorentz-convention k (> 0, 0-d or broadcastable, e.g. ``(H, 1, 1)``) so the
Poincaré layers share :class:`~hyptorch_flash.layers.Curvature` with the Lorentz ones; c = 1/k.
Math runs in float32 or better; results are in the input dtype and inside the ball with the per-dtype
margin c|p|² ≤ 1 − ``numerics.ball_margin`` (geoopt's fixed 1e-5 rounds away in 16-bit dtypes).
"""
from __future__ import annotations

import math

import torch
from geoopt.manifolds.stereographic import math as stereo_math

from .. import geometry, numerics


def _compute(x: torch.Tensor, k: torch.Tensor):
    ct = numerics.compute_dtype(x.dtype)
    return x.to(ct), (1.0 / k.to(ct))


def project(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pull points with c|p|² > 1 − margin(dtype) back to that radius (geoopt ``projx`` with our margin)."""
    x, c = _compute(p, k)
    max_norm = ((1.0 - numerics.ball_margin(p.dtype)) / c).sqrt()
    norm = geometry.safe_norm(x)
    return torch.where(norm > max_norm, x * (max_norm / norm), x).to(p.dtype)


def expmap0(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """exp_0(u) = tanh(√c|u|)·u/(√c|u|): tangent vector at the origin → ball (Ganea et al. 2018, eq. 13)."""
    x, c = _compute(u, k)
    sc_norm = c.sqrt() * geometry.safe_norm(x)
    return project((torch.tanh(sc_norm) / sc_norm * x).to(u.dtype), k)


def logmap0(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log_0(p) = artanh(√c|p|)·p/(√c|p|), the inverse of :func:`expmap0` (artanh argument clamped)."""
    x, c = _compute(p, k)
    sc_norm = (c.sqrt() * geometry.safe_norm(x)).clamp_max(math.sqrt(1.0 - numerics.ball_margin(p.dtype)))
    return (torch.atanh(sc_norm) / sc_norm * x).to(p.dtype)


def mobius_add(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Möbius addition x ⊕_c y (Ganea et al. 2018, eq. 2), geoopt's formula, then :func:`project`."""
    xc, c = _compute(x, k)
    return project(stereo_math.mobius_add(xc, y.to(xc.dtype), k=-c).to(x.dtype), k)


def mobius_map(fn, p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Möbius version of a Euclidean map, f^⊗(p) = exp_0(f(log_0(p))) (Ganea et al. 2018, §3.2)."""
    return expmap0(fn(logmap0(p, k)), k)


def _log_beta_half(n: int) -> float:
    # log B(n/2, 1/2), the β-split/concat normaliser of HNN++ (Shimizu et al. 2021, §3.3)
    return math.lgamma(n / 2) + math.lgamma(0.5) - math.lgamma(n / 2 + 0.5)


def beta_split(p: torch.Tensor, num_heads: int, k: torch.Tensor, k_heads: torch.Tensor) -> torch.Tensor:
    """Poincaré β-split (HNN++ §3.3): ``(B, N, n)`` in the ball of k → ``(B, H, N, n/H)`` in the balls of k_h.

    v = log_0(p) is cut into H pieces v_h, each scaled by B(n_h/2, 1/2)/B(n/2, 1/2) (which keeps the
    expected norm of a piece that of a whole vector) and mapped back by exp_0 with k_h
    (``k_heads``: 0-d or ``(H, 1, 1)``).
    """
    B, N, n = p.shape
    v = logmap0(p, k).reshape(B, N, num_heads, n // num_heads).transpose(1, 2)  # (B, H, N, n/H)
    return expmap0(v * math.exp(_log_beta_half(n // num_heads) - _log_beta_half(n)), k_heads)


def beta_concat(p: torch.Tensor, k_heads: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Poincaré β-concatenation (HNN++ §3.3), the inverse of :func:`beta_split`: ``(B, H, N, d)`` → ``(B, N, H·d)``."""
    B, H, N, d = p.shape
    v = logmap0(p, k_heads).transpose(1, 2).reshape(B, N, H * d)  # (B, H, N, d) → (B, N, H·d)
    return expmap0(v * math.exp(_log_beta_half(H * d) - _log_beta_half(d)), k)
