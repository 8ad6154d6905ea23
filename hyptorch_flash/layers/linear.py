"""Lorentz linear layers: H^{d_in}_k → H^{d_out}_k."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import numerics
from .curvature import CurvatureArg, as_curvature
from .points import check_points, lorentz_point

MODES = ("space", "hybonet")


class LorentzLinear(nn.Module):
    r"""Linear map between hyperboloids, in one of two published forms.

    Both apply an affine map W·x + b to the *full* input point x = (x0, xs) (so the time coordinate,
    i.e. the distance from the origin, reaches the output), and differ in how they put the result
    back on H^{d_out}_k:

    - ``mode="space"`` (Hypformer / HyperCore, Yang et al. 2024, "Hypformer: Exploring Efficient
      Transformer Fully in Hyperbolic Space", KDD): y_s = W·x + b ∈ R^{d_out}, y0 = sqrt(k + |y_s|²).
      Unbounded; one output coordinate fewer to compute.
    - ``mode="hybonet"`` (Chen et al. 2022, "Fully Hyperbolic Neural Networks", ACL, eq. 3):
      u = W·x + b ∈ R^{d_out+1}, y0 = sqrt(k)·(1.1 + exp(s)·sigmoid(u0)) with a learnable scale s
      (initialised to log 10), y_s = u_s·sqrt((y0² − k)/|u_s|²). The norm of the output is bounded by
      the learnable exp(s); HyboNet's k = 1 constants are scaled by sqrt(k) here.

    Shapes: input ``(..., in_features + 1)`` full Lorentz points on H_k (time first), output
    ``(..., out_features + 1)`` on H_k; ``in_features``/``out_features`` count space dimensions.
    :meth:`space` returns only the output space coordinates (what the attention core takes).
    The affine map runs in the input dtype; time coordinates in float32 or better.

    Args:
        in_features, out_features: space dimensions d_in, d_out.
        curvature: k > 0 (float, :class:`Curvature`, geoopt manifold); ``learnable_curvature`` makes a
            float a per-layer learnable curvature.
        bias: add b. ``mode``: ``"space"`` or ``"hybonet"``. ``dropout``: dropout on the input
            coordinates before W (HyboNet's placement).
        check_inputs: verify inputs lie on H_k (syncs; turn off inside trusted stacks).
    """

    def __init__(self, in_features: int, out_features: int, *, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, bias: bool = True, mode: str = "space",
                 dropout: float = 0.0, check_inputs: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"LorentzLinear: mode must be one of {MODES}, got {mode!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"LorentzLinear: features must be ≥ 1, got {in_features} → {out_features}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        self.check_inputs = check_inputs
        self.linear = nn.Linear(in_features + 1, out_features + (mode == "hybonet"), bias=bias)
        self.dropout = nn.Dropout(dropout)
        if mode == "hybonet":
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # HyboNet's init: small uniform weights, zero bias, and a zero column for the input time
        # coordinate (x0 grows like e^distance and would otherwise dominate the first steps).
        bound = 1.0 / math.sqrt(self.out_features)
        nn.init.uniform_(self.linear.weight, -bound, bound)
        with torch.no_grad():
            self.linear.weight[:, 0] = 0.0
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        check_points(x, self.in_features, self.curvature(), name="input", layer=type(self).__name__,
                     check_manifold=self.check_inputs)
        return self.linear(self.dropout(x))

    def space(self, x: torch.Tensor) -> torch.Tensor:
        """Space coordinates ``(..., out_features)`` of the output (time left implied)."""
        u = self._affine(x)
        if self.mode == "space":
            return u
        k = self.curvature()
        ct = numerics.compute_dtype(u.dtype)
        u0, us = u[..., :1].to(ct), u[..., 1:].to(ct)
        sk = k.to(ct).sqrt()
        y0 = sk * (1.1 + self.log_scale.to(ct).exp() * torch.sigmoid(u0))
        us_sq = (us * us).sum(dim=-1, keepdim=True).clamp_min(numerics.min_sq_norm(ct))
        return (us * ((y0 * y0 - k.to(ct)) / us_sq).sqrt()).to(u.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lorentz_point(self.space(x), self.curvature())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode!r}"
