"""Token / node embeddings stored on the hyperboloid as a geoopt ManifoldParameter."""
from __future__ import annotations

from typing import Optional

import geoopt
import torch
from torch import nn

from .curvature import CurvatureArg, as_curvature


class LorentzEmbedding(nn.Module):
    r"""A lookup table of points on H^dim_k, trained with Riemannian optimisers.

    The table is a ``geoopt.ManifoldParameter`` ``(num_embeddings, dim + 1)`` on a ``geoopt.Lorentz``
    manifold, so ``geoopt.optim.RiemannianAdam``/``RiemannianSGD`` keep it on the manifold (Nickel &
    Kiela 2018, "Learning Continuous Hierarchies in the Lorentz Model of Hyperbolic Geometry", ICML).
    Initialisation: expmap at the origin of tangent vectors (0, v), v ~ N(0, init_std²).

    The table lives on a fixed reference manifold H_{k_ref} (the caller's ``geoopt.Lorentz`` when one
    with a fixed k is passed, else ``geoopt.Lorentz(k_ref)`` with k_ref = the initial k) and lookups
    return sqrt(k/k_ref)·x, the similarity onto the current H_k. So a learnable curvature never moves
    the manifold under the Riemannian optimiser, and a float64 model gets points on its exact k even
    though geoopt's k was rounded to float32 at construction (the factor is 1 up to that rounding).

    ``forward(indices)``: long tensor of any shape ``(...)`` → ``(..., dim + 1)`` on H_k.
    ``padding_idx``: that row is the origin and receives no gradient (as ``nn.Embedding``).
    """

    def __init__(self, num_embeddings: int, dim: int, *, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, init_std: float = 1e-2,
                 padding_idx: Optional[int] = None):
        super().__init__()
        self.num_embeddings, self.dim, self.padding_idx = num_embeddings, dim, padding_idx
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        if isinstance(self.curvature.source, geoopt.Lorentz) and not self.curvature.learnable:
            manifold = self.curvature.source
        else:
            manifold = self.curvature.lorentz()
        self.rescaled = manifold is not self.curvature.source
        tangent = torch.zeros(num_embeddings, dim + 1)
        tangent[:, 1:].normal_(0.0, init_std)
        if padding_idx is not None:
            tangent[padding_idx] = 0.0
        with torch.no_grad():
            points = manifold.expmap0(tangent.to(manifold.k.dtype)).to(torch.get_default_dtype())
        self.manifold = manifold  # a submodule, so its k moves with .to() and is saved
        self.weight = geoopt.ManifoldParameter(points, manifold=manifold)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"LorentzEmbedding: indices must be an integer tensor, got {indices.dtype}")
        checkable = indices.numel() and not torch.compiler.is_compiling()  # the range check syncs
        if checkable and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise IndexError(
                f"LorentzEmbedding: indices must be in [0, {self.num_embeddings}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        x = nn.functional.embedding(indices, self.weight, padding_idx=self.padding_idx)
        if self.rescaled:
            k_ref = self.manifold.k.to(x.dtype)
            x = x * (self.curvature().to(x.dtype) / k_ref).sqrt()
        return x

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}"
