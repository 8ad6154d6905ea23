// Backward step 3 on the GPU for the euclidean, lorentz_dot and distance scores: the gradients from the
// kernels' float32 contractions (bwd_params.cuh), one warp per row, each lane two adjacent columns per 64.
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

namespace hyptorch_flash {
namespace bwd {

constexpr int kFinishWarps = 8;

// Two adjacent elements of the inputs' dtype ↔ float2.
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x));
}
__device__ __forceinline__ float2 load_pair(const __half* x) { return __half22float2(*reinterpret_cast<const __half2*>(x)); }
__device__ __forceinline__ float2 load_pair(const float* x) { return *reinterpret_cast<const float2*>(x); }
__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float2 x) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __float22bfloat162_rn(x);
}
__device__ __forceinline__ void store_pair(__half* dst, float2 x) { *reinterpret_cast<__half2*>(dst) = __float22half2_rn(x); }
__device__ __forceinline__ void store_pair(float* dst, float2 x) { *reinterpret_cast<float2*>(dst) = x; }

// One warp per query row (b, h, i) of B·H·N.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kFinishWarps * 32) bwd_finish_queries_kernel(const FinishParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = (int64_t)p.batch * p.heads * p.n_queries;
  const int64_t n_warps = (int64_t)gridDim.x * kFinishWarps;
  for (int64_t row = (int64_t)blockIdx.x * kFinishWarps + (threadIdx.x >> 5); row < rows; row += n_warps) {
    const int h = (int)((row / p.n_queries) % p.heads);
    float coef_q = 0.f;  // R_i / q0_i
    if (p.score != SCORE_EUCLIDEAN) {
      const float q0 = sqrtf(p.curvature[h] + p.q_sq[row]);
      const float r = p.row_acc[row * 2];
      coef_q = r / q0;
      if (lane == 0) p.dkap_q[row] = -r / (2.f * q0);
    }
    const float* g = p.dq_acc + row * kHeadDim;
    const T* q = static_cast<const T*>(p.q) + row * kHeadDim;
    T* dq = static_cast<T*>(p.dq) + row * kHeadDim;
#pragma unroll
    for (int c = 2 * lane; c < kHeadDim; c += 64) {
      const float2 gc = *reinterpret_cast<const float2*>(g + c), qc = load_pair(q + c);
      store_pair(dq + c, make_float2(fmaf(-qc.x, coef_q, gc.x), fmaf(-qc.y, coef_q, gc.y)));
    }
  }
}

// One warp per key row (b, hk, j) of B·Hkv·M, summing over the query heads of hk's group.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kFinishWarps * 32) bwd_finish_keys_kernel(const FinishParams p) {
  const int lane = threadIdx.x & 31;
  const int group = p.heads / p.kv_heads;
  const int64_t rows = (int64_t)p.batch * p.kv_heads * p.n_keys;
  const int64_t n_warps = (int64_t)gridDim.x * kFinishWarps;
  constexpr int kPairs = kHeadDim / 64;
  for (int64_t row = (int64_t)blockIdx.x * kFinishWarps + (threadIdx.x >> 5); row < rows; row += n_warps) {
    const int64_t bhk = row / p.n_keys;
    const int j = (int)(row % p.n_keys);
    const int b = (int)(bhk / p.kv_heads), hk = (int)(bhk % p.kv_heads);
    float2 gk[kPairs], gv[kPairs];
#pragma unroll
    for (int m = 0; m < kPairs; ++m) gk[m] = gv[m] = make_float2(0.f, 0.f);
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
        if (lane == 0) p.dkap_k[hrow] = -cj / (2.f * k0) + dv0 / (2.f * v0);
      }
#pragma unroll
      for (int m = 0; m < kPairs; ++m) {
        const int c = 2 * lane + 64 * m;
        const float2 a = *reinterpret_cast<const float2*>(p.dk_acc + hrow * kHeadDim + c);
        const float2 d = *reinterpret_cast<const float2*>(p.dv_acc + hrow * kHeadDim + c);
        gk[m].x += a.x, gk[m].y += a.y, gv[m].x += d.x, gv[m].y += d.y;
      }
    }
    const T* k = static_cast<const T*>(p.k) + row * kHeadDim;
    const T* v = static_cast<const T*>(p.v) + row * kHeadDim;
    T* dk = static_cast<T*>(p.dk) + row * kHeadDim;
    T* dv = static_cast<T*>(p.dv) + row * kHeadDim;
#pragma unroll
    for (int m = 0; m < kPairs; ++m) {
      const int c = 2 * lane + 64 * m;
      const float2 kc = load_pair(k + c), vc = load_pair(v + c);
      store_pair(dk + c, make_float2(fmaf(-kc.x, coef_k, gk[m].x), fmaf(-kc.y, coef_k, gk[m].y)));
      store_pair(dv + c, make_float2(fmaf(vc.x, coef_v, gv[m].x), fmaf(vc.y, coef_v, gv[m].y)));
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_finish(const FinishParams& p, cudaStream_t stream) {
  const int64_t rows[2] = {(int64_t)p.batch * p.heads * p.n_queries, (int64_t)p.batch * p.kv_heads * p.n_keys};
  for (int which = 0; which < 2; ++which) {
    if (rows[which] == 0) continue;
    const int64_t blocks = (rows[which] + kFinishWarps - 1) / kFinishWarps;
    const unsigned grid = (unsigned)(blocks < (1 << 20) ? blocks : (1 << 20));
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
