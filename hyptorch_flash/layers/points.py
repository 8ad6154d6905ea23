"""Lorentz points at layer boundaries: the representation every Lorentz layer takes and returns.

Representation (all Lorentz layers): **full points** ``(..., d + 1)`` = (x0, xs) on H^d_k, time
first, as HyboNet and HyperCore pass them between layers. A layer's ``dim``/``embed_dim``/
``in_features``/``out_features`` counts *space* dimensions d; its tensors carry d + 1 numbers.
Layers that change the space part recompute the time coordinate x0 = sqrt(k + |xs|²) (in float32
or better whatever the storage dtype), so their outputs lie on H_k up to rounding of the dtype.
"""
from __future__ import annotations

import torch

from .. import geometry


def lorentz_point(space: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Full Lorentz point ``(..., D+1)`` from space coordinates ``(..., D)``, in ``space.dtype``.

    x0 = sqrt(k + |xs|²) is computed in float32 or better. ``k`` broadcasts against ``space[..., :1]``.
    """
    return torch.cat([geometry.time_coordinate(space, k).to(space.dtype), space], dim=-1)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_points(x: torch.Tensor, dim: int, k: torch.Tensor, *, name: str, layer: str,
                 check_manifold: bool = True) -> None:
    """Validate a layer input of full Lorentz points ``(..., dim + 1)`` on H_k.

    The shape is always checked; membership (|<x,x>_L + k| ≤ tol(dtype)·x0², x0 > 0, see
    ``geometry.split_lorentz``) when ``check_manifold`` and not under ``torch.compile`` (it syncs).
    Raises ``ValueError`` whose message names the layer, the expected and the actual shape.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != dim + 1:
        raise ValueError(
            f"{layer}: {name} must be full Lorentz points with last dim {dim + 1} "
            f"(time + {dim} space coordinates), got shape {tuple(x.shape)}"
        )
    if check_manifold and not _compiling():
        try:
            geometry.split_lorentz(x, k.detach(), name=name)
        except ValueError as e:
            raise ValueError(f"{layer}: {str(e).removeprefix('hyptorch_flash: ')}") from None


def map_space(x: torch.Tensor, fn, k: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to the space part of full points ``(..., D+1)`` and recompute the time coordinate.

    The construction of HyperCore's / Hypformer's Lorentz LayerNorm, activation and dropout: any map
    R^D → R^D' becomes a map H^D_k → H^D'_k this way.
    """
    return lorentz_point(fn(x[..., 1:]), k)


def check_ball_points(p: torch.Tensor, dim: int, k: torch.Tensor, *, name: str, layer: str,
                      check_manifold: bool = True) -> None:
    """Validate a layer input of Poincaré-ball points ``(..., dim)`` in geoopt ``PoincareBall(c=1/k)``.

    Shape always; finiteness and c|p|² < 1 when ``check_manifold`` and not compiling.
    Raises ``ValueError`` naming the layer, the expected shape and the worst c|p|².
    """
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{layer}: {name} must be a torch.Tensor, got {type(p).__name__}")
    if p.dim() < 1 or p.shape[-1] != dim:
        raise ValueError(f"{layer}: {name} must be Poincaré-ball points with last dim {dim}, got shape {tuple(p.shape)}")
    if check_manifold and not _compiling():
        x = p.detach().to(torch.float64)
        radius_sq = geometry.sq_norm(x) / k.detach().to(torch.float64)
        if not bool(torch.isfinite(x).all()) or bool((radius_sq >= 1.0).any()):
            raise ValueError(
                f"{layer}: {name} of shape {tuple(p.shape)} is not inside the Poincaré ball c|p|² < 1 "
                f"(c = 1/k = {1.0 / k.detach().double().max().item():.4g}): max c|p|² = "
                f"{radius_sq.max().item():.6g}, or it has NaN/Inf"
            )
