// Every epsilon and clamp of the CUDA kernels: the float32 row of hyptorch_flash/numerics.py.
// The kernels do all hyperbolic math in float32 whatever the storage dtype (DESIGN.md §6), so only
// the float32 values appear here. tests/test_cuda_compile.py checks that both files agree.
#pragma once

namespace hyptorch_flash {
namespace numerics {

// Poincaré boundary: keep c·|p|² ≤ 1 − BALL_MARGIN_F32 (32 ulps of 1; the conformal factor
// 1/(1 − c|p|²) is infinite at the boundary).
constexpr float BALL_MARGIN_F32 = 4e-6f;

// arccosh argument clamp z ≥ 1 + ACOSH_MARGIN_F32 (> ulp(1) = 1.19e-7, so 1 + margin is a distinct
// float32; arccosh'(1) is infinite and every self-attention diagonal has z = 1).
constexpr float ACOSH_MARGIN_F32 = 1e-6f;

// Squared-norm floor before a sqrt (float32 normal range ends at 1.2e-38).
constexpr float MIN_SQ_NORM_F32 = 1e-30f;

// Relative tolerance of the on-manifold check (unit roundoff 6e-8); unused by the forward kernel,
// kept so the two files list the same table.
constexpr float MANIFOLD_TOL_F32 = 1e-5f;

}  // namespace numerics
}  // namespace hyptorch_flash
