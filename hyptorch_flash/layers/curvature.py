"""Curvature of a layer: fixed, shared-learnable or per-layer-learnable, always k > 0.

Convention (DESIGN.md §1, geoopt's): H^n_k = {x : <x,x>_L = -k, x0 > 0}, sectional curvature -1/k;
the same space as geoopt ``PoincareBall(c=1/k)``.

- fixed: ``Curvature(0.9)`` keeps k in a float64 buffer (moves with ``.to(device)``, saved in
  ``state_dict``, never rounded by ``.float()``/``.half()``: points lifted with the exact k in any
  dtype pass the manifold checks);
- learnable: ``Curvature(1.0, learnable=True)`` stores log k, so k = exp(log k) > 0 for every value
  of the parameter (the positivity parametrisation of HyperCore/HELM's learnable curvature, without a
  clamp that would zero the gradient);
- per head: ``Curvature(1.0, learnable=True, num_heads=H)`` gives a ``(H,)`` curvature;
- shared: pass one ``Curvature`` instance to several layers (its parameter appears once in
  ``model.parameters()``); per-layer: let each layer build its own from a float.
- geoopt: ``Curvature.from_manifold(geoopt.Lorentz(k))`` or ``PoincareBall(c)`` reads the manifold's
  curvature at every call (tied, so a learnable geoopt manifold trains with the model);
  ``curvature.lorentz()`` / ``curvature.poincare_ball()`` give geoopt manifolds of the current value.

Points on H_k map to H_k' by the similarity x ↦ sqrt(k'/k)·x (:func:`rescale`), which is how
stacks with per-layer curvature hand points from one layer to the next.
"""
from __future__ import annotations

from numbers import Real
from typing import Optional, Union

import geoopt
import torch
from torch import nn

from .. import geometry, numerics
from .manifolds import StableLorentz


