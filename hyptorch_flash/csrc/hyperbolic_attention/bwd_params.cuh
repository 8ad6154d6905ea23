// Torch-free interface of the fused hyperbolic attention backward (DESIGN.md §3, FlashAttention-2
// Algorithm 2). binding_bwd.cpp fills BwdParams from tensors; bwd_hd<D>_<dtype>.cu launch the kernels.
//
// The kernels do not finish the gradients. They produce, per query head, the O(N·D) contractions of
// dX_ij = ∂L/∂X_ij (X = the variant's inner quantity, see bwd_kernel.cuh) that every gradient is a
// short per-row formula of (hyptorch_flash/ops/cuda_backward.py: finish_gradients):
//   dq_acc  G_i  = Σ_j dX_ij k_j        row_acc (R_i, RX_i) = Σ_j dX_ij (w_j, X_ij)
//   dk_acc  Gk_j = Σ_i dX_ij q_i        col_acc (C_j, CX_j, dv0_j) = (Σ_i dX_ij w_i, Σ_i dX_ij X_ij, Σ_i P_ij dO0_i)
//   dv_acc  Σ_i P_ij dO_s,i             scalars (s1, s2) per (batch, head, key block)
// with w = the time coordinate (lorentz_dot, distance) or 1 (poincare), u = s/coef, s1 = Σ dS_ij u_ij,
// s2 = Σ dX_ij X_ij (distance) or ∂L/∂c at fixed p, q = Σ dX_ij X_ij (1/c + |p_i|² a_i + |q_j|² b_j) (poincare).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "attention_ids.h"

