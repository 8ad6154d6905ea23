// Backward step 3 on the GPU for the euclidean, lorentz_dot and distance scores: the gradients from the
// kernels' float32 contractions (bwd_params.cuh), D/4 lanes per row, four adjacent columns each.
// hyptorch_flash/ops/cuda_backward.py: finish_gradients is the same math in PyTorch (and still finishes the
// poincare_distance score); with κ = curvature of the query head h, q0 = √(κ + |q|²), likewise k0, v0:
//   dq_i = G_i − q_i·R_i/q0_i                          dκ share of row i:  −R_i/(2 q0_i)
//   dk_j = Σ_h Gk_hj − k_j·Σ_h C_hj/k0_hj                dκ share of (h, j):  −C_hj/(2 k0_hj) + dv0_hj/(2 v0_hj)
//   dv_j = Σ_h dVs_hj + v_j·Σ_h dv0_hj/v0_hj
// (Σ_h over the query heads of key head j's GQA group; euclidean: dq = G, dk = Σ Gk, dv = Σ dVs, no dκ).
// The per-row dκ shares are summed per head by the caller (a fixed order: the deterministic mode stays
// bit-identical). Outputs in the inputs' dtype (bf16, fp16 or float32), rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bwd_params.cuh"
#include "device_primitives.cuh"