class Curvature(nn.Module):
    """k > 0 of a hyperbolic layer; ``curvature()`` returns it as a 0-d or ``(H,)`` tensor.

    Args:
        k: initial value, > 0 (float or tensor; a ``(H,)`` tensor sets per-head values).
        learnable: train k through k = exp(log_k) (positive by construction).
        num_heads: broadcast a scalar ``k`` to ``(num_heads,)`` (per-head curvature).

    Raises ``ValueError`` for k ≤ 0, non-finite k, or a per-head size that does not match.
    """

    def __init__(self, k: Union[float, torch.Tensor] = 1.0, *, learnable: bool = False,
                 num_heads: Optional[int] = None):
        super().__init__()
        value = torch.as_tensor(k, dtype=torch.float64).detach().clone()
        if value.dim() > 1:
            raise ValueError(f"Curvature: k must be a scalar or per-head (H,), got shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
            raise ValueError(f"Curvature: k must be finite and > 0 (manifold <x,x>_L = -k), got {value.tolist()}")
        if num_heads is not None:
            if value.dim() == 0:
                value = value.expand(num_heads).clone()
            elif value.shape[0] != num_heads:
                raise ValueError(f"Curvature: got {value.shape[0]} per-head values for num_heads={num_heads}")
        self.learnable = bool(learnable)
        self.source: Optional[nn.Module] = None
        if self.learnable:
            self.log_k = nn.Parameter(value.log().to(torch.get_default_dtype()))
        else:
            self.register_buffer("k_fixed", value)

    def _apply(self, fn, recurse=True):
        # A fixed k stays float64 whatever dtype the model is cast to (each use casts it).
        exact = None if self.learnable or self.source is not None else self.k_fixed.detach().cpu()
        super()._apply(fn, recurse)
        if exact is not None:
            self.k_fixed = exact.to(self.k_fixed.device)
        return self

    @classmethod
    def from_manifold(cls, manifold: Union[geoopt.Lorentz, geoopt.PoincareBall]) -> "Curvature":
        """A curvature tied to a geoopt manifold: k = ``manifold.k`` (Lorentz) or 1/c (PoincareBall).

        The manifold becomes a submodule, so its (possibly learnable) parameter trains and is saved
        with the model. geoopt's ``Lorentz(learnable=True)`` does not keep k positive; a value
        ≤ 0 raises ``ValueError`` at the next forward. ``PoincareBall`` keeps c = softplus(·) > 0.
        """
        if not isinstance(manifold, (geoopt.Lorentz, geoopt.Stereographic)):
            raise TypeError(f"Curvature.from_manifold: need a geoopt.Lorentz or PoincareBall, got {type(manifold).__name__}")
        geometry.resolve_curvature(manifold)  # raises for a non-hyperbolic manifold
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.learnable = any(p.requires_grad for p in manifold.parameters())
        self.source = manifold
        return self

    def forward(self) -> torch.Tensor:
        if self.source is not None:
            return geometry.resolve_curvature(self.source)
        return self.log_k.exp() if self.learnable else self.k_fixed

    @property
    def num_heads(self) -> Optional[int]:
        k = self.forward()
        return k.shape[0] if k.dim() == 1 else None

    def lorentz(self) -> geoopt.Lorentz:
        """A geoopt ``Lorentz`` of the current (detached) value in the default dtype; the tied one if any.

        A new one is a :class:`~hyptorch_flash.layers.manifolds.StableLorentz` (safe under RiemannianAdam).
        """
        if isinstance(self.source, geoopt.Lorentz):
            return self.source
        return StableLorentz(k=self.forward().detach().to(torch.get_default_dtype()).clone())

    def poincare_ball(self) -> geoopt.PoincareBall:
        """A geoopt ``PoincareBall(c=1/k)`` of the current (detached) value, default dtype; the tied one if any."""
        if isinstance(self.source, geoopt.Stereographic):
            return self.source
        return geoopt.PoincareBall(c=1.0 / self.forward().detach().to(torch.get_default_dtype()).clone())

    def extra_repr(self) -> str:
        k = self.forward().detach()
        kind = "tied to geoopt" if self.source is not None else ("learnable" if self.learnable else "fixed")
        return f"k={[round(v, 4) for v in k.tolist()] if k.dim() else round(k.item(), 4)}, {kind}"


CurvatureArg = Union[float, int, torch.Tensor, Curvature, geoopt.Lorentz, geoopt.Stereographic]


def as_curvature(curvature: CurvatureArg, *, learnable: bool = False, num_heads: Optional[int] = None) -> Curvature:
    """The :class:`Curvature` a layer uses for its ``curvature=`` argument.

    A ``Curvature`` is returned as it is (shared: ``learnable`` is ignored); a geoopt manifold is
    tied (:meth:`Curvature.from_manifold`); a number or tensor builds a new one (per layer).
    """
    if isinstance(curvature, Curvature):
        return curvature
    if isinstance(curvature, (geoopt.Lorentz, geoopt.Stereographic)):
        return Curvature.from_manifold(curvature)
    if isinstance(curvature, bool) or not isinstance(curvature, (Real, torch.Tensor)):
        raise TypeError(
            "curvature must be a float, a tensor, a hyptorch_flash.layers.Curvature, a geoopt.Lorentz "
            f"or a geoopt.PoincareBall, got {type(curvature).__name__}"
        )
    return Curvature(curvature, learnable=learnable, num_heads=num_heads)


def rescale(x: torch.Tensor, k_from: torch.Tensor, k_to: torch.Tensor) -> torch.Tensor:
    """Map full Lorentz points ``(..., D+1)`` from H_{k_from} to H_{k_to}: x ↦ sqrt(k_to/k_from)·x.

    A similarity (distances scale by sqrt(k_to/k_from)); the identity when the values agree.
    """
    ct = numerics.compute_dtype(x.dtype)
    return x * (k_to.to(ct) / k_from.to(ct)).sqrt().to(x.dtype)
