"""Positional information for hyperbolic sequence models: absolute encodings and hyperbolic rotary embeddings."""
from __future__ import annotations

import geoopt
import torch
from torch import nn

from .curvature import CurvatureArg, as_curvature
from .points import check_points, lorentz_point
from .residual import LorentzResidual

KINDS = ("learned", "sinusoidal")


def sinusoidal_table(num_positions: int, dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017 sinusoids ``(num_positions, dim)``: sin/cos pairs of frequencies base^(−2i/dim)."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class LorentzPositionalEncoding(nn.Module):
    r"""Absolute positions as points of H^dim_k, merged into the sequence by an LResNet residual.

    Position t has a point e_t on H_k: learned (``kind="learned"``, a ``geoopt.ManifoldParameter``
    table trained by Riemannian optimisers, as :class:`LorentzEmbedding`) or fixed
    (``kind="sinusoidal"``: exp_0 of ``scale``·the Vaswani et al. 2017 sinusoids, i.e. points at
    distance ≈ scale·sqrt(dim/2) from the origin). The output is
    LResNet(x_t, e_t) = the centroid of x_t and e_t with weights 1 and w (He, Yang, Ying 2025,
    "Lorentzian Residual Neural Networks", KDD) — the hyperbolic counterpart of x_t + e_t.

    ``forward(x, offset=0)``: ``x`` ``(B, N, dim + 1)`` on H_k holds positions offset … offset+N−1
    (pass the cache length as ``offset`` when decoding incrementally) → same shape on H_k.
    """

    def __init__(self, dim: int, max_len: int = 2048, *, kind: str = "sinusoidal", curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, scale: float = 0.1, weight: float = 1.0,
                 learnable_weight: bool = True, check_inputs: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"LorentzPositionalEncoding: kind must be one of {KINDS}, got {kind!r}")
        self.dim, self.max_len, self.kind, self.check_inputs = dim, max_len, kind, check_inputs
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        self.residual = LorentzResidual(dim, curvature=self.curvature, weight=weight,
                                        learnable_weight=learnable_weight, check_inputs=False)
        tangent = sinusoidal_table(max_len, dim) * scale if kind == "sinusoidal" else torch.randn(max_len, dim) * scale
        self.register_buffer("k_ref", self.curvature().detach().to(torch.float64).clone())
        manifold = geoopt.Lorentz(k=self.k_ref)
        table = manifold.expmap0(torch.cat([torch.zeros(max_len, 1, dtype=torch.float64),
                                            tangent.to(torch.float64)], -1))
        if kind == "learned":
            self.table = geoopt.ManifoldParameter(table.to(torch.get_default_dtype()),
                                                  manifold=self.curvature.lorentz())
        else:
            self.register_buffer("table", table.to(torch.get_default_dtype()))

    def positions(self, offset: int, length: int, dtype: torch.dtype) -> torch.Tensor:
        """Points e_offset … e_{offset+length−1} ``(length, dim + 1)`` on the current H_k."""
        if offset < 0 or offset + length > self.max_len:
            raise ValueError(f"LorentzPositionalEncoding: positions {offset}…{offset + length - 1} exceed "
                             f"max_len={self.max_len}")
        e = self.table[offset: offset + length]
        # tables live on H_{k_ref}; the similarity sqrt(k/k_ref) puts them on the current H_k
        return lorentz_point(e[:, 1:].to(dtype) * (self.curvature() / self.k_ref).sqrt().to(dtype), self.curvature())

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        k = self.curvature()
        check_points(x, self.dim, k, name="input", layer=type(self).__name__, check_manifold=self.check_inputs)
        if x.dim() < 2:
            raise ValueError(f"LorentzPositionalEncoding: input must be (..., seq, dim + 1), got {tuple(x.shape)}")
        return self.residual(x, self.positions(offset, x.shape[-2], x.dtype).expand_as(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_len={self.max_len}, kind={self.kind!r}"


def rotary(x: torch.Tensor, positions: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    r"""Rotate consecutive coordinate pairs (2i, 2i+1) of ``x`` by angle position·base^(−2i/d) (RoPE).

    ``x``: ``(..., N, d)`` space coordinates of Lorentz points (or Poincaré-ball points);
    ``positions``: ``(N,)``. A rotation of the space coordinates keeps |x_s|, so the time coordinate
    and the distance to the origin are unchanged: it is an isometry of H_k (and of the ball) fixing the
    origin. Then <R_m q, R_n k>_L = (R_m q_s)·(R_n k_s) − q0·k0 depends on m − n only — the hyperbolic
    rotary position embedding (HoPE) of HELM (He et al. 2025, "HELM: Hyperbolic Large Language Models
    via Mixture-of-Curvature Experts"), after RoFormer (Su et al. 2021). An odd last coordinate is left
    unrotated.
    """
    d = x.shape[-1]
    half = d // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) * 2.0 / d)
    angle = positions.to(torch.float64)[:, None] * freq  # (N, d/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    even, odd = x[..., 0: 2 * half: 2], x[..., 1: 2 * half: 2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., 2 * half:]], dim=-1)


__all__ = ["LorentzPositionalEncoding", "rotary", "sinusoidal_table"]
