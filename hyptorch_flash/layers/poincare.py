"""Poincaré-ball building blocks: linear (HNN++), Möbius norm/activation/dropout, residual, embedding."""
from __future__ import annotations

from typing import Callable, Optional

import geoopt
import torch
from torch import nn

from .. import geometry, numerics
from . import ball
from .curvature import CurvatureArg, as_curvature
from .points import check_ball_points


class _BallLayer(nn.Module):
    """Curvature and input validation shared by the Poincaré layers (ball c = 1/k, geoopt ``PoincareBall``)."""

    def __init__(self, dim: Optional[int], curvature: CurvatureArg, learnable_curvature: bool, check_inputs: bool):
        super().__init__()
        self.dim, self.check_inputs = dim, check_inputs
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)

    def _checked_k(self, p: torch.Tensor, name: str = "input") -> torch.Tensor:
        k = self.curvature()
        check_ball_points(p, p.shape[-1] if self.dim is None else self.dim, k, name=name,
                          layer=type(self).__name__, check_manifold=self.check_inputs)
        return k


class PoincareLinear(_BallLayer):
    r"""Poincaré fully-connected layer of HNN++ (Shimizu, Mukuta, Harada 2021, "Hyperbolic Neural Networks++",
    ICLR, §3.2, eq. 6–7): ball of dim ``in_features`` → ball of dim ``out_features``, curvature −c, c = 1/k.

    Output coordinate j is the signed distance of x to the j-th Poincaré hyperplane (normal z_j, offset
    r_j), v_j = (2|z_j|/√c)·arsinh(√c·λ_x·<x, ẑ_j>·cosh(2√c·r_j) − (λ_x − 1)·sinh(2√c·r_j)),
    λ_x = 2/(1 − c|x|²); then w = sinh(√c·v)/√c and y = w/(1 + sqrt(1 + c|w|²)). The last step is
    computed with sinh rescaled by e^{−max|√c v|} so it never overflows, and y is kept inside the ball
    with the dtype's margin. Shapes ``(..., in_features)`` → ``(..., out_features)``.
    Init as HNN++: z ~ N(0, 1/(2·in·out)), r = 0.
    """

    def __init__(self, in_features: int, out_features: int, *, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, bias: bool = True, check_inputs: bool = True):
        super().__init__(in_features, curvature, learnable_curvature, check_inputs)
        self.in_features, self.out_features = in_features, out_features
        self.z = nn.Parameter(torch.randn(in_features, out_features) * (2.0 * in_features * out_features) ** -0.5)
        self.r = nn.Parameter(torch.zeros(out_features), requires_grad=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._checked_k(x)
        xc, c = ball._compute(x, k)
        z, r, sc = self.z.to(xc.dtype), self.r.to(xc.dtype), c.sqrt()
        z_norm = geometry.safe_norm(z.transpose(0, 1)).squeeze(-1)  # (out,)
        cx2 = (c * geometry.sq_norm(xc)).clamp_max(1.0 - numerics.ball_margin(x.dtype))
        lam = 2.0 / (1.0 - cx2)
        two_sc_r = 2.0 * sc * r
        arg = lam * sc * (xc @ z) / z_norm * torch.cosh(two_sc_r) - (lam - 1.0) * torch.sinh(two_sc_r)
        s = 2.0 * z_norm * torch.asinh(arg)  # √c·v
        m = s.detach().abs().amax(dim=-1, keepdim=True)
        sinh_scaled = 0.5 * (torch.exp(s - m) - torch.exp(-s - m))  # sinh(s)·e^{−m}
        e = torch.exp(-m)
        y = sinh_scaled / (e + (e * e + geometry.sq_norm(sinh_scaled)).sqrt()) / sc
        return ball.project(y.to(x.dtype), k)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class PoincareLayerNorm(_BallLayer):
    r"""Möbius LayerNorm: exp_0(LN(log_0(p))) (the tangent-space construction of Ganea, Bécigneul,
    Hofmann 2018, "Hyperbolic Neural Networks", NeurIPS, §3.2). Shape ``(..., dim)`` → same.

    A plain LayerNorm output has norm ≈ sqrt(dim), and exp_0 would put every point at radius
    tanh(sqrt(c·dim))/√c, i.e. on the boundary for dim ≳ 10 (in bf16 every point would round onto the
    margin). So the LayerNorm gain starts at 1/sqrt(dim) (tangent norm ≈ 1, so c|p|² ≈ tanh²(√c));
    without ``elementwise_affine`` the output is scaled by that constant.
    """

    def __init__(self, dim: int, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 eps: float = 1e-5, elementwise_affine: bool = True, check_inputs: bool = True):
        super().__init__(dim, curvature, learnable_curvature, check_inputs)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
        self.gain = 1.0 if elementwise_affine else dim ** -0.5
        if elementwise_affine:
            nn.init.constant_(self.norm.weight, dim ** -0.5)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return ball.mobius_map(lambda v: self.gain * self.norm(v), p, self._checked_k(p))


class PoincareActivation(_BallLayer):
    r"""Möbius activation σ^⊗(p) = exp_0(σ(log_0(p))) (Ganea et al. 2018, NeurIPS, eq. 26).
    ``activation`` default ``nn.GELU()``; ``dim=None`` accepts any width."""

    def __init__(self, activation: Optional[Callable] = None, *, dim: Optional[int] = None,
                 curvature: CurvatureArg = 1.0, learnable_curvature: bool = False, check_inputs: bool = True):
        super().__init__(dim, curvature, learnable_curvature, check_inputs)
        self.activation = nn.GELU() if activation is None else activation

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return ball.mobius_map(self.activation, p, self._checked_k(p))


class PoincareDropout(_BallLayer):
    r"""Dropout in the tangent space at the origin, exp_0(Dropout(log_0(p))) (Ganea et al. 2018, §3.2):
    plain dropout's 1/(1−p) rescaling could leave the ball. Identity in eval mode."""

    def __init__(self, p: float = 0.1, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False):
        super().__init__(None, curvature, learnable_curvature, check_inputs=False)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"PoincareDropout: p must be in [0, 1), got {p}")
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout.p == 0.0:
            return x
        return ball.mobius_map(self.dropout, x, self.curvature())


