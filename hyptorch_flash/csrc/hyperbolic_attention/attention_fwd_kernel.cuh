// Fused hyperbolic attention forward: FlashAttention-2 (Dao 2023, Algorithm 1) on tensor cores,
// with the hyperbolic parts of DESIGN.md §2-§3 in float32.
//
// Notation of the FA2 paper: the query tile Q_i (kBlockM rows), key/value tiles K_j, V_j (kBlockN
// rows), scores S_ij, probabilities P_ij, row state m_i (running max), l_i (running sum), the output
// accumulator O_i and the log-sum-exp L_i. Scores are kept in the exp2 domain (S·log2 e), so each
// probability costs one ex2.
//
// Layout: one CTA = 4 warps = one query tile of one (batch, head), 16·kRowTiles rows per warp (split-Q,
// no inter-warp reduction): 32 rows (two m16 tiles) except for arccosh scores at D = 64 (16 rows, more
// warps per SM). Key tiles are 64 keys for D = 64 and 32 for D = 128 (S and O share 255 registers); see
// FwdTile. K_j/V_j rotate through shared-memory buffers filled by cp.async, in the 128-byte XOR swizzle
// (swizzled()). bf16/fp16 on sm_90a (Hopper): S_ij = Q_i K_jᵀ and O_i += P_ij V_j are warpgroup MMAs
// (wgmma.m64nNk16, fp32 accumulate; Q, K, V read from shared memory through descriptors, P from
// registers), and at D = 64 P_ij V_j runs while the softmax of the next tile is computed (FlashAttention-3's
// intra-warpgroup overlap). Elsewhere (other GPUs, split float32 inputs) they run on mma.sync.m16n8k16
// with ldmatrix fragments. Either way the S fragment is reused as the A operand of P·V.
//
// Hyperbolic parts (all float32): the time coordinates q0 = sqrt(k + |q|²), k0, v0 are recomputed
// from the space coordinates (the key-side ones once per call by key_records_kernel); the rank-1
// Minkowski term scale·q0·k0ᵀ is subtracted from the tensor-core tile; O_0 = Σ_j P_ij v0_j is an
// fp32 row reduction (with wgmma and dot-product scores: 8 more columns of the P·V product, TimeBlock); the
// epilogue maps O = [O_0 | O_s] to the centroid in the chosen model.
#pragma once

#include <cstdint>
#include <math_constants.h>
#include <type_traits>

#include "attention_fwd.h"
#include "device_primitives.cuh"
#include "hopper_primitives.cuh"
#include "numerics.cuh"

// Hopper warpgroup MMA for the bf16/fp16 GEMMs where the build targets sm_90a (the JIT build does on an
// H100: hyptorch_flash/ops/cuda_build.py); -DHYPTORCH_FWD_WGMMA=0 keeps mma.sync there too (to test it).
#ifndef HYPTORCH_FWD_WGMMA
#define HYPTORCH_FWD_WGMMA 1
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HYPTORCH_FWD_WGMMA
constexpr bool kFwdWgmmaArch = true;
#else
constexpr bool kFwdWgmmaArch = false;
#endif

// D = 128, bf16/fp16: 1 warpgroup of 2 × 64 query rows per CTA with 32-key tiles (default; S and O share 255
// registers), or 2 warpgroups (8 warps) of 64 rows each with 64-key tiles and the wgmma pipeline: on an H100 as
// fast for inference and ~10% slower for the backward's hi + lo variant (benchmarks/RESULTS.md, session 8).
#ifndef HYPTORCH_FWD_WARPGROUPS_D128
#define HYPTORCH_FWD_WARPGROUPS_D128 1
#endif
#define HYPTORCH_FWD_BLOCK_N_D128_DEFAULT (32 * HYPTORCH_FWD_WARPGROUPS_D128)
// The wgmma pipeline also at D = 128 with one warpgroup (see `pipelined`): 340.5 vs 328.2 TFLOP/s on an H200
// (bf16, B=2, H=16, N=4096; benchmarks/RESULTS.md, session 9); -DHYPTORCH_FWD_PIPELINE_D128=0 turns it off.
#ifndef HYPTORCH_FWD_PIPELINE_D128
#define HYPTORCH_FWD_PIPELINE_D128 1
#endif
#ifndef HYPTORCH_FWD_BLOCK_N_D64
#define HYPTORCH_FWD_BLOCK_N_D64 64
#endif
// wgmma descriptors of each k-step as the tile's descriptor plus an offset (smem_desc_lo / smem_desc_at:
// one 32-bit add instead of masking and shifting each address; about 70 of the ~600 instructions per key
// tile of the D = 64 loop are descriptor arithmetic). Same descriptors; opt-in until timed on a GPU.
#ifndef HYPTORCH_FWD_DESC_LO
#define HYPTORCH_FWD_DESC_LO 0
#endif
// The forward for the backward (P·V with P as hi + lo, not pipelined) with wgmma: both terms' A fragments formed
// first and their products issued as one group, waited for once, instead of hi issued, waited for, then lo formed,
// issued and waited for (the lo fragments take the registers of the score tile, dead by then). Same products in the
// same order (the same O). Opt-in (-DHYPTORCH_FWD_HILO_ONE_GROUP=1): compile-checked, not yet run on a GPU.
#ifndef HYPTORCH_FWD_HILO_ONE_GROUP
#define HYPTORCH_FWD_HILO_ONE_GROUP 0
#endif
#ifndef HYPTORCH_FWD_BLOCK_N_D128
#define HYPTORCH_FWD_BLOCK_N_D128 HYPTORCH_FWD_BLOCK_N_D128_DEFAULT
#endif
#ifndef HYPTORCH_FWD_ROW_TILES_D64
#define HYPTORCH_FWD_ROW_TILES_D64 2
#endif
#ifndef HYPTORCH_FWD_ROW_TILES_D64_DISTANCE
#define HYPTORCH_FWD_ROW_TILES_D64_DISTANCE 1
#endif
#ifndef HYPTORCH_FWD_ROW_TILES_D128
#define HYPTORCH_FWD_ROW_TILES_D128 (3 - HYPTORCH_FWD_WARPGROUPS_D128)
#endif

namespace hyptorch_flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLazyMaxLog2 = 8.f;  // see softmax_tile
constexpr float kLn2 = 0.6931471805599453f;

// The time block (bf16/fp16, dot-product scores on sm_90a): 8 columns per key, [v0 hi, v0 mid, v0 lo, 0, …, 0],
// appended to V_j as the columns D … D + 7 of the P·V warpgroup MMA, so that the tensor cores also
// accumulate O_0 = Σ_j P_ij v0_j, with the same rounded P as O_s (instead of an unpack and an FMA per score
// on the CUDA cores). Written per key by key_records_kernel (p.key_time_block, 16 bytes a key). l_i = Σ_j P_ij
// stays an fp32 sum of the unrounded P: the log-sum-exp is an output, and the rounded P's sum is ~2^-9 off.
struct TimeBlock {
  static constexpr int kCols = 8;
};

// Per-key record fields (rows of key_records, each Mpad floats long).
//   A: k0 (lorentz_dot, distance) or |k|² (poincare)      B: b_j = 1/(1 − c|k|²) (poincare)
//   V0: time coordinate of the lifted value / VS           VS: value scale (poincare lift 2/(1 − c|v|²), else 1)
//   BIAS: 0 or −inf (padded key or j ≥ M)
enum KeyRecordField : int { REC_A = 0, REC_B = 1, REC_V0 = 2, REC_VS = 3, REC_BIAS = 4 };

// Sums of squares behind the time coordinates x0 = sqrt(k + |x|²): float64 for split float32 inputs.
// x0² − |x|² = k cancels by orders of magnitude at large norms (in the scores' q0·k0 − q·k and the
// centroid's O0² − |Os|²), so float32 results need |x|² and x0 correctly rounded, not a few ulps off.
template <int kParts>
using SqAcc = std::conditional_t<(kParts > 1), double, float>;

