"""Lorentz dropout."""
from __future__ import annotations

from torch import nn

from .curvature import CurvatureArg, as_curvature
from .points import map_space


class LorentzDropout(nn.Module):
    r"""Dropout on the space coordinates, time recomputed (HyperCore, He et al. 2025; Hypformer).

    Dropping a space coordinate moves the point towards the origin along that axis and keeps it on
    H_k; identity in eval mode. Shape ``(..., D + 1)`` → same. Inputs are not re-checked (dropout sits
    between layers that already did).
    """

    def __init__(self, p: float = 0.1, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LorentzDropout: p must be in [0, 1), got {p}")
        self.dropout = nn.Dropout(p)
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)

    def forward(self, x):
        if not self.training or self.dropout.p == 0.0:
            return x
        return map_space(x, self.dropout, self.curvature())
