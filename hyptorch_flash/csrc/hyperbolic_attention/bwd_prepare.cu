// Backward step 1 on the GPU: pull the upstream gradient back through the centroid epilogue, one warp
// per query row (hyptorch_flash/ops/cuda_backward.py: prepare_backward is the same math in PyTorch and
// the CPU reference of this kernel). With y = the forward's output refined to ~16 bits (out + its
// refinement codes, device_primitives.cuh), w = the forward's O_0 (1 for a row that saw no key),
// g = dout, κ = curvature of the row's head:
//   dO_s, dO_0 = Jᵀ·g (closed forms in epilogue_pullback), Ô_s = O_s rebuilt from y
//   dout_hi = round(dO_s), dout_lo = round(dO_s − dout_hi), D_i = Σ ((hi + lo) − dO_s)·Ô_s
//   dκ_i  = (g·y)/(2κ) (the epilogue's own curvature term; summed per head by the caller)
// Euclidean output (y = O_s): dout_hi = g, D_i = Σ g·y, no lo part, dO_0 = dκ_i = 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bwd_params.cuh"
#include "device_primitives.cuh"
#include "numerics.cuh"

namespace hyptorch_flash {
namespace bwd {

constexpr int kPrepareWarps = 8;
constexpr int kMaxPerLane = 4;  // head dim ≤ 128 = 32 lanes × 4

template <typename T>
__global__ void __launch_bounds__(kPrepareWarps * 32) bwd_prepare_kernel(const PrepareParams p) {
  const int lane = threadIdx.x & 31;
  const int per_lane = p.head_dim / 32;
  const int64_t n_warps = (int64_t)gridDim.x * kPrepareWarps;
  for (int64_t row = (int64_t)blockIdx.x * kPrepareWarps + (threadIdx.x >> 5); row < p.rows; row += n_warps) {
    const int h = (int)((row / p.n_queries) % p.heads);
    const float kap = p.curvature[h];
    const T* out = static_cast<const T*>(p.out) + row * p.head_dim;
    const int8_t* refine = p.out_refine + row * p.head_dim;
    const T* dout = static_cast<const T*>(p.dout) + row * p.head_dim;
    T* hi = static_cast<T*>(p.dout_hi) + row * p.head_dim;
    float y[kMaxPerLane], g[kMaxPerLane];
#pragma unroll
    for (int m = 0; m < kMaxPerLane; ++m) {
      const bool in = m < per_lane;
      y[m] = in ? refined_value<T>(to_float(out[lane + 32 * m]), refine[lane + 32 * m]) : 0.f;
      g[m] = in ? to_float(dout[lane + 32 * m]) : 0.f;
    }
    if (p.output == OUTPUT_EUCLIDEAN) {
      float dot = 0.f;
#pragma unroll
      for (int m = 0; m < kMaxPerLane; ++m) {
        if (m < per_lane) hi[lane + 32 * m] = from_float<T>(g[m]);
        dot = fmaf(g[m], y[m], dot);
      }
      dot = warp_sum(dot);
      if (lane == 0) {
        p.delta[row] = dot;
        p.dout0[row] = 0.f;
        p.dkap_rows[row] = 0.f;
      }
      continue;
    }
    const float o0_raw = p.o0[row];
    const bool valid = o0_raw > 0.f;
    const float w = valid ? o0_raw : 1.f;
    const float sk = sqrtf(kap);
    float gy = 0.f, y_sq = 0.f;
#pragma unroll
    for (int m = 0; m < kMaxPerLane; ++m) {
      if (!valid) y[m] = 0.f;
      gy = fmaf(g[m], y[m], gy);
      y_sq = fmaf(y[m], y[m], y_sq);
    }
    gy = warp_sum(gy);
    y_sq = warp_sum(y_sq);
    // dO_s = a_g·g + a_y·y, Ô_s = r_y·y, dO_0 (epilogue_pullback)
    float a_g, a_y, r_y, do_0;
    if (p.output == OUTPUT_LORENTZ) {
      const float y0_sq = kap + y_sq, y0 = sqrtf(y0_sq);
      a_g = y0 / w;
      a_y = gy / kap * a_g;
      r_y = w / y0;
      do_0 = -gy * y0_sq / (kap * w);
    } else if (p.output == OUTPUT_KLEIN) {
      a_g = sk / w;
      a_y = 0.f;
      r_y = w / sk;
      do_0 = -gy / w;
    } else {  // poincare
      const float a = fminf(y_sq / kap, 1.f - numerics::BALL_MARGIN_F32);
      a_g = 0.5f * sk * (1.f + a) / w;
      a_y = gy / (sk * (1.f - a)) * ((1.f + a) / w);
      r_y = 2.f * w / (sk * (1.f + a));
      do_0 = -gy * (1.f + a) / (w * (1.f - a));
    }
    T* lo = static_cast<T*>(p.dout_lo) + row * p.head_dim;
    float residue_dot = 0.f;
#pragma unroll
    for (int m = 0; m < kMaxPerLane; ++m) {
      const float d = valid ? fmaf(a_g, g[m], a_y * y[m]) : 0.f;
      const T d_hi = from_float<T>(d);
      const T d_lo = from_float<T>(d - to_float(d_hi));
      if (m < per_lane) {
        hi[lane + 32 * m] = d_hi;
        lo[lane + 32 * m] = d_lo;
      }
      residue_dot = fmaf((to_float(d_hi) + to_float(d_lo)) - d, r_y * y[m], residue_dot);
    }
    residue_dot = warp_sum(residue_dot);
    if (lane == 0) {
      p.delta[row] = residue_dot;
      p.dout0[row] = valid ? do_0 : 0.f;
      p.dkap_rows[row] = valid ? gy / (2.f * kap) : 0.f;
    }
  }
}

}  // namespace bwd

cudaError_t launch_bwd_prepare(const PrepareParams& p, bool is_bf16, cudaStream_t stream) {
  using bwd::kMaxPerLane;
  using bwd::kPrepareWarps;
  if (p.head_dim % 32 != 0 || p.head_dim > 32 * kMaxPerLane) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const unsigned grid = row_kernel_grid(p.rows, kPrepareWarps);
  if (is_bf16) {
    bwd::bwd_prepare_kernel<__nv_bfloat16><<<grid, kPrepareWarps * 32, 0, stream>>>(p);
  } else {
    bwd::bwd_prepare_kernel<__half><<<grid, kPrepareWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace hyptorch_flash