// ---------------------------------------------------------------------------------------------
// Prologue: per (batch, query head, key j < Mpad) the key's record. Per query head because the
// curvature is per query head (a GQA key/value head is shared by heads of different k).
// kLanes = D/8 lanes per key, each loading one 16-byte chunk of k_j and of v_j (of each of the kParts
// parts of a split float32 input, summed in fp32 before squaring).
// ---------------------------------------------------------------------------------------------
template <typename T, int kLanes, int kParts>
__global__ void __launch_bounds__(256) key_records_kernel(const FwdParams p) {
  constexpr int kKeysPerBlock = 256 / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int j = blockIdx.x * kKeysPerBlock + threadIdx.x / kLanes;
  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const bool real = j < p.n_keys;
  SqAcc<kParts> k_sq = 0, v_sq = 0;
  if (real) {
    const T* k_row = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head + j * p.k_stride.row;
    const T* v_row = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head + j * p.v_stride.row;
    float kx[8] = {}, vx[8] = {};
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const uint4 kc = reinterpret_cast<const uint4*>(k_row + part * p.k_stride.part)[lane];
      const uint4 vc = reinterpret_cast<const uint4*>(v_row + part * p.v_stride.part)[lane];
      const uint32_t kw[4] = {kc.x, kc.y, kc.z, kc.w}, vw[4] = {vc.x, vc.y, vc.z, vc.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 kf = unpack2<T>(kw[e]), vf = unpack2<T>(vw[e]);
        kx[2 * e] += kf.x, kx[2 * e + 1] += kf.y, vx[2 * e] += vf.x, vx[2 * e + 1] += vf.y;
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      k_sq = fma(SqAcc<kParts>(kx[e]), SqAcc<kParts>(kx[e]), k_sq);
      v_sq = fma(SqAcc<kParts>(vx[e]), SqAcc<kParts>(vx[e]), v_sq);
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) {
    k_sq += __shfl_xor_sync(0xffffffffu, k_sq, off);
    v_sq += __shfl_xor_sync(0xffffffffu, v_sq, off);
  }
  if (lane != 0 || j >= p.n_keys_padded) return;
  float* rec = p.key_records + (size_t)bh * kKeyRecordFields * p.n_keys_padded + j;
  const size_t stride = p.n_keys_padded;
  const float kh = p.curvature[h];
  // Tile padding (j ≥ M): never visible (bias −inf), finite everywhere, zero value weight.
  float a = 0.f, bcoef = 1.f, v0 = 0.f, vscale = real ? 1.f : 0.f;
  if (real && (p.score == SCORE_LORENTZ_DOT || p.score == SCORE_DISTANCE)) {
    a = (float)sqrt(kh + k_sq);   // k0
    v0 = (float)sqrt(kh + v_sq);  // v0
  } else if (real && p.score == SCORE_POINCARE) {
    // Lift identity (DESIGN.md §2.3), c = 1/k, c|p|² clamped below 1 − margin
    const float c = 1.f / kh, top = 1.f - numerics::BALL_MARGIN_F32;
    a = (float)k_sq;
    bcoef = 1.f / (1.f - fminf(c * a, top));
    const float av = fminf((float)v_sq / kh, top), inv = 1.f / (1.f - av);
    vscale = 2.f * inv;  // Lorentz lift of a ball point: xs = 2p/(1 − a), x0 = sqrt(k)(1 + a)/(1 − a)
    // stored as x0/vscale: the kernel weighs it with the same rounded P·vscale that multiplies p
    v0 = 0.5f * sqrtf(kh) * (1.f + av);
    if (kParts > 1 && av < top) {
      // float32: the time part of the point the tensor cores see, vscale·(v0, p) with vscale as rounded,
      // so that (vscale·v0)² − |vscale·p|² = k holds to float64 before v0 is rounded
      v0 = (float)sqrt(kh / ((SqAcc<kParts>)vscale * vscale) + v_sq);
    }
  }
  const bool padded = !real || (p.key_padding != nullptr && p.key_padding[(size_t)b * p.n_keys + j] != 0);
  rec[REC_A * stride] = a;
  rec[REC_B * stride] = bcoef;
  rec[REC_V0 * stride] = v0;
  rec[REC_VS * stride] = vscale;
  rec[REC_BIAS * stride] = padded ? -CUDART_INF_F : 0.f;
  if (kParts == 1 && (p.score == SCORE_LORENTZ_DOT || p.score == SCORE_EUCLIDEAN)) {
    // The key's row of the time block (TimeBlock): v0 as the sum of three T-rounded parts (~3× the
    // precision of T, so that O_0 is float32-accurate).
    float parts[3];
    float rest = v0;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      parts[c] = to_float(from_float<T>(rest));
      rest -= parts[c];  // exact: the rounding residue is representable
    }
    const uint4 packed = {pack2<T>(parts[0], parts[1]), pack2<T>(parts[2], 0.f), 0u, 0u};
    reinterpret_cast<uint4*>(p.key_time_block)[(size_t)bh * p.n_keys_padded + j] = packed;
  }
}

// ---------------------------------------------------------------------------------------------
// Main kernel.
//   T: __nv_bfloat16 or __half; kHeadDim: 64 or 128;
//   kDistance: false = dot-product scores (euclidean, lorentz_dot), true = arccosh scores
//   (distance, poincare_distance). The rest (variant inside a family, output model, causal,
//   squared) are run-time switches, uniform over the CTA.
// ---------------------------------------------------------------------------------------------
// Tile shapes, chosen by measurement on an H100 (bf16, B=2, H=16, N=4096; benchmarks/RESULTS.md) and
// overridable with -D for tuning (hyptorch_flash/ops/cuda_build.py, $HYPTORCH_FLASH_NVCC_EXTRA):
// dot scores run best with 32 rows per warp (every K/V fragment feeds 2 mma; 234-252 registers, 2 CTAs/SM);
// arccosh scores at D = 64 are bound by the special-function unit (3 MUFU ops per score) and run best
// with 16 rows per warp (128 registers, 4 CTAs/SM, more warps to hide latency).
// Split float32 inputs (kParts = 3) hold three bf16 copies of every tile in shared memory and issue six
// mma per product (below): 16 rows per warp and shorter key tiles keep 2 CTAs per SM.
template <int kHeadDim, bool kDistance, int kParts = 1>
struct FwdTile {
  // warpgroups (4 warps each) per CTA, every one with its own query rows (kRowTiles m64 tiles with wgmma)
  static constexpr int kWarpgroups = kParts == 1 && kHeadDim > 64 ? HYPTORCH_FWD_WARPGROUPS_D128 : 1;
  static constexpr int kWarps = 4 * kWarpgroups;
  // m16 tiles per warp: each K/V fragment read from smem feeds kRowTiles mma
  static constexpr int kRowTiles = kParts > 1     ? 1
                                   : kHeadDim > 64 ? HYPTORCH_FWD_ROW_TILES_D128
                                   : kDistance     ? HYPTORCH_FWD_ROW_TILES_D64_DISTANCE
                                                   : HYPTORCH_FWD_ROW_TILES_D64;
  static constexpr int kBlockM = kWarps * kRowTiles * 16;  // query rows per CTA
  // keys per tile (registers: S is 2·kBlockN/8·4 floats); overridable for tuning experiments
  static constexpr int kBlockN = kParts > 1       ? (kHeadDim <= 64 ? 32 : 16)
                                 : kHeadDim <= 64 ? HYPTORCH_FWD_BLOCK_N_D64
                                                  : HYPTORCH_FWD_BLOCK_N_D128;
  static constexpr int kThreads = kWarps * 32;
  // CTAs per SM the register budget must allow (1: up to 255 registers; 3: up to 168)
  // (split float32: 2, up to 255 registers for the tile-local P·V sums; D = 128 fits 2 CTAs in shared memory)
  static constexpr int kMinBlocks = kParts > 1 ? 2 : kWarpgroups > 1 || kRowTiles > 1 ? 1 : 3;
  static constexpr int kChunks = kHeadDim / 8;       // 16-byte chunks per row
  static constexpr int kSteps = kHeadDim / 16;       // k-steps of Q Kᵀ
  static constexpr int kScoreTiles = kBlockN / 8;    // n8 tiles of S
  static constexpr int kOutTiles = kHeadDim / 8;     // n8 tiles of O
  static constexpr int kRows = kRowTiles * 2;        // rows per thread (g and g + 8 of each m16 tile)
  // bf16/fp16: + 1 KiB so the tiles can start on a 1024-byte boundary (wgmma's 128-byte swizzle atoms)
  static constexpr int kAlignSlack = kParts == 1 ? 1024 : 0;
  // K/V buffers: 3 for bf16/fp16 (the wgmma pipeline reads V_j while S_{j+1} and the load of tile j + 2 are
  // under way), 2 for split float32 inputs
  static constexpr int kStages = kParts == 1 ? 3 : 2;
  template <typename T>
  static constexpr int smem_bytes() {
    return kParts * (kBlockM + 2 * kStages * kBlockN) * kHeadDim * (int)sizeof(T) +
           kStages * kKeyRecordFields * kBlockN * (int)sizeof(float) + kAlignSlack;
  }
  // wgmma builds of dot-product scores: each V buffer also holds the keys' time block (TimeBlock) as one more
  // 64-column block of the swizzled layout, of which the tensor cores read 8 columns (the launcher adds these
  // bytes on sm_90). Not for arccosh scores: they are bound by the special-function unit, and at D = 64 the
  // extra bytes would cost them a CTA per SM.
  static constexpr bool kTimeBlock = kParts == 1 && !kDistance;
  template <typename T>
  static constexpr int time_block_bytes() {
    return kTimeBlock ? kStages * kBlockN * 64 * (int)sizeof(T) : 0;
  }
};

