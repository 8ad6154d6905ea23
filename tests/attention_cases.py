"""Shared helpers for the attention tests: random inputs per variant and the dtype-relative check."""
from __future__ import annotations

import torch

import hyptorch_flash as hf

SCORES = ("lorentz_dot", "distance", "poincare_distance", "euclidean")
HYPERBOLIC_OUTPUTS = ("lorentz", "klein", "poincare")


def outputs_for(score: str):
    return ("euclidean",) if score == "euclidean" else HYPERBOLIC_OUTPUTS


def coefficient_kw(score: str, value):
    """The score's coefficient keyword: tau for dot products, beta for distances."""
    return {"tau": value} if score in ("lorentz_dot", "euclidean") else {"beta": value}


def random_points(shape, score: str, *, generator=None, dtype=torch.float64, norm_scale=1.0, curvature=1.0):
    """Random inputs (never zeros/ones) valid for ``score``: space coordinates, or ball points for Poincaré."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * norm_scale
    if score == "poincare_distance":
        # into the ball of radius sqrt(k) (sqrt of the smallest k when per-head), at radius fractions in (0.05, 0.9)
        ball_radius = torch.as_tensor(curvature, dtype=torch.float64).min().sqrt()
        fraction = torch.rand(shape[:-1] + (1,), generator=generator, dtype=torch.float64) * 0.85 + 0.05
        x = x / x.norm(dim=-1, keepdim=True) * fraction * ball_radius
    return x.to(dtype)


def offset_copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` whose data starts one element past a 16-byte boundary (a view into a larger
    buffer, as a slice of a flat parameter or activation buffer would be)."""
    view = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)
    view.copy_(x)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item()


def assert_close_to_truth(name: str, got, ref, truth, *, floor_rel: float):
    """err(got) ≤ 2·err(ref) + floor, both measured against the float64 truth (STYLE.md §3).

    The floor is ``floor_rel`` times max(|truth|, 1): inputs are O(1), so a truth that is exactly 0
    (dq with a single key) still allows rounding noise of the dtype.
    """
    scale = max(truth.double().abs().max().item(), 1.0)
    e_got, e_ref = max_err(got, truth), max_err(ref, truth)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert e_got <= 2.0 * e_ref + floor_rel * scale, (
        f"{name}: error {e_got:.3e} > 2 × reference error {e_ref:.3e} + floor {floor_rel * scale:.1e}"
    )


def run_attention(q, k, v, *, backend, **kw):
    return hf.hyperbolic_attention(q, k, v, backend=backend, **kw)
