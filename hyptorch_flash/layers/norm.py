"""Lorentz layer normalisation."""
from __future__ import annotations

from torch import nn

from .curvature import CurvatureArg, as_curvature
from .points import check_points, map_space


class LorentzLayerNorm(nn.Module):
    r"""LayerNorm on the space coordinates, time recomputed: (x0, xs) ↦ (sqrt(k + |LN(xs)|²), LN(xs)).

    Follows Hypformer's HypLayerNorm (Yang et al. 2024, "Hypformer: Exploring Efficient Transformer
    Fully in Hyperbolic Space", KDD) as used in HyperCore's Lorentz transformer. Shape
    ``(..., dim + 1)`` → ``(..., dim + 1)`` on H_k; affine parameters as ``nn.LayerNorm``.
    """

    def __init__(self, dim: int, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 eps: float = 1e-5, elementwise_affine: bool = True, check_inputs: bool = True):
        super().__init__()
        self.dim = dim
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
        self.check_inputs = check_inputs

    def forward(self, x):
        k = self.curvature()
        check_points(x, self.dim, k, name="input", layer=type(self).__name__, check_manifold=self.check_inputs)
        return map_space(x, self.norm, k)
