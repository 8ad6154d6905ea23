// Backward step 1 on the GPU: pull the upstream gradient back through the centroid epilogue, D/4 lanes
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

// Sum over the kLanes consecutive lanes that hold one row (every lane of the warp takes part).
template <int kLanes>
__device__ __forceinline__ float row_group_sum(float x) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// kHeadDim / 4 lanes per row, four adjacent columns each (8-byte loads and stores; 2 rows per warp at D = 64,
// 1 at 128, like bwd_squares.cu); every lane of a warp runs the same iterations (the shuffles need the whole
// warp), lanes of rows past the end compute on zeros and store nothing.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kPrepareWarps * 32) bwd_prepare_kernel(const PrepareParams p) {
  constexpr int kLanes = kHeadDim / 4, kRowsPerWarp = 32 / kLanes;
  const int lane = threadIdx.x & 31, sub = lane / kLanes, c = 4 * (lane % kLanes);
  const bool leader = lane % kLanes == 0;
  const int64_t warp = (int64_t)blockIdx.x * kPrepareWarps + (threadIdx.x >> 5);
  const int64_t n_warps = (int64_t)gridDim.x * kPrepareWarps;
  for (int64_t base = warp * kRowsPerWarp; base < p.rows; base += n_warps * kRowsPerWarp) {
    const int64_t row = base + sub;
    const bool in = row < p.rows;
    const int64_t at = (in ? row : 0) * kHeadDim + c;
    float y[4] = {0.f, 0.f, 0.f, 0.f}, g[4] = {0.f, 0.f, 0.f, 0.f};
    if (in) {
      const float4 o = load4(static_cast<const T*>(p.out) + at), d = load4(static_cast<const T*>(p.dout) + at);
      const char4 r = *reinterpret_cast<const char4*>(p.out_refine + at);
      y[0] = refined_value<T>(o.x, r.x);
      y[1] = refined_value<T>(o.y, r.y);
      y[2] = refined_value<T>(o.z, r.z);
      y[3] = refined_value<T>(o.w, r.w);
      g[0] = d.x, g[1] = d.y, g[2] = d.z, g[3] = d.w;
    }
    T* hi = static_cast<T*>(p.dout_hi) + at;
    if (p.output == OUTPUT_EUCLIDEAN) {
      float dot = 0.f;
#pragma unroll
      for (int m = 0; m < 4; ++m) dot = fmaf(g[m], y[m], dot);
      dot = row_group_sum<kLanes>(dot);
      if (in) {
        store4(hi, make_float4(g[0], g[1], g[2], g[3]));
        if (leader) {
          p.delta[row] = dot;
          p.dout0[row] = 0.f;
          p.dkap_rows[row] = 0.f;
        }
      }
      continue;
    }
    const int h = (int)(((in ? row : 0) / p.n_queries) % p.heads);
    const float kap = p.curvature[h];
    const float o0_raw = in ? p.o0[row] : 0.f;
    const bool valid = o0_raw > 0.f;
    const float w = valid ? o0_raw : 1.f;
    const float sk = sqrtf(kap);
    float gy = 0.f, y_sq = 0.f;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      if (!valid) y[m] = 0.f;
      gy = fmaf(g[m], y[m], gy);
      y_sq = fmaf(y[m], y[m], y_sq);
    }
    gy = row_group_sum<kLanes>(gy);
    y_sq = row_group_sum<kLanes>(y_sq);
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
    float d_hi[4], d_lo[4], residue_dot = 0.f;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const float d = valid ? fmaf(a_g, g[m], a_y * y[m]) : 0.f;
      d_hi[m] = to_float(from_float<T>(d));
      d_lo[m] = to_float(from_float<T>(d - d_hi[m]));
      residue_dot = fmaf((d_hi[m] + d_lo[m]) - d, r_y * y[m], residue_dot);
    }
    residue_dot = row_group_sum<kLanes>(residue_dot);
    if (in) {
      store4(hi, make_float4(d_hi[0], d_hi[1], d_hi[2], d_hi[3]));  // (exact: the values are already T's)
      store4(static_cast<T*>(p.dout_lo) + at, make_float4(d_lo[0], d_lo[1], d_lo[2], d_lo[3]));
      if (leader) {
        p.delta[row] = residue_dot;
        p.dout0[row] = valid ? do_0 : 0.f;
        p.dkap_rows[row] = valid ? gy / (2.f * kap) : 0.f;
      }
    }
  }
}

template <typename T>
void launch_prepare(const PrepareParams& p, cudaStream_t stream) {
  const unsigned grid = row_kernel_grid(p.rows, kPrepareWarps * (128 / p.head_dim));  // (2 rows per warp at D = 64)
  if (p.head_dim == 64) {
    bwd_prepare_kernel<T, 64><<<grid, kPrepareWarps * 32, 0, stream>>>(p);
  } else {
    bwd_prepare_kernel<T, 128><<<grid, kPrepareWarps * 32, 0, stream>>>(p);
  }
}

}  // namespace bwd

cudaError_t launch_bwd_prepare(const PrepareParams& p, bool is_bf16, cudaStream_t stream) {
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (is_bf16) {
    bwd::launch_prepare<__nv_bfloat16>(p, stream);
  } else {
    bwd::launch_prepare<__half>(p, stream);
  }
  return cudaGetLastError();
}

}  // namespace hyptorch_flash
