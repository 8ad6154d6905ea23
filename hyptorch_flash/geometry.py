"""Lorentz, Klein and Poincaré geometry used by the attention ops and layers.

Conventions (DESIGN.md §1, geoopt's): the hyperboloid H^n_k = {x : <x,x>_L = -k, x0 > 0}, k > 0,
sectional curvature -1/k, Minkowski product <x,y>_L = -x0·y0 + xs·ys. The Poincaré ball is
geoopt's ``PoincareBall(c)`` with c = 1/k (same space, other chart); the Klein ball has radius
sqrt(k). Points are stored by their *space* coordinates xs (last dim D); the time coordinate
x0 = sqrt(k + |xs|²) is implied and recomputed in float32 or better.

What geoopt already has (Minkowski inner product, projection) is called, not re-implemented.
geoopt's own Lorentz↔Poincaré maps use a ball of radius 1 and add a fixed 1e-6 to the
denominator, so the maps between the three charts of one space live here.
"""
from __future__ import annotations

import functools
from numbers import Real
from typing import Optional, Union

import geoopt
import torch
from geoopt.manifolds.lorentz import math as lorentz_math

from . import numerics

CurvatureLike = Union[float, int, torch.Tensor, geoopt.Lorentz, geoopt.Stereographic]


@functools.lru_cache(maxsize=256)
def _cached_scalar(value: float, device: Optional[torch.device]) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, device=device)


def scalar_tensor(value: float, device=None) -> torch.Tensor:
    """A 0-d float64 tensor holding ``value`` exactly (cast at use), cached per (value, device).

    A Python float turned into a CUDA tensor on every call is a host-to-device copy that waits for
    the GPU; the cache makes repeated calls with the same constant free. Never modify the result in place.
    """
    if torch.compiler.is_compiling():  # inside a compiled graph the constant is baked in anyway
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    return _cached_scalar(float(value), None if device is None else torch.device(device))