namespace hyptorch_flash {
namespace bwd {

constexpr int kFinishWarps = 8;

// g + s·x per element (one rounding each)
__device__ __forceinline__ float4 fma4(float4 x, float s, float4 g) {
  return make_float4(fmaf(x.x, s, g.x), fmaf(x.y, s, g.y), fmaf(x.z, s, g.z), fmaf(x.w, s, g.w));
}

// Rows are handled by groups of kHeadDim / 4 lanes, four columns per lane (a warp holds 2 rows at D = 64, 1 at 128).
template <int kHeadDim>
struct RowLanes {
  static constexpr int kLanes = kHeadDim / 4;
  static constexpr int kRowsPerWarp = 32 / kLanes;
  static constexpr int kRowsPerBlock = kFinishWarps * kRowsPerWarp;
  __device__ static int64_t first_row() { return (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / kLanes; }
  __device__ static int64_t row_step() { return (int64_t)gridDim.x * kRowsPerBlock; }
  __device__ static int column() { return 4 * (threadIdx.x % kLanes); }
  __device__ static bool leader() { return threadIdx.x % kLanes == 0; }
};

// One lane group per query row (b, h, i) of B·H·N.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kFinishWarps * 32) bwd_finish_queries_kernel(const FinishParams p) {
  using L = RowLanes<kHeadDim>;
  const int64_t rows = (int64_t)p.batch * p.heads * p.n_queries;
  const int c = L::column();
  for (int64_t row = L::first_row(); row < rows; row += L::row_step()) {
    const int h = (int)((row / p.n_queries) % p.heads);
    float coef_q = 0.f;  // R_i / q0_i
    if (p.score != SCORE_EUCLIDEAN) {
      const float q0 = sqrtf(p.curvature[h] + p.q_sq[row]);
      const float r = p.row_acc[row * 2];
      coef_q = r / q0;
      if (L::leader()) p.dkap_q[row] = -r / (2.f * q0);
    }
    const float4 g = *reinterpret_cast<const float4*>(p.dq_acc + row * kHeadDim + c);
    const float4 q = load4(static_cast<const T*>(p.q) + row * kHeadDim + c);
    store4(static_cast<T*>(p.dq) + row * kHeadDim + c, fma4(q, -coef_q, g));
  }
}

// One lane group per key row (b, hk, j) of B·Hkv·M, summing over the query heads of hk's group.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kFinishWarps * 32) bwd_finish_keys_kernel(const FinishParams p) {
  using L = RowLanes<kHeadDim>;
  const int group = p.heads / p.kv_heads;
  const int64_t rows = (int64_t)p.batch * p.kv_heads * p.n_keys;
  const int c = L::column();
  for (int64_t row = L::first_row(); row < rows; row += L::row_step()) {
    const int64_t bhk = row / p.n_keys;
    const int j = (int)(row % p.n_keys);
    const int b = (int)(bhk / p.kv_heads), hk = (int)(bhk % p.kv_heads);
    float4 gk = make_float4(0.f, 0.f, 0.f, 0.f), gv = gk;
    float coef_k = 0.f, coef_v = 0.f;  // Σ_h C/k0, Σ_h dv0/v0
    for (int hh = 0; hh < group; ++hh) {
      const int h = hk * group + hh;
      const int64_t hrow = ((int64_t)b * p.heads + h) * p.n_keys + j;  // (b, h, j) of the per-query-head sums
      if (p.score != SCORE_EUCLIDEAN) {
        const float kap = p.curvature[h];
        const float k0 = sqrtf(kap + p.k_sq[row]), v0 = sqrtf(kap + p.v_sq[row]);
        const float cj = p.col_acc[hrow * 3], dv0 = p.col_acc[hrow * 3 + 2];
        coef_k += cj / k0;
        coef_v += dv0 / v0;
        if (L::leader()) p.dkap_k[hrow] = -cj / (2.f * k0) + dv0 / (2.f * v0);
      }
      const float4 a = *reinterpret_cast<const float4*>(p.dk_acc + hrow * kHeadDim + c);
      const float4 d = *reinterpret_cast<const float4*>(p.dv_acc + hrow * kHeadDim + c);
      gk = make_float4(gk.x + a.x, gk.y + a.y, gk.z + a.z, gk.w + a.w);
      gv = make_float4(gv.x + d.x, gv.y + d.y, gv.z + d.z, gv.w + d.w);
    }
    const float4 k = load4(static_cast<const T*>(p.k) + row * kHeadDim + c);
    const float4 v = load4(static_cast<const T*>(p.v) + row * kHeadDim + c);
    store4(static_cast<T*>(p.dk) + row * kHeadDim + c, fma4(k, -coef_k, gk));
    store4(static_cast<T*>(p.dv) + row * kHeadDim + c, fma4(v, coef_v, gv));
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_finish(const FinishParams& p, cudaStream_t stream) {
  const int64_t rows[2] = {(int64_t)p.batch * p.heads * p.n_queries, (int64_t)p.batch * p.kv_heads * p.n_keys};
  for (int which = 0; which < 2; ++which) {
    if (rows[which] == 0) continue;
    const unsigned grid = row_kernel_grid(rows[which], RowLanes<kHeadDim>::kRowsPerBlock);
    if (which == 0) {
      bwd_finish_queries_kernel<T, kHeadDim><<<grid, kFinishWarps * 32, 0, stream>>>(p);
    } else {
      bwd_finish_keys_kernel<T, kHeadDim><<<grid, kFinishWarps * 32, 0, stream>>>(p);
    }
  }
  return cudaGetLastError();
}

}  // namespace bwd

cudaError_t launch_bwd_finish(const FinishParams& p, BwdDtype dtype, cudaStream_t stream) {
  if (p.score == SCORE_POINCARE || p.heads % p.kv_heads != 0) return cudaErrorInvalidValue;
  if (p.head_dim == 64) {
    if (dtype == BWD_BF16) return bwd::launch_finish<__nv_bfloat16, 64>(p, stream);
    if (dtype == BWD_FP16) return bwd::launch_finish<__half, 64>(p, stream);
    return bwd::launch_finish<float, 64>(p, stream);
  }
  if (p.head_dim == 128) {
    if (dtype == BWD_BF16) return bwd::launch_finish<__nv_bfloat16, 128>(p, stream);
    if (dtype == BWD_FP16) return bwd::launch_finish<__half, 128>(p, stream);
    return bwd::launch_finish<float, 128>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hyptorch_flash
