"""Lorentz position-wise feed-forward block."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .activation import LorentzActivation
from .curvature import CurvatureArg, as_curvature
from .dropout import LorentzDropout
from .linear import LorentzLinear
from .points import check_points


class LorentzFeedForward(nn.Module):
    r"""LorentzLinear(dim → ffn_dim) → LorentzActivation → LorentzDropout → LorentzLinear(ffn_dim → dim).

    The fully hyperbolic feed-forward of HyboNet (Chen et al. 2022, ACL) / Hypformer (Yang et al.
    2024, KDD): every step maps H_k to H_k, no tangent space. Shape ``(..., dim + 1)`` → same.
    """

    def __init__(self, dim: int, ffn_dim: int, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 activation: Optional[Callable] = None, dropout: float = 0.0, projection: str = "space",
                 check_inputs: bool = True):
        super().__init__()
        self.dim = dim
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        self.check_inputs = check_inputs
        self.fc1 = LorentzLinear(dim, ffn_dim, curvature=self.curvature, mode=projection, check_inputs=False)
        self.activation = LorentzActivation(activation, curvature=self.curvature, check_inputs=False)
        self.dropout = LorentzDropout(dropout, curvature=self.curvature)
        self.fc2 = LorentzLinear(ffn_dim, dim, curvature=self.curvature, mode=projection, check_inputs=False)

    def forward(self, x):
        check_points(x, self.dim, self.curvature(), name="input", layer=type(self).__name__,
                     check_manifold=self.check_inputs)
        return self.fc2(self.dropout(self.activation(self.fc1(x))))
