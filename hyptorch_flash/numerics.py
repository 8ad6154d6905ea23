"""Every epsilon and clamp of the library, per dtype, in one place (DESIGN.md §6).

Each table maps a floating dtype to a value together with the reason it has that size.
The values are chosen so that they *survive rounding in their own dtype*: ``1 - ball_margin``
and ``1 + acosh_margin`` must differ from 1 once stored in that dtype (geoopt's fixed 1e-5
boundary margin rounds away in bfloat16 and float16, which is how points end up on the
boundary and distances become infinite).

The CUDA header ``csrc/hyperbolic_attention/numerics.cuh`` mirrors the float32 row of these
tables; ``tests/test_numerics.py`` checks that they agree.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Poincaré boundary: keep c·|p|² ≤ 1 − ball_margin. Why: the conformal factor 1/(1 − c|p|²)
# blows up at the boundary; the margin is a few ulps of 1 in the dtype so it never rounds to 0.
BALL_MARGIN = {
    torch.float64: 1e-10,  # far from ulp(1)=2.2e-16, close enough to the boundary for any real use
    torch.float32: 4e-6,  # 32 ulps of 1 (ulp = 1.19e-7 above 1, 5.96e-8 below)
    torch.float16: 2.0**-9,  # 4 ulps below 1 (spacing 4.9e-4); geoopt's 1e-5 rounds to 0 here
    torch.bfloat16: 2.0**-6,  # 4 ulps below 1 (spacing 3.9e-3); geoopt's 1e-5 rounds to 0 here
}

# arccosh argument clamp: z ≥ 1 + acosh_margin. Why: arccosh'(z) = 1/sqrt(z² − 1) is infinite at
# z = 1, which every self-attention diagonal hits (d(q, q) = 0).
ACOSH_MARGIN = {
    torch.float64: 1e-12,  # d ≈ sqrt(2e-12) = 1.4e-6: distance error far below anything measurable
    torch.float32: 1e-6,  # > ulp(1) = 1.19e-7, so 1 + margin is a distinct float32
    torch.float16: 2.0**-8,  # 4 ulps above 1 (spacing 9.8e-4)
    torch.bfloat16: 2.0**-5,  # 4 ulps above 1 (spacing 7.8e-3)
}

# Squared-norm floor before a sqrt whose gradient we need. Why: d|x|/dx = x/|x| is 0/0 at x = 0
# (a value at the origin, a single key at the origin); flooring |x|² keeps the gradient finite.
MIN_SQ_NORM = {
    torch.float64: 1e-200,
    torch.float32: 1e-30,  # float32 normal range ends at 1.2e-38
    torch.float16: 1e-7,  # float16 subnormals end near 6e-8
    torch.bfloat16: 1e-30,  # bfloat16 shares float32's exponent range
}

# Relative tolerance of the manifold check |<x,x>_L + k| ≤ tol · x0² for user-given full Lorentz
# tensors. Why: x0² and |xs|² each carry about 2 unit roundoffs of x0², so tol must be several
# unit roundoffs of the storage dtype, or points the user projected correctly would be rejected.
MANIFOLD_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,  # unit roundoff 6e-8
    torch.float16: 1e-2,  # unit roundoff 4.9e-4
    torch.bfloat16: 5e-2,  # unit roundoff 3.9e-3
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64, everything else runs in float32.

    Time coordinates, Minkowski corrections, softmax state and centroid norms never run in a
    16-bit dtype (DESIGN.md §6).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lookup(table: dict, dtype: torch.dtype, name: str) -> float:
    try:
        return table[dtype]
    except KeyError:
        raise TypeError(
            f"hyptorch_flash: no {name} for dtype {dtype}; supported dtypes are "
            f"{[str(d) for d in FLOAT_DTYPES]}"
        ) from None


def ball_margin(dtype: torch.dtype) -> float:
    """Poincaré boundary margin for points stored in ``dtype``: keep c·|p|² ≤ 1 − margin."""
    return _lookup(BALL_MARGIN, dtype, "ball margin")


def acosh_margin(dtype: torch.dtype) -> float:
    """Clamp for arccosh arguments computed in ``dtype``: z ≥ 1 + margin."""
    return _lookup(ACOSH_MARGIN, dtype, "arccosh margin")


def min_sq_norm(dtype: torch.dtype) -> float:
    """Floor for a squared norm before a differentiated sqrt, in ``dtype``."""
    return _lookup(MIN_SQ_NORM, dtype, "squared-norm floor")


def manifold_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of the on-manifold check for full Lorentz tensors stored in ``dtype``."""
    return _lookup(MANIFOLD_TOL, dtype, "manifold tolerance")