// Element offset of the 16-byte chunk `chunk` of row `row` in a swizzled tile of kRows rows, chunk c of a
// row stored at c ^ (row % 8), so the 8 rows one ldmatrix reads (same logical chunk) land in 8 different
// bank groups. For wgmma builds the tile is split into blocks of 64 columns (one for D = 64, two for
// D = 128) of kRows rows × 128 bytes: the 128-byte swizzle layout the Hopper tensor cores read through
// descriptors (hopper_primitives.cuh). Other builds keep whole rows (the mma.sync kernel at D = 128 spills
// registers with the blocked addressing).
template <int kHeadDim, int kRows>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  if constexpr (kFwdWgmmaArch) {
    return (chunk >> 3) * (kRows * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  } else {
    return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
  }
}

// Copy rows [row0, row0 + kRows) of a (rows, kHeadDim) matrix with row stride `row_stride` (elements)
// into a swizzled tile; rows past `n_rows` are zero-filled (cp.async with src-size 0, from row 0's address).
// Thread x copies chunk x % kChunks of rows x / kChunks + it·kRowStep: with kRowStep a multiple of 8 the
// swizzle is the same in every iteration, so the shared-memory offsets step by a constant and the global
// address by one 64-bit add (the per-iteration index arithmetic was half of the hot loop's load block).
template <typename T, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t row_stride, int row0, int n_rows) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kRowStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRowStep % 8 == 0 && kRows % kRowStep == 0,
                "rows per step must keep the swizzle phase");
  constexpr uint32_t kDstStep = (kFwdWgmmaArch ? kRowStep * 64 : kRowStep * kHeadDim) * sizeof(T);
  const int r = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
  const uint32_t dst = smem_addr(tile + swizzled<kHeadDim, kRows>(r, c));
  const int rows_left = n_rows - row0 - r;  // this thread's rows r + it·kRowStep are valid while < rows_left
  const T* g = src + (int64_t)(row0 + r) * row_stride + c * 8;
  const int64_t step = kRowStep * row_stride;
#pragma unroll
  for (int it = 0; it < kRows / kRowStep; ++it) {
    const bool valid = it * kRowStep < rows_left;
    cp_async_16(dst + it * kDstStep, valid ? g : src, valid);
    g += step;
  }
}

// A fragments of Q for k-step s, every m16 tile of this warp.
template <typename T, int kHeadDim, int kBlockM, int kRowTiles>
__device__ __forceinline__ void load_q_step(uint32_t (&qf)[kRowTiles][4], const T* sQ, int warp_row, int s) {
  const int lane = threadIdx.x % 32, lrow = lane % 8, lmat = lane / 8;
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
    const int row = warp_row + rt * 16 + ((lmat & 1) << 3) + lrow;
    ldmatrix_x4(qf[rt], smem_addr(sQ + swizzled<kHeadDim, kBlockM>(row, 2 * s + (lmat >> 1))));
  }
}

// A product of two split operands, x·y with x = x0 + x1 + x2 (bf16 parts of decreasing size): the six
// part products x_a·y_b with a + b ≤ 2, smallest first, accumulated in fp32. The three left out are below
// 2^-24 of x·y, so the result is float32-accurate (the "3×tf32" idea with three bf16 terms instead of two
// tf32 ones; the same tensor-core time, and the same mma/ldmatrix paths as the bf16 kernel).
// The five small products go to `acc_small` and x_0·y_0 to `acc` (pass the same array twice for one
// accumulator, smallest terms first).
template <typename T, int kParts>
__device__ __forceinline__ void mma_split(float (&acc)[4], float (&acc_small)[4], const uint32_t (&a)[kParts][4],
                                          const uint32_t (&b)[kParts][2]) {
  if constexpr (kParts > 1) {
    mma_16816<T>(acc_small, a[2], b[0][0], b[0][1]);
    mma_16816<T>(acc_small, a[1], b[1][0], b[1][1]);
    mma_16816<T>(acc_small, a[0], b[2][0], b[2][1]);
    mma_16816<T>(acc_small, a[1], b[0][0], b[0][1]);
    mma_16816<T>(acc_small, a[0], b[1][0], b[1][1]);
  }
  mma_16816<T>(acc, a[0], b[0][0], b[0][1]);
}

// x ≈ Σ_part pack(parts): the first part is x rounded to T, each next one the rounded remainder.
template <typename T, int kParts>
__device__ __forceinline__ void split_pack2(uint32_t (&out)[kParts], float x0, float x1) {
#pragma unroll
  for (int part = 0; part < kParts; ++part) {
    out[part] = pack2<T>(x0, x1);
    if (part + 1 < kParts) {
      const float2 r = unpack2<T>(out[part]);
      x0 -= r.x, x1 -= r.y;  // exact: the rounding residue of x is representable
    }
  }
}

