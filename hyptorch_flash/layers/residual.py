"""Lorentz residual connection (LResNet)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import geometry
from .curvature import CurvatureArg, as_curvature
from .points import check_points, lorentz_point


class LorentzResidual(nn.Module):
    r"""LResNet residual: z = w_x·x + w_y·y, output sqrt(k)·z / sqrt(−<z,z>_L).

    He, Yang, Ying 2025, "Lorentzian Residual Neural Networks" (KDD), eq. 3. For x, y on H_k and
    w_x, w_y > 0 the sum z is time-like with z0 > 0 (−<z,z>_L ≥ k(w_x + w_y)²), so the normalisation
    is always defined; the result is the Lorentz centroid of {x, y} with weights {w_x, w_y}, computed
    with the library's stable centroid epilogue (DESIGN.md §2.4). w_x = 1; w_y = exp(log_w) > 0,
    learnable when ``learnable_weight`` (HyperCore's LResNet weight).

    Shapes: ``x``, ``y`` ``(..., dim + 1)`` on H_k → ``(..., dim + 1)`` on H_k.
    """

    def __init__(self, dim: int, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 weight: float = 1.0, learnable_weight: bool = True, check_inputs: bool = True):
        super().__init__()
        if not weight > 0:
            raise ValueError(f"LorentzResidual: weight must be > 0, got {weight}")
        self.dim = dim
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        log_w = torch.tensor(math.log(weight), dtype=torch.get_default_dtype())
        if learnable_weight:
            self.log_weight = nn.Parameter(log_w)
        else:
            self.register_buffer("log_weight", log_w)
        self.check_inputs = check_inputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.curvature()
        for name, t in (("x", x), ("y", y)):
            check_points(t, self.dim, k, name=name, layer=type(self).__name__, check_manifold=self.check_inputs)
        if x.shape != y.shape:
            raise ValueError(f"LorentzResidual: x and y shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        z = x + self.log_weight.exp().to(y.dtype) * y
        space = geometry.centroid_epilogue(z.to(geometry.numerics.compute_dtype(z.dtype)), k, "lorentz")
        return lorentz_point(space.to(x.dtype), k)
