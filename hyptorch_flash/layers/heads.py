"""Output heads: hyperbolic multinomial logistic regression and a distance decoder."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import geometry, numerics
from .curvature import CurvatureArg, as_curvature
from .points import check_points


class LorentzMLR(nn.Module):
    r"""Multinomial logistic regression on H^dim_k: logits = signed distances to hyperplanes.

    Bdeir, Schwethelm, Landwehr 2024, "Fully Hyperbolic Convolutional Neural Networks for Computer
    Vision" (ICLR), eq. 10–11. Class c has a Euclidean z_c ∈ R^dim and a shift a_c; its hyperplane
    normal is w_c = (sinh(a_c/√k)·|z_c|, cosh(a_c/√k)·z_c), a space-like vector with ‖w_c‖_L = |z_c|.
    With α_c = <x, w_c>_L = cosh(a_c/√k)·z_c·x_s − sinh(a_c/√k)·|z_c|·x0 the logit is

        v_c(x) = |z_c| · √k · arsinh(α_c / (√k·|z_c|)),

    i.e. ‖w_c‖_L times the signed distance from x to the hyperplane.

    ``forward(x)``: ``(..., dim + 1)`` on H_k → logits ``(..., num_classes)``. Math in float32 or better.
    """

    def __init__(self, dim: int, num_classes: int, *, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, check_inputs: bool = True):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        self.z = nn.Parameter(torch.empty(num_classes, dim))
        self.a = nn.Parameter(torch.zeros(num_classes))
        nn.init.uniform_(self.z, -1.0 / math.sqrt(dim), 1.0 / math.sqrt(dim))
        self.check_inputs = check_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.curvature()
        check_points(x, self.dim, k, name="input", layer=type(self).__name__, check_manifold=self.check_inputs)
        in_dtype, ct = x.dtype, numerics.compute_dtype(x.dtype)
        x, z, a, sk = x.to(ct), self.z.to(ct), self.a.to(ct), k.to(ct).sqrt()
        z_norm = geometry.safe_norm(z).squeeze(-1)  # (C,)
        alpha = torch.cosh(a / sk) * (x[..., 1:] @ z.transpose(0, 1)) - torch.sinh(a / sk) * z_norm * x[..., :1]
        return (z_norm * sk * torch.asinh(alpha / (sk * z_norm))).to(in_dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}"


DISTANCES = ("geodesic", "squared_lorentzian")


def lorentz_distance(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor, *, kind: str = "geodesic") -> torch.Tensor:
    """Distance between full Lorentz points ``(..., D+1)`` (broadcasting), shape ``(...)``.

    ``"geodesic"``: d = sqrt(k)·arccosh(−<x,y>_L/k), argument clamped to ≥ 1 + acosh_margin(dtype)
    (d is flat, with zero gradient, within ~sqrt(2·margin)·sqrt(k) of x = y);
    ``"squared_lorentzian"``: d_L² = −2k − 2<x,y>_L (Law et al. 2019, smooth everywhere).
    """
    ct = numerics.compute_dtype(x.dtype)
    k = k.to(ct)
    inner = geometry.minkowski_inner(x.to(ct), y.to(ct))
    if kind == "squared_lorentzian":
        return (-2.0 * k - 2.0 * inner).clamp_min(0.0)
    if kind != "geodesic":
        raise ValueError(f"distance must be one of {DISTANCES}, got {kind!r}")
    z = (-inner / k).clamp_min(1.0 + numerics.acosh_margin(ct))
    return k.sqrt() * torch.acosh(z)


class LorentzDistanceDecoder(nn.Module):
    r"""Fermi–Dirac link decoder: logit(u, v) = (r − d(u, v)²)/t, P(edge) = sigmoid(logit).

    Krioukov et al. 2010 / Nickel & Kiela 2017 ("Poincaré Embeddings for Learning Hierarchical
    Representations", NeurIPS), as the HGCN link-prediction decoder (Chami et al. 2019, NeurIPS).
    d is the geodesic distance on H_k (``distance="geodesic"``, d² used) or the squared Lorentzian
    distance (``"squared_lorentzian"``, used as d²). r (radius) and t (temperature) are learnable
    when ``learnable=True``; t = exp(log t) > 0.

    ``forward(u, v)``: full points ``(..., dim + 1)`` (broadcasting) → logits ``(...)``. Train with
    ``nn.BCEWithLogitsLoss``.
    """

    def __init__(self, dim: int, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 r: float = 2.0, t: float = 1.0, learnable: bool = False, distance: str = "geodesic",
                 check_inputs: bool = True):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"LorentzDistanceDecoder: distance must be one of {DISTANCES}, got {distance!r}")
        if not t > 0:
            raise ValueError(f"LorentzDistanceDecoder: temperature t must be > 0, got {t}")
        self.dim, self.distance = dim, distance
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        r_t = torch.tensor(float(r))
        log_t = torch.tensor(math.log(t))
        if learnable:
            self.r, self.log_t = nn.Parameter(r_t), nn.Parameter(log_t)
        else:
            self.register_buffer("r", r_t)
            self.register_buffer("log_t", log_t)
        self.check_inputs = check_inputs

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = self.curvature()
        for name, x in (("u", u), ("v", v)):
            check_points(x, self.dim, k, name=name, layer=type(self).__name__, check_manifold=self.check_inputs)
        d = lorentz_distance(u, v, k, kind=self.distance)
        d_sq = d * d if self.distance == "geodesic" else d
        return ((self.r.to(d.dtype) - d_sq) / self.log_t.to(d.dtype).exp()).to(u.dtype)