// kHiLoP (bf16/fp16 for the backward, p.out_refine set): see p_hi_lo below; a template parameter so that
// the inference kernel carries no trace of it (same code and registers).
template <typename T, int kHeadDim, bool kDistance, int kParts, bool kHiLoP = false>
__global__ void __launch_bounds__(FwdTile<kHeadDim, kDistance, kParts>::kThreads,
                                  FwdTile<kHeadDim, kDistance, kParts>::kMinBlocks)
    attention_fwd_kernel(const FwdParams p) {
  using Tile = FwdTile<kHeadDim, kDistance, kParts>;
  using OutT = std::conditional_t<kParts == 1, T, float>;  // split float32 inputs give a float32 output
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kThreads = Tile::kThreads;
  constexpr int kSteps = Tile::kSteps, kScoreTiles = Tile::kScoreTiles, kOutTiles = Tile::kOutTiles;
  constexpr int kRows = Tile::kRows, kRowTiles = Tile::kRowTiles;
  constexpr int kRecFloats = kKeyRecordFields * kBlockN;
  // bf16/fp16 for the backward (p.out_refine set): P enters P·V as hi + lo (two products), not rounded
  // once. The backward pulls its gradient back through the epilogue at this O; with P rounded once O is
  // off by ~2^-9 of a term, which the epilogue's Jacobian at large norms amplifies.
  constexpr bool p_hi_lo = kParts == 1 && kHiLoP;
  // bf16/fp16 on sm_90a: S_ij = Q_i K_jᵀ and O_i += P_ij V_j as warpgroup MMAs (wgmma, operands Q, K, V read
  // by the tensor cores from shared memory, P from registers), one m64 row tile of the CTA at a time.
  constexpr bool use_wgmma = kParts == 1 && kFwdWgmmaArch;
  // wgmma with P·V in flight during the next tile's softmax (see "wgmma pipeline" below), where the registers
  // allow: not for hi + lo (two terms of P fragments); at D = 128 with two warpgroups, or with one where
  // HYPTORCH_FWD_PIPELINE_D128 asks for it (O_i, S and P in 255 registers; see that macro).
  constexpr bool pipelined = use_wgmma && !p_hi_lo && (kHeadDim == 64 || Tile::kWarpgroups > 1 || HYPTORCH_FWD_PIPELINE_D128);
  // wgmma, dot-product scores: O_0 is accumulated by the tensor cores as 8 more columns of O_i (the time block
  // appended to V_j, TimeBlock): acc_o[rt][kOutTiles]. Otherwise by fp32 FMAs (o0_i).
  constexpr bool tc_sums = use_wgmma && Tile::kTimeBlock;
  constexpr int kOutCols = kOutTiles + (tc_sums ? 1 : 0);  // n8 tiles of acc_o

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Tiles (kParts copies each: part-major), K/V in kStages buffers: sK[stage][part][key][dim], from a
  // 1024-byte boundary (Tile::kAlignSlack).
  constexpr int kStages = Tile::kStages;
  // buffers in use: all of them for the wgmma pipeline, 2 (double buffering) otherwise
  constexpr int kRing = pipelined ? kStages : 2;
  // V buffers (wgmma) carry the time block as one more 64-column block
  constexpr int kQTile = kBlockM * kHeadDim, kKVTile = kBlockN * kHeadDim;
  constexpr int kVTile = kKVTile + (tc_sums ? kBlockN * 64 : 0);
  const uint32_t align_pad = Tile::kAlignSlack > 0 ? (1024u - (smem_addr(smem_raw) & 1023u)) & 1023u : 0u;
  T* sQ = reinterpret_cast<T*>(smem_raw + align_pad);
  T* sK = sQ + kParts * kQTile;
  T* sV = sK + kStages * kParts * kKVTile;
  float* sRec = reinterpret_cast<float*>(sV + kStages * kParts * kVTile);  // kStages × fields × kBlockN

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;        // mma fragment row group / column pair
  const int lrow = lane % 8, lmat = lane / 8;  // ldmatrix: row within matrix, matrix index

  // Heaviest (causal) query tiles first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const int i0 = m_block * kBlockM;
  const int N = p.n_queries, M = p.n_keys;
  // Rows of this thread's m16 tile rt inside the query tile: warp_row + rt·kRowTileStride + g (and + 8).
  // mma.sync: each warp owns 16·kRowTiles consecutive rows; wgmma: warpgroup wg owns rows 64·kRowTiles·wg …,
  // its row tile rt the 64 rows from 64·(kRowTiles·wg + rt), of which its warp w holds 16w … 16w + 15.
  const int warpgroup = warp / 4;
  const int warp_row = use_wgmma ? warpgroup * 64 * kRowTiles + (warp % 4) * 16 : warp * 16 * kRowTiles;
  constexpr int kRowTileStride = use_wgmma ? 64 : 16;

  const T* q_ptr = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
  const T* k_ptr = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* v_ptr = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
  const float* rec_ptr = p.key_records + (size_t)bh * kKeyRecordFields * p.n_keys_padded;
  const T* time_ptr = static_cast<const T*>(p.key_time_block) + (size_t)bh * p.n_keys_padded * TimeBlock::kCols;

  // Causal (top-left aligned): rows < i0 + kBlockM see keys < i0 + kBlockM only; skip later tiles.
  const int kv_end = p.causal ? min(M, min(N, i0 + kBlockM)) : M;
  const int n_tiles = (kv_end + kBlockN - 1) / kBlockN;

  // This thread's time-block row (key threadIdx.x of a tile) and key-record chunk (field threadIdx.x / (kBlockN / 4),
  // keys 4·(threadIdx.x % (kBlockN / 4)) …), as offsets from the tile's start; loads by threads past them are skipped.
  const T* time_src = time_ptr + (size_t)threadIdx.x * TimeBlock::kCols;
  const uint32_t time_dst = swizzled<kHeadDim, kBlockN>(threadIdx.x, kHeadDim / 8) * sizeof(T);
  constexpr int kRecChunks = kRecFloats / 4;
  const int rec_field = threadIdx.x / (kBlockN / 4), rec_key = threadIdx.x % (kBlockN / 4) * 4;
  const float* rec_src = rec_ptr + (size_t)rec_field * p.n_keys_padded + rec_key;
  const uint32_t rec_dst = (rec_field * kBlockN + rec_key) * sizeof(float);
  auto load_kv = [&](int j, int stage) {
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const int k_tile = (stage * kParts + part) * kKVTile, v_tile = (stage * kParts + part) * kVTile;
      load_tile_async<T, kHeadDim, kBlockN, kThreads>(sK + k_tile, k_ptr + part * p.k_stride.part, p.k_stride.row, j * kBlockN, M);
      load_tile_async<T, kHeadDim, kBlockN, kThreads>(sV + v_tile, v_ptr + part * p.v_stride.part, p.v_stride.row, j * kBlockN, M);
    }
    if constexpr (tc_sums) {
      // the time block: chunk 0 of the 64-column block after V_j's (rows < Mpad: always in the array)
      if (threadIdx.x < kBlockN) {
        cp_async_16(smem_addr(sV + stage * kVTile) + time_dst, time_src + (size_t)j * kBlockN * TimeBlock::kCols, true);
      }
    }
    if (threadIdx.x < kRecChunks) {
      cp_async_16(smem_addr(sRec + stage * kRecFloats) + rec_dst, rec_src + j * kBlockN, true);
    }
  };

  // Load Q_i and K_0, V_0 (one cp.async group).