namespace hyptorch_flash {

struct BwdParams {
  // Space coordinates, contiguous: q and dout_s (B, H, N, D), k and v (B, Hkv, M, D).
  // dout_s is the space part of dO_L, the upstream gradient pulled back through the centroid epilogue.
  const void* q;
  const void* k;
  const void* v;
  const void* dout_s;
  // dO_s − dout_s rounded to the same dtype (so dO_s ≈ dout_s + dout_lo to ~16 bits), or nullptr when
  // dout_s is exact (the euclidean output: dO = dout).
  const void* dout_lo;
  // Split float32 inputs (launch dtype BWD_FP32_SPLIT): q, k, v and dout_s each point at part 0 of three
  // bf16 parts x = hi + mid + lo, part p at p · q_part_stride (q, dout_s) or kv_part_stride (k, v)
  // elements; dout_lo is nullptr. Unused otherwise.
  int64_t q_part_stride;
  int64_t kv_part_stride;
  // Per query row (B, H, N) float32: log-sum-exp (−inf = no visible key), D_i = rowsum(dO_L ∘ O_L),
  // dO_L0 (time part of dO_L), |q|².
  const float* lse;
  const float* delta;
  const float* dout0;
  const float* q_sq;
  // Per key (B, Hkv, M) float32: |k|², |v|².
  const float* k_sq;
  const float* v_sq;
  // Per query head (H,) float32: curvature k_h > 0 and the score coefficient (scale or β).
  const float* curvature;
  const float* coef;
  // (B, M) uint8, nonzero = padded key; nullptr when there is no padding mask.
  const uint8_t* key_padding;
  // Outputs (float32), see the header comment. dq_acc and row_acc must be zeroed when dq_atomic.
  float* dq_acc;           // (B, H, N, D)
  float* row_acc;          // (B, H, N, 2)
  float* dk_acc;           // (B, H, M, D)
  float* dv_acc;           // (B, H, M, D)
  float* col_acc;          // (B, H, M, 3)
  float* scalar_partials;  // (B, H, ceil(M / kBwdBlockN), 2)
  float* delta_acc;        // (B, H, N) the delta pass's D_i = Σ_j P_ij dP_ij (stage 2)
  int batch, heads, kv_heads, n_queries, n_keys;
  int score;  // 0 euclidean, 1 lorentz_dot, 2 distance, 3 poincare_distance
  bool causal;
  bool squared;
  // true: the key-parallel kernel adds dQ with fp32 atomics; false (deterministic): a query-parallel
  // kernel computes dQ and the row sums without atomics.
  bool dq_atomic;
  float acosh_eps;
};

// Key tile height of the key-parallel kernel (scalar_partials has one entry per key tile).
constexpr int kBwdBlockN = 64;

// Step 1 of the backward (bwd_prepare.cu): the upstream gradient pulled back through the centroid
// epilogue, per query row (B·H·N rows of head_dim ∈ {32, 64, 96, 128} values; contiguous).
struct PrepareParams {
  const void* out;         // (rows, head_dim) the forward's output, bf16/fp16
  const int8_t* out_refine;  // (rows, head_dim) its refinement codes (the forward's refine_output output)
  const float* o0;         // (rows,) the forward's O_0
  const void* dout;        // (rows, head_dim) upstream gradient, bf16/fp16
  const float* curvature;  // (heads,)
  void* dout_hi;           // (rows, head_dim) outputs, the inputs' dtype
  void* dout_lo;           // unused (may be nullptr) for the euclidean output
  float* dout0;            // (rows,)
  float* delta;            // (rows,)
  float* dkap_rows;        // (rows,) the epilogue's curvature gradient per row
  int64_t rows;
  int n_queries, heads, head_dim;
  int output;  // OutputId
};

cudaError_t launch_bwd_prepare(const PrepareParams& params, bool is_bf16, cudaStream_t stream);

// Grid of the grid-stride row kernels (prepare, finish, squares): enough blocks of rows_per_block rows for every
// row, at most 2^20 (the blocks then loop over the rest).
inline unsigned row_kernel_grid(int64_t rows, int64_t rows_per_block) {
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return (unsigned)(blocks < (1 << 20) ? blocks : (1 << 20));
}

// Operand types of the backward kernels: bf16, fp16, or float32 split into three bf16 parts.
enum BwdDtype : int { BWD_BF16 = 0, BWD_FP16 = 1, BWD_FP32_SPLIT = 2 };

// Launches stage 1 (the gradient contractions) or, for split inputs and the poincare_distance score,
// stage 2 (the delta pass, fills delta_acc; run with delta = 0 before stage 1) for the operand type and
// head dim on `stream`.
cudaError_t launch_attention_bwd(const BwdParams& params, int head_dim, BwdDtype dtype, int stage, cudaStream_t stream);

// Step 3 of the backward (bwd_finish.cu) for the euclidean, lorentz_dot and distance scores: dq, dk, dv from
// stage 1's contractions (this header's comment) and the inputs, and the per-row shares of dκ.
struct FinishParams {
  const float* dq_acc;   // (B, H, N, D)  stage 1's outputs
  const float* row_acc;  // (B, H, N, 2)
  const float* dk_acc;   // (B, H, M, D)
  const float* dv_acc;   // (B, H, M, D)
  const float* col_acc;  // (B, H, M, 3)
  const void* q;         // (B, H, N, D) the inputs, bf16/fp16/float32 (float32: the unsplit values)
  const void* k;         // (B, Hkv, M, D)
  const void* v;         // (B, Hkv, M, D)
  const float* q_sq;     // (B, H, N)
  const float* k_sq;     // (B, Hkv, M)
  const float* v_sq;     // (B, Hkv, M)
  const float* curvature;  // (H,)
  void* dq;              // outputs in the inputs' dtype, shaped like q, k, v
  void* dk;
  void* dv;
  float* dkap_q;  // (B, H, N) −R_i/(2 q0_i) (not written for the euclidean score)
  float* dkap_k;  // (B, H, M) −C_j/(2 k0_j) + dv0_j/(2 v0_j) per query head (likewise)
  int batch, heads, kv_heads, n_queries, n_keys, head_dim;
  int score;  // ScoreId other than SCORE_POINCARE
};

// dtype: BWD_BF16, BWD_FP16, or BWD_FP32_SPLIT for float32 inputs (q, k, v as float32 tensors here).
cudaError_t launch_bwd_finish(const FinishParams& params, BwdDtype dtype, cudaStream_t stream);

// |x_r|² (float32) per row of a contiguous (rows, head_dim) tensor x, head_dim ∈ {64, 128} (bwd_squares.cu);
// dtype as for launch_bwd_finish.
cudaError_t launch_row_squares(const void* x, float* out, int64_t rows, int head_dim, BwdDtype dtype,
                               cudaStream_t stream);

}  // namespace hyptorch_flash
