"""One score functor per attention variant (DESIGN.md §2), shared by every PyTorch backend.

A functor maps a query tile ``q`` ``(B, H, n, D)`` and a key tile ``k`` ``(B, H, m, D)`` (space
coordinates, or ball points for ``poincare_distance``, already in the compute dtype) to the
pre-softmax scores ``(B, H, n, m)``. ``curv`` is the curvature k and ``coef`` the variant's
coefficient (``scale`` for dot products, β for distances), each 0-d or ``(1, H, 1, 1)``.
Functors are plain differentiable PyTorch, so the blockwise backward obtains every gradient
(q, k, curvature, coefficient) from them by autograd on one tile at a time.

Each variant also names how its values are lifted before the P·V product (``lift_values``):
Lorentz coordinates for the hyperbolic variants, unchanged vectors for ``euclidean`` and ``linear``.
``linear`` (Hypformer) is a kernel, not a score: its functor returns log(φ(q)·φ(k)) so that the
softmax reproduces the normalised kernel weights in the quadratic reference; its O(N) form lives in
``linear_attention.py``, and its aggregation is the mean of the values' space parts (``aggregation``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import geometry
from .focused_linear import focus_features


def _euclidean(q, k, curv, coef, *, squared, acosh_eps):
    # s_ij = scale · q_i·k_j  (softmax(QKᵀ·scale), as F.scaled_dot_product_attention)
    return coef * (q @ k.transpose(-1, -2))


def _lorentz_dot(q, k, curv, coef, *, squared, acosh_eps):
    # s_ij = scale · <q_i, k_j>_L = scale · (q_s·k_s − q0·k0), q0/k0 recomputed from the space part
    q0 = geometry.time_coordinate(q, curv)
    k0 = geometry.time_coordinate(k, curv)
    return coef * (q @ k.transpose(-1, -2) - q0 * k0.transpose(-1, -2))


def _arccosh_score(z, curv, coef, *, squared, acosh_eps):
    # −β·d or −β·d², d = sqrt(k)·arccosh(z); z ≥ 1 + eps keeps arccosh' finite on the diagonal
    a = torch.acosh(z.clamp_min(1.0 + acosh_eps))
    return -coef * (curv * a * a if squared else curv.sqrt() * a)


def _distance(q, k, curv, coef, *, squared, acosh_eps):
    # z_ij = −<q_i, k_j>_L / k = (q0·k0 − q_s·k_s)/k
    q0 = geometry.time_coordinate(q, curv)
    k0 = geometry.time_coordinate(k, curv)
    z = (q0 * k0.transpose(-1, -2) - q @ k.transpose(-1, -2)) / curv
    return _arccosh_score(z, curv, coef, squared=squared, acosh_eps=acosh_eps)


def _poincare_distance(q, k, curv, coef, *, squared, acosh_eps):
    # Lift identity (DESIGN.md §2.3): cosh(√c·d) = 1 + 2c·|p − q|²·a_i·b_j, a = 1/(1 − c|p|²), c = 1/k
    c = 1.0 / curv
    margin = 1.0 - geometry.numerics.ball_margin(q.dtype)
    q_sq, k_sq = geometry.sq_norm(q), geometry.sq_norm(k)
    a = 1.0 / (1.0 - (c * q_sq).clamp_max(margin))
    b = 1.0 / (1.0 - (c * k_sq).clamp_max(margin))
    dist_sq = (q_sq + k_sq.transpose(-1, -2) - 2.0 * (q @ k.transpose(-1, -2))).clamp_min(0.0)
    z = 1.0 + 2.0 * c * dist_sq * a * b.transpose(-1, -2)
    return _arccosh_score(z, curv, coef, squared=squared, acosh_eps=acosh_eps)


def _linear_log_kernel(q, k, curv, coef, *, squared, acosh_eps):
    # s_ij = log(φ(q_i)·φ(k_j)), coef = the focusing power p: softmax_j(s_ij) = w_ij / Σ_j w_ij is
    # exactly Hypformer's normalised kernel weight, so the softmax backends' masking and LSE carry over.
    # w > 0 in exact arithmetic; a w that underflows (|x| ~ 1e3 with a large p) is floored at the
    # smallest normal float, so log and its gradient stay finite (that weight is ~0 either way).
    w = focus_features(q, coef) @ focus_features(k, coef).transpose(-1, -2)
    return torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))


def _lift_lorentz_space(v, curv):
    return geometry.lift(v, curv)


def _lift_poincare(v, curv):
    return geometry.poincare_to_lorentz(v, curv)


def _no_lift(v, curv):
    return v


@dataclass(frozen=True)
class ScoreVariant:
    """An attention variant: its score functor, value lift and default output model."""

    name: str
    score: Callable[..., torch.Tensor]
    lift_values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    coefficient: str  # "scale" (dot products, tau/scale), "beta" (distances) or "power" (linear)
    default_output: str
    outputs: tuple[str, ...]
    # "centroid": Lorentz centroid of the lifted values (DESIGN.md §2.4); "space": the weighted mean of
    # the values' space coordinates is the output's space part, time recomputed (Hypformer).
    aggregation: str = "centroid"


_HYPERBOLIC_OUTPUTS = geometry.OUTPUT_MODELS

VARIANTS: dict[str, ScoreVariant] = {
    v.name: v
    for v in (
        ScoreVariant("lorentz_dot", _lorentz_dot, _lift_lorentz_space, "scale", "lorentz", _HYPERBOLIC_OUTPUTS),
        ScoreVariant("distance", _distance, _lift_lorentz_space, "beta", "lorentz", _HYPERBOLIC_OUTPUTS),
        ScoreVariant("poincare_distance", _poincare_distance, _lift_poincare, "beta", "poincare", _HYPERBOLIC_OUTPUTS),
        ScoreVariant("euclidean", _euclidean, _no_lift, "scale", "euclidean", ("euclidean",)),
        ScoreVariant("linear", _linear_log_kernel, _no_lift, "power", "lorentz", _HYPERBOLIC_OUTPUTS, "space"),
    )
}


def get_variant(name: str) -> ScoreVariant:
    """The variant called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"hyptorch_flash: unknown score {name!r}; valid scores are {sorted(VARIANTS)}"
        ) from None
