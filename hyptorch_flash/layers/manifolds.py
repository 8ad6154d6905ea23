"""geoopt manifolds with the guards that Riemannian optimisation needs in float32."""
from __future__ import annotations

import geoopt
import torch


class StableLorentz(geoopt.Lorentz):
    r"""``geoopt.Lorentz`` whose ``component_inner`` is clamped at 0 (so RiemannianAdam cannot NaN).

    ``geoopt.optim.RiemannianAdam`` accumulates ``exp_avg_sq += component_inner(x, g)``, which for
    ``Lorentz`` is the Minkowski square <g,g>_L of the Riemannian gradient. For a tangent vector it is
    ≥ 0, but g0² and |g_s|² are each of order x0²·|g|², so in float32 the difference rounds below zero
    once x0 is a few tens; ``sqrt`` of the (now negative) second moment then turns the parameter into
    NaN (observed with geoopt 0.5.1, float32, lr 0.1, within 5 steps at x0 ≈ 13). Clamping at 0
    restores the mathematical sign; everything else is geoopt's.
    """

    def component_inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor = None) -> torch.Tensor:
        return super().component_inner(x, u, v).clamp_min(0.0)