#pragma unroll
  for (int part = 0; part < kParts; ++part) {
    load_tile_async<T, kHeadDim, kBlockM, kThreads>(sQ + part * kQTile, q_ptr + part * p.q_stride.part, p.q_stride.row, i0, N);
  }
  load_kv(0, 0);
  cp_async_commit();

  // wgmma: S_j = Q_i K_jᵀ from the tiles in buffer `stage`, issued (not waited for) into acc_s, which the
  // caller zeroed. k-step s reads 16 columns (32 bytes) of the 64-column block s / 4 of Q_i and of K_j.
  auto issue_scores = [&](float (&acc_s)[kRowTiles][kScoreTiles][4], int stage) {
    if constexpr (use_wgmma) {
      const uint32_t k_tile = smem_addr(sK + stage * kParts * kKVTile), q_tile = smem_addr(sQ);
      const uint32_t k_lo = smem_desc_lo(k_tile, 16), q_lo = smem_desc_lo(q_tile, 16);
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const uint32_t col_bytes = (s % 4) * 32;
        const uint32_t k_bytes = (s / 4) * (kBlockN * 128) + col_bytes;
        const uint64_t desc_k = HYPTORCH_FWD_DESC_LO ? smem_desc_at(k_lo, k_bytes, 1024)
                                                     : smem_desc_sw128(k_tile + k_bytes, 16, 1024);
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
          const uint32_t q_bytes = (s / 4) * (kBlockM * 128) + (warpgroup * kRowTiles + rt) * (64 * 128) + col_bytes;
          const uint64_t desc_q = HYPTORCH_FWD_DESC_LO ? smem_desc_at(q_lo, q_bytes, 1024)
                                                       : smem_desc_sw128(q_tile + q_bytes, 16, 1024);
          wgmma_ss<T, kBlockN>(acc_s[rt], desc_q, desc_k);
        }
      }
    }
  };

  // Scores as x·exp_scale with x the tile value:
  //   dot scores:     x = σ·(q_s·k_s − q0·k0) (σ = sign of the scale), exp_scale = |scale|·log2 e
  //   arccosh scores: x = S·log2 e,                                                         exp_scale = 1
  // so P = exp2(exp_scale·x − exp_scale·m) is one FFMA + one ex2 per score.
  const float kh = p.curvature[h], coef = p.coef[h];
  const bool poincare = p.score == SCORE_POINCARE;
  const bool negate_acc = !kDistance && coef < 0.f;
  const float exp_scale = kDistance ? 1.f : fmaxf(fabsf(coef) * kLog2e, 1e-30f);  // > 0 keeps −inf masked
  const float inv_k = 1.f / kh;
  // arccosh scores: S·log2e = score_c·lg2(w) (or ·lg2(w)²), w = z + sqrt(z² − 1) = exp(arccosh z);
  // d = sqrt(k)·arccosh z:  −β·d·log2e = −β·sqrt(k)·lg2 w;   −β·d²·log2e = −β·k·ln2·(lg2 w)²
  const float score_c = p.squared ? -coef * kh * kLn2 : -coef * sqrtf(kh);
  // β·sqrt(k) = 1 (the default β = 1, k = 1): exp(S) = 1/(z + sqrt(z² − 1)), sqrt + rcp instead of sqrt + lg2 + ex2
  const bool reciprocal = kDistance && !p.squared && score_c == -1.f;
  float row_a[kRows], row_b[kRows];  // per-row constants of this thread's rows

  // Row constants from |q_i|² (fp32, quad-split over the row's chunks), once Q_i is in shared memory.
  auto row_constants = [&] {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp_row + (r >> 1) * kRowTileStride + g + 8 * (r & 1);
      SqAcc<kParts> sq_acc = 0;
#pragma unroll
      for (int c = t; c < Tile::kChunks; c += 4) {
        const T* x = sQ + swizzled<kHeadDim, kBlockM>(row, c);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float xe = 0.f;
#pragma unroll
          for (int part = 0; part < kParts; ++part) xe += to_float(x[part * kQTile + e]);
          sq_acc = fma(SqAcc<kParts>(xe), SqAcc<kParts>(xe), sq_acc);
        }
      }
      sq_acc += __shfl_xor_sync(0xffffffffu, sq_acc, 1);  // quad sum
      sq_acc += __shfl_xor_sync(0xffffffffu, sq_acc, 2);
      const float sq = (float)sq_acc;
      const float q0 = (float)sqrt(kh + sq_acc);
      if (p.score == SCORE_EUCLIDEAN) {
        row_a[r] = 0.f, row_b[r] = 0.f;
      } else if (p.score == SCORE_LORENTZ_DOT) {
        row_a[r] = negate_acc ? q0 : -q0, row_b[r] = 0.f;  // x = σ(q·k) − σ q0·k0
      } else if (p.score == SCORE_DISTANCE) {
        row_a[r] = q0 * inv_k, row_b[r] = 0.f;  // z = (q0·k0 − q·k)/k
      } else {
        // z = 1 + 2c·a_i·b_j·max(|q|² + |k|² − 2 q·k, 0), a_i = 1/(1 − c|q|²), c = 1/k
        const float a_i = 1.f / (1.f - fminf(sq * inv_k, 1.f - numerics::BALL_MARGIN_F32));
        row_a[r] = 2.f * inv_k * a_i, row_b[r] = sq;
      }
    }
  };

  float acc_o[kRowTiles][kOutCols][4];
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
    for (int n = 0; n < kOutCols; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[rt][n][e] = 0.f;
  float m_i[kRows], l_i[kRows], o0_i[kRows];  // running max of x, Σ_j P_ij and Σ_j P_ij v0_j (this thread's columns)
#pragma unroll
  for (int r = 0; r < kRows; ++r) m_i[r] = -CUDART_INF_F, l_i[r] = 0.f, o0_i[r] = 0.f;

  // S_ij (the scores of the current tile) in fp32; with wgmma it carries over from one iteration to the next.
  float acc_s[kRowTiles][kScoreTiles][4];
  auto zero_scores = [&] {
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[rt][n][e] = 0.f;
  };
  // wgmma: S_ij = Q_i K_jᵀ for the tiles in buffer `stage` into acc_s, as one committed group.
  auto start_scores = [&](int stage) {
    zero_scores();
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(acc_s[rt]);
    wgmma_fence();
    issue_scores(acc_s, stage);
    wgmma_commit();
  };
  // the same, waited for
  auto scores_now = [&](int stage) {
    start_scores(stage);
    wgmma_wait<0>();
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(acc_s[rt]);
  };
  // wgmma pipeline (FlashAttention-3's intra-warpgroup overlap): at the end of iteration j the warpgroup
  // issues S_{j+1} = Q_i K_{j+1}ᵀ and O_i += P_ij V_j, waits for S_{j+1} only, and computes the softmax of
  // tile j + 1 while P_ij V_j runs; it waits for that before rescaling O_i. So the A fragments of P_ij
  // (pv_a) live across the iteration boundary, and K/V rotate through 3 buffers (tile j + 2 loads while V_j
  // is read).
  uint32_t pv_a[kBlockN / 16][kRowTiles][kParts][4];
  if constexpr (!use_wgmma) (void)pv_a;
  if constexpr (pipelined) {
    if (n_tiles > 1) {
      load_kv(1, 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();  // cp.async wrote the tiles wgmma reads
    __syncthreads();
    row_constants();
    // (also when no key tile is visible, n_tiles = 0: the zero-filled buffer's scores are never read, and
    // one code path keeps ptxas from serialising the wgmma)
    scores_now(0);
  }

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = (unsigned)j % kRing;
    if constexpr (!pipelined) {
      // Prefetch K_{j+1}, V_{j+1} into the next buffer while this one is consumed.
      if (j + 1 < n_tiles) {
        load_kv(j + 1, (unsigned)(j + 1) % kRing);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      if constexpr (use_wgmma) fence_proxy_async();  // cp.async wrote the tiles wgmma reads
      __syncthreads();
      if (j == 0) row_constants();
    }

    const T* sKs = sK + stage * kParts * kKVTile;  // part `part` at + part·kKVTile
    const T* sVs = sV + stage * kParts * kVTile;
    const float* sRecs = sRec + stage * kRecFloats;

    // S_ij = Q_i K_jᵀ on tensor cores (fp32 accumulate); each K fragment feeds both m16 tiles (pipelined:
    // it is already in acc_s, see above).
    // Split float32: the five small part products in their own accumulator, so the truncating alignment
    // of the tensor cores' accumulation is relative to them, not to the large x_0·y_0 sum.
    float acc_s_small[kRowTiles][kScoreTiles][4] = {};
    if constexpr (kParts == 1) (void)acc_s_small;
    if constexpr (use_wgmma) {
      if constexpr (!pipelined) scores_now(stage);
    } else {
      zero_scores();
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        // Q fragments are re-read from smem per k-step (FA2 does the same): the registers hold S and O.
        uint32_t qf[kRowTiles][kParts][4];
#pragma unroll
        for (int part = 0; part < kParts; ++part) {
          uint32_t qp[kRowTiles][4];
          load_q_step<T, kHeadDim, kBlockM, kRowTiles>(qp, sQ + part * kQTile, warp_row, s);
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
            for (int e = 0; e < 4; ++e) qf[rt][part][e] = qp[rt][e];
        }
#pragma unroll
        for (int np = 0; np < kScoreTiles / 2; ++np) {
          uint32_t kf0[kParts][2], kf1[kParts][2];  // B operands of n8 tiles 2np and 2np + 1
          const int key = np * 16 + ((lmat >> 1) << 3) + lrow;
#pragma unroll
          for (int part = 0; part < kParts; ++part) {
            uint32_t kf[4];
            ldmatrix_x4(kf, smem_addr(sKs + part * kKVTile + swizzled<kHeadDim, kBlockN>(key, 2 * s + (lmat & 1))));
            kf0[part][0] = kf[0], kf0[part][1] = kf[1], kf1[part][0] = kf[2], kf1[part][1] = kf[3];
          }
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            mma_split<T, kParts>(acc_s[rt][2 * np], acc_s_small[rt][2 * np], qf[rt], kf0);
            mma_split<T, kParts>(acc_s[rt][2 * np + 1], acc_s_small[rt][2 * np + 1], qf[rt], kf1);
          }
        }
      }
    }
    if constexpr (kParts > 1) {
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
        for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[rt][n][e] += acc_s_small[rt][n][e];
    }

    // Score functor in fp32: rank-1 Minkowski correction or clamped arccosh; then the masks.
    const int j0 = j * kBlockN;
    const bool key_bias = p.key_padding != nullptr || j0 + kBlockN > M;
    const bool causal_tile = p.causal && j0 + kBlockN - 1 > i0 + warp_row;
    // `recip` (arccosh scores with β·sqrt(k) = 1, not squared): the tile keeps w = exp(arccosh z)
    // itself, since exp(S) = 1/w needs no lg2/ex2 (masked: w = +inf).
    auto score_tile = [&](auto negate, auto recip) {
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) {
        const int col = n * 8 + 2 * t;
        const float2 ka = *reinterpret_cast<const float2*>(sRecs + REC_A * kBlockN + col);
        float2 kb = make_float2(0.f, 0.f);
        if (kDistance && poincare) kb = *reinterpret_cast<const float2*>(sRecs + REC_B * kBlockN + col);
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = rt * 2 + (e >> 1);
            const float kcol = (e & 1) ? ka.y : ka.x;
            const float acc = acc_s[rt][n][e];
            float x;
            if constexpr (!kDistance) {
              x = fmaf(row_a[r], kcol, decltype(negate)::value ? -acc : acc);  // the sign is an FFMA operand modifier
            } else {
              float z;
              if (!poincare) {
                z = fmaf(row_a[r], kcol, -acc * inv_k);
              } else {
                const float dist_sq = fmaxf(fmaf(-2.f, acc, row_b[r] + kcol), 0.f);
                z = fmaf(row_a[r] * ((e & 1) ? kb.y : kb.x), dist_sq, 1.f);
              }
              z = fmaxf(z, 1.f + p.acosh_eps);
              // arccosh z = ln(z + sqrt(z² − 1)); z² − 1 by one fma (no cancellation for z → 1)
              const float w = z + fast_sqrt(fmaf(z, z, -1.f));
              if constexpr (decltype(recip)::value) {
                x = w;
              } else {
                const float lg = fast_log2(w);
                x = p.squared ? score_c * lg * lg : score_c * lg;
              }
            }
            acc_s[rt][n][e] = x;
          }
        }
      }
      // The masks, each tested once per tile (tested per n8 tile, the branches cost ~6% of the hot loop).
      if (key_bias) {
        const float sign = decltype(recip)::value ? -1.f : 1.f;  // w − (−inf) = +inf
#pragma unroll
        for (int n = 0; n < kScoreTiles; ++n) {
          const float2 bias = *reinterpret_cast<const float2*>(sRecs + REC_BIAS * kBlockN + n * 8 + 2 * t);
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            acc_s[rt][n][0] += sign * bias.x, acc_s[rt][n][1] += sign * bias.y;
            acc_s[rt][n][2] += sign * bias.x, acc_s[rt][n][3] += sign * bias.y;
          }
        }
      }
      if (causal_tile) {
#pragma unroll
        for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = i0 + warp_row + rt * kRowTileStride + g + 8 * (e >> 1);
              if (j0 + n * 8 + 2 * t + (e & 1) > row) acc_s[rt][n][e] = decltype(recip)::value ? CUDART_INF_F : -CUDART_INF_F;
            }
      }
    };
    // Online softmax: m_i ← max(m_i, rowmax S_ij), P_ij = exp2(S_ij − m_i), rescale l_i, O_i by exp2(m_old − m_new).
    // Tree reductions (here and below): short dependency chains, since only 2 warps share a scheduler.
    float neg_m[kRows], alphas[kRows];
    auto softmax_tile = [&](auto recip) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int rt = r >> 1, e0 = 2 * (r & 1);
        float part[kScoreTiles];
        float tile_max;
        if constexpr (decltype(recip)::value) {
          // max_j S_ij·log2e = −lg2(min_j w_ij): one lg2 per row instead of one per score
#pragma unroll
          for (int n = 0; n < kScoreTiles; ++n) part[n] = fminf(acc_s[rt][n][e0], acc_s[rt][n][e0 + 1]);
#pragma unroll
          for (int width = kScoreTiles / 2; width > 0; width /= 2)
#pragma unroll
            for (int n = 0; n < width; ++n) part[n] = fminf(part[n], part[n + width]);
          const float w_min = quad_min(part[0]);
          tile_max = w_min == CUDART_INF_F ? -CUDART_INF_F : -fast_log2(w_min);
        } else {
#pragma unroll
          for (int n = 0; n < kScoreTiles; ++n) part[n] = fmaxf(acc_s[rt][n][e0], acc_s[rt][n][e0 + 1]);
#pragma unroll
          for (int width = kScoreTiles / 2; width > 0; width /= 2)
#pragma unroll
            for (int n = 0; n < width; ++n) part[n] = fmaxf(part[n], part[n + width]);
          tile_max = quad_max(part[0]);
        }
        // Lazy maximum (FlashAttention-4): m_i moves only when the tile's maximum exceeds it by more than
        // 2^kLazyMaxLog2 in P (and always from −inf), so O_i is rarely rescaled; P ≤ 2^kLazyMaxLog2 is
        // harmless to the fp32 sums, and L_i = m_i + log l_i stays exact.
        const float mx = exp_scale * (tile_max - m_i[r]) > kLazyMaxLog2 ? tile_max : m_i[r];
        const float m_use = mx == -CUDART_INF_F ? 0.f : mx;  // a row with no visible key yet: P = 0, no NaN
        const float alpha = fast_exp2(exp_scale * (m_i[r] - m_use));
        // recip: P = exp2(−lg2 w − m) = exp2(−m)·(1/w), so neg_m holds the row factor exp2(−m)
        neg_m[r] = decltype(recip)::value ? fast_exp2(-m_use) : -exp_scale * m_use;
        m_i[r] = mx;
        l_i[r] *= alpha;
        if constexpr (!tc_sums) o0_i[r] *= alpha;
        alphas[r] = alpha;
      }
    };
    if (reciprocal) {
      score_tile(std::false_type{}, std::true_type{});
      softmax_tile(std::true_type{});
    } else {
      if (negate_acc) score_tile(std::true_type{}, std::false_type{});
      else score_tile(std::false_type{}, std::false_type{});
      softmax_tile(std::false_type{});
    }
    if constexpr (pipelined) {
      wgmma_wait<0>();  // O_i += P_{i,j-1} V_{j-1} has landed (and pv_a is free)
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(acc_o[rt]);
    }
    // Rescale O_i only when some row max of the warp moved (rare after the first tiles).
    bool moved = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) moved |= alphas[r] != 1.f;
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int rt = r >> 1, e0 = 2 * (r & 1);
#pragma unroll
        for (int n = 0; n < kOutCols; ++n) acc_o[rt][n][e0] *= alphas[r], acc_o[rt][n][e0 + 1] *= alphas[r];
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int rt = r >> 1, e0 = 2 * (r & 1);
      float part[kScoreTiles];
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) {
        float p0, p1;
        if (reciprocal) {
          p0 = neg_m[r] * fast_rcp(acc_s[rt][n][e0]), p1 = neg_m[r] * fast_rcp(acc_s[rt][n][e0 + 1]);
        } else {
          p0 = fast_exp2(fmaf(exp_scale, acc_s[rt][n][e0], neg_m[r]));
          p1 = fast_exp2(fmaf(exp_scale, acc_s[rt][n][e0 + 1], neg_m[r]));
        }
        acc_s[rt][n][e0] = p0, acc_s[rt][n][e0 + 1] = p1;
        part[n] = p0 + p1;
      }
