"""Lorentz activation."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .curvature import CurvatureArg, as_curvature
from .points import check_points, map_space


class LorentzActivation(nn.Module):
    r"""A pointwise nonlinearity σ on the space coordinates, time recomputed: (x0, xs) ↦ (·, σ(xs)).

    The Lorentz activation of Hypformer (Yang et al. 2024, KDD, "HypActivation") and HyperCore
    (He et al. 2025, "HyperCore: The Core Framework for Building Hyperbolic Foundation Models");
    unlike HGCN's tangent-space activation it needs no log/exp map. Shape ``(..., dim + 1)`` →
    same, on H_k. ``activation`` is any callable R → R (default ``nn.GELU()``).
    ``dim=None`` accepts any width.
    """

    def __init__(self, activation: Optional[Callable] = None, *, dim: Optional[int] = None,
                 curvature: CurvatureArg = 1.0, learnable_curvature: bool = False, check_inputs: bool = True):
        super().__init__()
        self.activation = nn.GELU() if activation is None else activation
        self.dim = dim
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        self.check_inputs = check_inputs

    def forward(self, x):
        k = self.curvature()
        dim = x.shape[-1] - 1 if self.dim is None else self.dim
        check_points(x, dim, k, name="input", layer=type(self).__name__, check_manifold=self.check_inputs)
        return map_space(x, self.activation, k)