def resolve_curvature(
    curvature: CurvatureLike,
    *,
    num_heads: int | None = None,
    device: torch.device | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Curvature parameter k > 0 (Lorentz convention) as a 0-d or ``(H,)`` tensor.

    Accepts a Python number, a 0-d tensor, a per-head tensor ``(H,)``, a ``geoopt.Lorentz``
    (its ``k``) or a ``geoopt.PoincareBall``/``Stereographic`` of negative curvature -c (k = 1/c).
    Tensors are returned as they are (not detached), so a learnable curvature gets gradients.

    Raises ``ValueError`` for k ≤ 0, non-finite k or a head count that does not match, and
    ``TypeError`` for anything else.
    """
    if isinstance(curvature, geoopt.Lorentz):
        k = curvature.k
    elif isinstance(curvature, geoopt.Stereographic):
        c = -curvature.k
        if check and not bool((c > 0).all()):
            raise ValueError(
                f"hyptorch_flash: a {type(curvature).__name__} of curvature {curvature.k.tolist()} "
                "is not hyperbolic; need negative curvature (PoincareBall with c > 0)"
            )
        k = 1.0 / c
    elif isinstance(curvature, Real) and not isinstance(curvature, bool):
        k = scalar_tensor(curvature, device)
    elif isinstance(curvature, torch.Tensor):
        k = curvature
    else:
        raise TypeError(
            "hyptorch_flash: curvature must be a float, a 0-d or (H,) tensor, a geoopt.Lorentz or "
            f"a geoopt.PoincareBall, got {type(curvature).__name__}"
        )
    if not k.is_floating_point():
        k = k.to(torch.get_default_dtype())
    if k.dim() > 1:
        raise ValueError(
            f"hyptorch_flash: curvature must be 0-d or per-head (H,), got shape {tuple(k.shape)}"
        )
    if k.dim() == 1 and num_heads is not None and k.shape[0] not in (1, num_heads):
        raise ValueError(
            f"hyptorch_flash: per-head curvature has {k.shape[0]} entries but the query has "
            f"{num_heads} heads"
        )
    if device is not None and k.device != torch.device(device) and k.dim() > 0:
        raise ValueError(
            f"hyptorch_flash: curvature is on {k.device} but the inputs are on {device}"
        )
    if device is not None and k.device != torch.device(device):
        k = k.to(device)
    if check:
        if not bool(torch.isfinite(k).all()):
            raise ValueError(f"hyptorch_flash: curvature must be finite, got {k.tolist()}")
        if not bool((k > 0).all()):
            raise ValueError(
                f"hyptorch_flash: curvature k must be > 0 (manifold <x,x>_L = -k), got {k.tolist()}"
            )
    return k


def heads_view(param: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """Reshape a 0-d or ``(H,)`` parameter to broadcast against ``(B, H, N, D)``-like tensors."""
    if param.dim() == 0:
        return param
    return param.reshape((1, -1) + (1,) * (ndim - 2))


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """|x|² over the last dim, keepdim."""
    return (x * x).sum(dim=-1, keepdim=True)


def safe_norm(x: torch.Tensor) -> torch.Tensor:
    """|x| over the last dim (keepdim) with a finite gradient at x = 0."""
    return sq_norm(x).clamp_min(numerics.min_sq_norm(x.dtype)).sqrt()


def time_coordinate(x_space: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(k + |xs|²), shape ``(..., 1)``, in float32 or better whatever ``x_space.dtype``.

    ``k`` must broadcast against ``x_space[..., :1]`` (a scalar or ``heads_view(k)``).
    """
    x = x_space.to(numerics.compute_dtype(x_space.dtype))
    return (k.to(x.dtype) + sq_norm(x)).sqrt()


def lift(x_space: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Full Lorentz point ``(..., D+1)`` = (x0, xs) from space coordinates, float32 or better."""
    x = x_space.to(numerics.compute_dtype(x_space.dtype))
    return torch.cat([time_coordinate(x, k), x], dim=-1)


def minkowski_inner(x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
    """<x,y>_L = -x0·y0 + xs·ys over the last dim of full Lorentz tensors (geoopt's ``inner``)."""
    return lorentz_math.inner(x, y, keepdim=keepdim)


def project(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Project a full ``(..., D+1)`` tensor onto H_k by recomputing x0 (geoopt's ``project``)."""
    return lorentz_math.project(x, k=k.to(x.dtype))


def split_lorentz(x: torch.Tensor, k: torch.Tensor, *, name: str = "x", check: bool = True) -> torch.Tensor:
    """Space part of full Lorentz points ``(..., D+1)``, checking they lie on H_k.

    The check is |<x,x>_L + k| ≤ tol(dtype)·x0² and x0 > 0 (``numerics.manifold_tol``).
    Raises ``ValueError`` naming the worst violation.
    """
    if x.shape[-1] < 2:
        raise ValueError(
            f"hyptorch_flash: {name} as full Lorentz points needs a last dim ≥ 2 (time + space), "
            f"got shape {tuple(x.shape)}"
        )
    if check:
        xc = x.to(numerics.compute_dtype(x.dtype))
        x0 = xc[..., :1]
        residual = (minkowski_inner(xc, xc, keepdim=True) + k.to(xc.dtype)).abs()
        bound = numerics.manifold_tol(x.dtype) * x0.square()
        bad = (residual > bound) | (x0 <= 0)
        if bool(bad.any()):
            rel = (residual / x0.square()).max().item()
            raise ValueError(
                f"hyptorch_flash: {name} of shape {tuple(x.shape)} is not on the Lorentz manifold "
                f"<x,x>_L = -k with x0 > 0: worst |<x,x>_L + k|/x0² = {rel:.3g} > tolerance "
                f"{numerics.manifold_tol(x.dtype):.1g} for {x.dtype}; project it first "
                "(hyptorch_flash.geometry.project) or pass space coordinates"
            )
    return x[..., 1:]


# --- maps between the three charts of one hyperbolic space (k > 0, Poincaré ball c = 1/k) ---

def poincare_to_lorentz(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Poincaré ball (c = 1/k) → full Lorentz point ``(..., D+1)``.

    x0 = sqrt(k)·(1 + c|p|²)/(1 - c|p|²), xs = 2p/(1 - c|p|²); c|p|² is clamped to
    1 - ``numerics.ball_margin`` so boundary points stay finite.
    """
    p = p.to(numerics.compute_dtype(p.dtype))
    k = k.to(p.dtype)
    a = (sq_norm(p) / k).clamp_max(1.0 - numerics.ball_margin(p.dtype))
    inv = 1.0 / (1.0 - a)
    return torch.cat([k.sqrt() * (1.0 + a) * inv, 2.0 * p * inv], dim=-1)


def lorentz_to_poincare(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Full Lorentz point → Poincaré ball (c = 1/k): p = sqrt(k)·xs/(x0 + sqrt(k))."""
    sk = k.to(x.dtype).sqrt()
    return sk * x[..., 1:] / (x[..., :1] + sk)


def lorentz_to_klein(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Full Lorentz point → Klein ball of radius sqrt(k): kappa = sqrt(k)·xs/x0."""
    return k.to(x.dtype).sqrt() * x[..., 1:] / x[..., :1]


def klein_to_lorentz(kappa: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Klein ball (radius sqrt(k)) → full Lorentz point: x = (sqrt(k), kappa)/sqrt(1 - |kappa|²/k)."""
    kappa = kappa.to(numerics.compute_dtype(kappa.dtype))
    k = k.to(kappa.dtype)
    a = (sq_norm(kappa) / k).clamp_max(1.0 - numerics.ball_margin(kappa.dtype))
    gamma = (1.0 - a).rsqrt()
    return torch.cat([k.sqrt() * gamma, kappa * gamma], dim=-1)


def poincare_to_klein(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Poincaré ball (c = 1/k) → Klein ball (radius sqrt(k))."""
    return lorentz_to_klein(poincare_to_lorentz(p, k), k)


def klein_to_poincare(kappa: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Klein ball (radius sqrt(k)) → Poincaré ball (c = 1/k)."""
    return lorentz_to_poincare(klein_to_lorentz(kappa, k), k)


OUTPUT_MODELS = ("lorentz", "klein", "poincare")


def centroid_epilogue(o: torch.Tensor, k: torch.Tensor, output: str) -> torch.Tensor:
    """Map a weighted sum of Lorentz points to the centroid in the chosen model (DESIGN.md §2.4).

    ``o``: ``(..., D+1)``, O = Σ_j w_j·[v_j0 | v_js] with w ≥ 0 (any positive normaliser: the map is
    scale-invariant). With n = sqrt(O0² − |Os|²), computed as (O0 − |Os|)(O0 + |Os|):

    - ``"lorentz"``:  space part of sqrt(k)·O/n (the Lorentz centroid), shape ``(..., D)``;
    - ``"klein"``:    sqrt(k)·Os/O0 (Einstein midpoint in the Klein ball of radius sqrt(k));
    - ``"poincare"``: sqrt(k)·Os/(O0 + n) (Möbius gyromidpoint in geoopt ``PoincareBall(c=1/k)``).

    Rows with O = 0 (every key masked) return the origin (zero space part) with zero gradient.
    ``k`` must broadcast against ``o[..., :1]``.
    """
    if output not in OUTPUT_MODELS:
        raise ValueError(f"hyptorch_flash: output must be one of {OUTPUT_MODELS}, got {output!r}")
    o0, o_space = o[..., :1], o[..., 1:]
    valid = o0 > 0
    # Fully masked rows are replaced by the origin (1, 0) *before* the math, so neither the value
    # nor the gradient ever sees 0/0.
    o0 = torch.where(valid, o0, torch.ones_like(o0))
    o_space = torch.where(valid, o_space, torch.zeros_like(o_space))
    sk = k.to(o.dtype).sqrt()
    if output == "klein":
        y = sk * o_space / o0
    else:
        space_norm = safe_norm(o_space)
        n_sq = (o0 - space_norm) * (o0 + space_norm)
        n = n_sq.clamp_min(numerics.min_sq_norm(o.dtype)).sqrt()
        y = sk * o_space / (n if output == "lorentz" else o0 + n)
    return torch.where(valid, y, torch.zeros_like(y))