#pragma unroll
      for (int width = kScoreTiles / 2; width > 0; width /= 2)
#pragma unroll
        for (int n = 0; n < width; ++n) part[n] += part[n + width];
      l_i[r] += part[0];
    }

    // O_i += P_ij V_j: the S fragment becomes the A operand (Poincaré: P scaled by the value lift 2/(1 − c|v|²)).
    // A operands of keys 16·kk … 16·kk + 15 (P split into kParts terms), and O_0 += P_ij v0_j.
    // residue (bf16/fp16 only): the rounding residue of P instead of P, the lo term of P = hi + lo.
    auto p_operands = [&](int kk, uint32_t (&a)[kRowTiles][kParts][4], bool residue) {
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
        float w[8];
#pragma unroll
        for (int e = 0; e < 4; ++e) w[e] = acc_s[rt][2 * kk][e], w[4 + e] = acc_s[rt][2 * kk + 1][e];
        if (kDistance && poincare) {
          const float2 s0 = *reinterpret_cast<const float2*>(sRecs + REC_VS * kBlockN + kk * 16 + 2 * t);
          const float2 s1 = *reinterpret_cast<const float2*>(sRecs + REC_VS * kBlockN + kk * 16 + 8 + 2 * t);
          w[0] *= s0.x, w[1] *= s0.y, w[2] *= s0.x, w[3] *= s0.y;
          w[4] *= s1.x, w[5] *= s1.y, w[6] *= s1.x, w[7] *= s1.y;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          uint32_t parts[kParts];
          split_pack2<T, kParts>(parts, w[2 * e], w[2 * e + 1]);
          if (kParts == 1 && residue) {
            const float2 r = unpack2<T>(parts[0]);
            parts[0] = pack2<T>(w[2 * e] - r.x, w[2 * e + 1] - r.y);  // the subtraction is exact
          }
#pragma unroll
          for (int part = 0; part < kParts; ++part) a[rt][part][e] = parts[part];
        }
        // O_0 += P_ij v0_j with the same rounded weights the tensor cores use for O_s, so O stays an
        // exact combination of lifted points and O0² − |Os|² does not cancel through rounding.
        if (!tc_sums && (kDistance || p.score != SCORE_EUCLIDEAN)) {
          const float2 v0a = *reinterpret_cast<const float2*>(sRecs + REC_V0 * kBlockN + kk * 16 + 2 * t);
          const float2 v0b = *reinterpret_cast<const float2*>(sRecs + REC_V0 * kBlockN + kk * 16 + 8 + 2 * t);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float2 pa = unpack2<T>(a[rt][kParts - 1][half]), pb = unpack2<T>(a[rt][kParts - 1][2 + half]);
#pragma unroll
            for (int part = kParts - 2; part >= 0; --part) {
              const float2 xa = unpack2<T>(a[rt][part][half]), xb = unpack2<T>(a[rt][part][2 + half]);
              pa.x += xa.x, pa.y += xa.y, pb.x += xb.x, pb.y += xb.y;
            }
            float& o0 = o0_i[rt * 2 + half];
            if constexpr (kParts == 1) {
              o0 = fmaf(pa.x, v0a.x, fmaf(pa.y, v0a.y, fmaf(pb.x, v0b.x, fmaf(pb.y, v0b.y, o0))));
            } else {
              o0 += fmaf(pa.x, v0a.x, pa.y * v0a.y) + fmaf(pb.x, v0b.x, pb.y * v0b.y);
            }
          }
        }
      }
    };
    // B operands of V_j (keys 16·kk …, n8 tiles 2np and 2np + 1 of the head dim), every part.
    auto v_operands = [&](int kk, int np, uint32_t (&vf0)[kParts][2], uint32_t (&vf1)[kParts][2]) {
      const int key = kk * 16 + ((lmat & 1) << 3) + lrow;
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, smem_addr(sVs + part * kKVTile + swizzled<kHeadDim, kBlockN>(key, 2 * np + (lmat >> 1))));
        vf0[part][0] = vf[0], vf0[part][1] = vf[1], vf1[part][0] = vf[2], vf1[part][1] = vf[3];
      }
    };
    if constexpr (use_wgmma) {
      // The A fragments of P_ij (and of its rounding residue for hi + lo) for every key step; then, once
      // tile j + 1 is in shared memory, issue S_{i,j+1} and O_i += P_ij V_j (keys 16·kk … are rows 16·kk …
      // of V_j, the N-major B operand: 64-column blocks kBlockN·128 bytes apart) and wait for S only.
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) p_operands(kk, pv_a[kk], false);
      // O_i += A V_j for the A fragments of every key step
      auto issue_pv = [&](const uint32_t (&a)[kBlockN / 16][kRowTiles][kParts][4]) {
        const uint32_t v_tile = smem_addr(sVs), v_lo = smem_desc_lo(v_tile, kBlockN * 128);
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          const uint64_t desc_v = HYPTORCH_FWD_DESC_LO ? smem_desc_at(v_lo, kk * (16 * 128), 1024)
                                                       : smem_desc_sw128(v_tile + kk * (16 * 128), kBlockN * 128, 1024);
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) wgmma_rs_bt<T, kOutCols * 8>(acc_o[rt], a[kk][rt][0], desc_v);
        }
      };
      auto fence_pv_registers = [&] {
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(acc_o[rt]);
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(pv_a[kk][rt]);
      };
      if constexpr (pipelined) {
        if (j + 1 < n_tiles) {
          cp_async_wait<0>();   // tile j + 1 (the only load in flight)
          fence_proxy_async();  // cp.async wrote the tiles wgmma reads
          __syncthreads();      // every warp is done with tile j − 1's buffer and sees tile j + 1
          if (j + 2 < n_tiles) {
            load_kv(j + 2, (unsigned)(j + 2) % kRing);
            cp_async_commit();
          }
        }
        fence_pv_registers();
        // After the last tile this recomputes a stale buffer's scores, which nothing reads: issued anyway,
        // so the loop body is the same in every iteration (ptxas does not see that `j + 1 < n_tiles` decides
        // the loop's exit, and with wgmma issued or waited for only on some paths it serialises every wgmma).
        start_scores((unsigned)(j + 1) % kRing);
        wgmma_fence();
        issue_pv(pv_a);
        wgmma_commit();
        wgmma_wait<1>();  // S_{i,j+1}; P_ij V_j may still run
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(acc_s[rt]);
      } else if constexpr (p_hi_lo && HYPTORCH_FWD_HILO_ONE_GROUP) {
        // Not pipelined, hi + lo: both terms' fragments, then their products as one group
        uint32_t pv_lo[kBlockN / 16][kRowTiles][kParts][4];
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) p_operands(kk, pv_lo[kk], true);
        fence_pv_registers();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(pv_lo[kk][rt]);
        wgmma_fence();
        issue_pv(pv_a);
        issue_pv(pv_lo);
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(acc_o[rt]);
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            fence_registers(pv_a[kk][rt]);
            fence_registers(pv_lo[kk][rt]);
          }
      } else {
        // Not pipelined: P·V now, one term at a time.
#pragma unroll
        for (int term = 0; term < (p_hi_lo ? 2 : 1); ++term) {
          if (term == 1) {
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) p_operands(kk, pv_a[kk], true);
          }
          fence_pv_registers();
          wgmma_fence();
          issue_pv(pv_a);
          wgmma_commit();
          wgmma_wait<0>();
        }
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(acc_o[rt]);
      }
    } else if constexpr (kParts == 1) {
      // O_i += (P or its rounding residue) V_j for keys 16·kk … 16·kk + 15
      auto pv_term = [&](int kk, bool residue) {
        uint32_t a[kRowTiles][kParts][4];
        p_operands(kk, a, residue);
#pragma unroll
        for (int np = 0; np < kOutTiles / 2; ++np) {
          uint32_t vf0[kParts][2], vf1[kParts][2];
          v_operands(kk, np, vf0, vf1);
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            mma_split<T, kParts>(acc_o[rt][2 * np], acc_o[rt][2 * np], a[rt], vf0);
            mma_split<T, kParts>(acc_o[rt][2 * np + 1], acc_o[rt][2 * np + 1], a[rt], vf1);
          }
        }
      };
      // hi + lo: one term at a time (at D = 128 the loop is not unrolled: both terms would spill registers)
      if constexpr (p_hi_lo && kHeadDim > 64) {
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll 1
          for (int term = 0; term < 2; ++term) pv_term(kk, term == 1);
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          pv_term(kk, false);
          if constexpr (p_hi_lo) pv_term(kk, true);
        }
      }
    } else {
      // Split float32: the tile's P_ij V_j is summed in fresh registers (large and small part products
      // apart, as for S) and added to O_i by fp32 adds. The tensor cores align the addends of an
      // accumulation by truncation, a bias per mma that would grow with the number of key tiles if O_i
      // itself were the accumulator.
      uint32_t a[kBlockN / 16][kRowTiles][kParts][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) p_operands(kk, a[kk], false);
#pragma unroll
      for (int np = 0; np < kOutTiles / 2; ++np) {
        float pv[kRowTiles][2][4] = {}, pv_small[kRowTiles][2][4] = {};
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t vf0[kParts][2], vf1[kParts][2];
          v_operands(kk, np, vf0, vf1);
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            mma_split<T, kParts>(pv[rt][0], pv_small[rt][0], a[kk][rt], vf0);
            mma_split<T, kParts>(pv[rt][1], pv_small[rt][1], a[kk][rt], vf1);
          }
        }
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            acc_o[rt][2 * np][e] += pv[rt][0][e] + pv_small[rt][0][e];
            acc_o[rt][2 * np + 1][e] += pv[rt][1][e] + pv_small[rt][1][e];
          }
      }
    }
    if constexpr (!pipelined) __syncthreads();  // every warp is done with this stage before it is refilled
  }
  if constexpr (pipelined) {
    wgmma_wait<0>();  // the last P_ij V_j
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) fence_registers(acc_o[rt]);
  }

  // Epilogue: O_i /= l_i, L_i = m_i + log l_i, then the centroid map in fp32 (DESIGN.md §2.4).
  const float sqrt_k = sqrtf(kh);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rt = r >> 1, e0 = 2 * (r & 1);
    const float l = quad_sum(l_i[r]);
    float o0_sum;
    if constexpr (tc_sums) {
      // the time block's columns 2t, 2t + 1 of this row: from lanes t = 0 (v0 hi, mid) and 1 (v0 lo)
      const float c0 = acc_o[rt][kOutTiles][e0], c1 = acc_o[rt][kOutTiles][e0 + 1];
      const int quad = lane & ~3;
      const float v0_hi = __shfl_sync(0xffffffffu, c0, quad), v0_mid = __shfl_sync(0xffffffffu, c1, quad);
      const float v0_lo = __shfl_sync(0xffffffffu, c0, quad + 1);
      o0_sum = v0_hi + (v0_mid + v0_lo);
    } else {
      o0_sum = quad_sum(o0_i[r]);
    }
    const float inv_l = l > 0.f ? 1.f / l : 0.f;  // l = 0: every key masked → O = 0, L = −inf
    const float o0 = o0_sum * inv_l;
    SqAcc<kParts> os_sq = 0;
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      acc_o[rt][n][e0] *= inv_l, acc_o[rt][n][e0 + 1] *= inv_l;
      using A = SqAcc<kParts>;
      os_sq = fma(A(acc_o[rt][n][e0]), A(acc_o[rt][n][e0]), fma(A(acc_o[rt][n][e0 + 1]), A(acc_o[rt][n][e0 + 1]), os_sq));
    }
    os_sq += __shfl_xor_sync(0xffffffffu, os_sq, 1);  // quad sum
    os_sq += __shfl_xor_sync(0xffffffffu, os_sq, 2);
    float factor = 1.f;
    if (p.output != OUTPUT_EUCLIDEAN) {
      float n_lor;
      if constexpr (kParts == 1) {
        // n = sqrt(O0² − |Os|²) as (O0 − |Os|)(O0 + |Os|): one rounding instead of a cancellation.
        const float os_norm = sqrtf(fmaxf(os_sq, numerics::MIN_SQ_NORM_F32));
        n_lor = sqrtf(fmaxf((o0 - os_norm) * (o0 + os_norm), numerics::MIN_SQ_NORM_F32));
      } else {
        n_lor = (float)sqrt(fmax(fma((double)o0, (double)o0, -os_sq), (double)numerics::MIN_SQ_NORM_F32));
      }
      if (p.output == OUTPUT_LORENTZ) factor = sqrt_k / n_lor;
      else if (p.output == OUTPUT_KLEIN) factor = sqrt_k / o0;
      else factor = sqrt_k / (o0 + n_lor);
      if (!(o0 > 0.f)) factor = 0.f;  // masked row → the origin
    }
    const int row = i0 + warp_row + rt * kRowTileStride + g + 8 * (r & 1);
    if (row < N) {
      OutT* out_row = static_cast<OutT*>(p.out) + ((size_t)bh * N + row) * kHeadDim;
      int8_t* refine_row = p.out_refine + ((size_t)bh * N + row) * kHeadDim;  // used when p_hi_lo
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n) {
        const float x0 = acc_o[rt][n][e0] * factor, x1 = acc_o[rt][n][e0 + 1] * factor;
        if constexpr (kParts == 1) {
          const uint32_t hi = pack2<T>(x0, x1);
          *reinterpret_cast<uint32_t*>(out_row + n * 8 + 2 * t) = hi;
          if constexpr (p_hi_lo) {
            const float2 h2 = unpack2<T>(hi);
            *reinterpret_cast<char2*>(refine_row + n * 8 + 2 * t) =
                make_char2(refine_code<T>(x0, h2.x), refine_code<T>(x1, h2.y));
          }
        } else {
          *reinterpret_cast<float2*>(out_row + n * 8 + 2 * t) = make_float2(x0, x1);
        }
      }
      if (t == 0) {
        // L_i = ln Σ_j exp(S_ij) = (exp_scale·m_i + log2 l_i)·ln 2
        p.lse[(size_t)bh * N + row] = l > 0.f ? (exp_scale * m_i[r] + log2f(l)) * kLn2 : -CUDART_INF_F;
        p.o0[(size_t)bh * N + row] = o0;
      }
    }
  }
}

}  // namespace hyptorch_flash