class PoincareResidual(_BallLayer):
    r"""Residual connection by Möbius addition, x ⊕_c y (Ganea et al. 2018, NeurIPS, eq. 2; the residual of
    HNN++'s Poincaré transformer). ``x``, ``y`` ``(..., dim)`` → ``(..., dim)`` inside the ball."""

    def __init__(self, dim: int, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 check_inputs: bool = True):
        super().__init__(dim, curvature, learnable_curvature, check_inputs)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self._checked_k(x, "x")
        self._checked_k(y, "y")
        return ball.mobius_add(x, y, k)


class PoincareFeedForward(_BallLayer):
    r"""PoincareLinear(dim → ffn_dim) → PoincareActivation → PoincareDropout → PoincareLinear(ffn_dim → dim)
    (HNN++, Shimizu et al. 2021, ICLR). Shape ``(..., dim)`` → same."""

    def __init__(self, dim: int, ffn_dim: int, *, curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 activation: Optional[Callable] = None, dropout: float = 0.0, check_inputs: bool = True):
        super().__init__(dim, curvature, learnable_curvature, check_inputs)
        shared = dict(curvature=self.curvature, check_inputs=False)
        self.fc1 = PoincareLinear(dim, ffn_dim, **shared)
        self.activation = PoincareActivation(activation, **shared)
        self.dropout = PoincareDropout(dropout, curvature=self.curvature)
        self.fc2 = PoincareLinear(ffn_dim, dim, **shared)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        self._checked_k(p)
        return self.fc2(self.dropout(self.activation(self.fc1(p))))


class PoincareEmbedding(nn.Module):
    r"""A lookup table of points in geoopt ``PoincareBall(c=1/k)`` stored as a ``geoopt.ManifoldParameter``
    (Nickel & Kiela 2017, "Poincaré Embeddings for Learning Hierarchical Representations", NeurIPS).

    As :class:`LorentzEmbedding`: the table lives on a fixed reference ball (the caller's geoopt
    ``PoincareBall`` when it has a fixed c) and lookups are rescaled by sqrt(k/k_ref) onto the current
    ball. Init: exp_0 of N(0, init_std²) tangent vectors. ``forward(indices)`` → ``(..., dim)``.
    """

    def __init__(self, num_embeddings: int, dim: int, *, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, init_std: float = 1e-2):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        source = self.curvature.source
        manifold = source if isinstance(source, geoopt.PoincareBall) and not self.curvature.learnable \
            else self.curvature.poincare_ball()
        self.rescaled = manifold is not source
        self.manifold = manifold
        with torch.no_grad():
            points = manifold.expmap0(torch.randn(num_embeddings, dim) * init_std)
        self.weight = geoopt.ManifoldParameter(points, manifold=manifold)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = nn.functional.embedding(indices, self.weight)
        if self.rescaled:
            x = x * (self.curvature().to(x.dtype) * self.manifold.c.to(x.dtype)).sqrt()  # sqrt(k/k_ref), c = 1/k_ref
        return x

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}"


def poincare_distance(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """d_c(x, y) = (2/√c)·artanh(√c·|(−x) ⊕_c y|) in the ball of c = 1/k (geoopt's ``dist``), shape ``(...)``."""
    xc, c = ball._compute(x, k)
    return geoopt.PoincareBall(c=c).dist(xc, y.to(xc.dtype))


__all__ = [
    "PoincareLinear", "PoincareLayerNorm", "PoincareActivation", "PoincareDropout", "PoincareResidual",
    "PoincareFeedForward", "PoincareEmbedding", "poincare_distance",
]
