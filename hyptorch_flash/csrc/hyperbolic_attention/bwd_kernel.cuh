// Fused hyperbolic attention backward: FlashAttention-2 (Dao 2023, Algorithm 2) on tensor cores,
// with the hyperbolic parts of DESIGN.md §2-§3 in float32.
//
// Notation of the FA2 paper: key/value tile K_j, V_j (kBlockN rows, owned by one CTA), query tiles
// Q_i, dO_i (kBlockM rows, looped over), S_ij, P_ij = exp(S_ij − L_i) recomputed from the saved
// log-sum-exp L_i, dP_ij = dO_i V_jᵀ, dS_ij = P_ij ∘ (dP_ij − D_i), D_i = rowsum(dO_i ∘ O_i).
//
// Every variant's score is a function of one inner quantity X_ij that comes from the tensor-core tile
// (dot = q_i·k_j) plus fp32 row/column terms:
//   euclidean, lorentz_dot   X = dot − q0_i k0_j (q0 = k0 = 0 for euclidean)   s = coef·X
//   distance                 X = dot − q0_i k0_j = <q,k>_L,  z = −X/k,            s = −coef·√k·arccosh z (or −coef·k·arccosh² z)
//   poincare_distance        X = |p|² + |q|² − 2 dot,       z = 1 + 2cX·a_i b_j, s as distance
// so the chain rule needs dX_ij = dS_ij·∂s/∂X (fp32, rounded once to the input dtype and used
// consistently by every contraction below). The time coordinates enter through the rank-1 fp32 terms:
// dP_ij = λ_j (dO_s,i·v_j) + dO0_i v0_j with the value lift (v0, λ); the lifted value time part gives
// dv0_j = Σ_i P_ij dO0_i. dO_s and, in dV_j += P_ijᵀ dO_i, P are fed to the tensor cores as hi + lo
// pairs of the input dtype: at large norms (and near the Poincaré boundary) the space and time parts of
// dP_ij and of the value lift's pull-back cancel by orders of magnitude.
//
// The host derives dO_L and D_i from the forward's output (refined to ~16 bits, see bwd_prepare.cu).
// Layout (kernel 1, key-parallel): one CTA = 4 warps = one K_j/V_j tile of 64 keys of one (batch,
// query head); warp w owns keys 16w..16w+15 and computes S_ijᵀ = K_j Q_iᵀ and dP_ijᵀ = V_j dO_iᵀ for
// all kBlockM queries (mma.sync.m16n8k16, fp32 accumulate; on sm_90a at D = 64 with bf16/fp16 the
// warpgroup's wgmma, see HYPTORCH_BWD_WGMMA), so Pᵀ and dXᵀ stay in registers as the A
// operands of dV_j += P_ijᵀ dO_i and dK_j += dX_ijᵀ Q_i. dQ_i += dX_ij K_j goes through shared memory
// (dXᵀ tile) and fp32 atomics; the row sums R_i, RX_i likewise. Kernel 2 (query-parallel, the
// deterministic mode) recomputes the same tiles for one Q_i and loops over K_j, V_j, accumulating dQ_i
// and the row sums in registers/shared memory in a fixed order: no atomics anywhere.
//
// float32 inputs (kParts = 3): q, k, v and dO_s arrive as three bf16 parts each and every product takes
// the six part products that matter (mma_parts); P and dX are split the same way in registers instead of
// being rounded. Smaller query tiles (16), one buffer of each tile (no prefetch), kernel 1 in two passes at
// D = 128 (dV, then dK/dQ), a delta pass of kernel 2 for D_i, part products summed in zeroed registers
// and added with round-to-nearest, Kahan-compensated per-head sums: see the comments where each is used.
#pragma once

#include <cfloat>
#include <cstdint>
#include <math_constants.h>
#include <type_traits>

#if HYPTORCH_BWD_TMA_LOADS
#include <cuda.h>          // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#endif

#include "bwd_params.cuh"
#include "device_primitives.cuh"
#include "hopper_primitives.cuh"
#include "numerics.cuh"

// Hopper warpgroup MMA in kernel 1 (key-parallel) for one-part bf16/fp16 inputs at D = 64: S_ijᵀ, dP_ijᵀ from
// shared memory (wgmma, both operands K-major), dV_j and dK_j with Pᵀ/dXᵀ as register A operands and dO_i/Q_i
// as N-major B (the forward's P·V form); with 64-query tiles dQ_i by one wgmma with dXᵀ and K_j read transposed,
// and for dot scores R_i from that product too (Tile::kRowSumsTC); the element-wise step is unchanged.
// On by default (GPU-tested on the H200; -DHYPTORCH_BWD_WGMMA=0 builds the mma.sync path, for A/B). The host
// sizes shared memory from HYPTORCH_BWD_WGMMA (1 KiB alignment slack, float fields padded to 1 KiB), the device
// uses wgmma only where the build targets sm_90a.
#ifndef HYPTORCH_BWD_WGMMA
#define HYPTORCH_BWD_WGMMA 1
#endif
// Kernel 1 with wgmma dQ (D = 64, dot scores, bf16/fp16 on sm_90a) issues the next step's S_ijᵀ/dP_ijᵀ together with
// this step's dQ_i, so they run during the dQ atomics, the row-field stores and the barrier instead of at the start
// of the next step, where the warps would wait for them. The next tile has to land by the dQ barrier (half a step
// after its prefetch instead of a whole one). On by default (GPU-tested on the H200, session 11: lorentz_dot D = 64
// fwd+bwd 2.865 → 2.596 ms with the two below; -DHYPTORCH_BWD_EARLY_SCORES=0 for A/B).
#ifndef HYPTORCH_BWD_EARLY_SCORES
#define HYPTORCH_BWD_EARLY_SCORES 1
#endif
// Hopper warpgroup MMA in kernel 1 also at D = 128 (bf16/fp16; 32-query tiles for the dot scores, 16 for the
// arccosh ones): S_ijᵀ, dP_ijᵀ (m64n32 / m64n16) and dV_j, dK_j (m64n128, the forward's P·V form) by wgmma, dQ_i by
// mma.sync as before. Every D = 128 tile then uses the 128-byte swizzle in 64-column blocks (swz_tile), the
// mma.sync fragments included. On by default with HYPTORCH_BWD_WGMMA (GPU-tested on the H200, session 11: lorentz_dot
// D = 128 fwd+bwd 7.011 → 5.904 ms, distance 9.097 → 7.937; -DHYPTORCH_BWD_WGMMA_D128=0 for A/B).
#ifndef HYPTORCH_BWD_WGMMA_D128
#define HYPTORCH_BWD_WGMMA_D128 1
#endif
// Kernel 1 with wgmma issues the dV_j/dK_j products of the first half of the step's queries as soon as their P and
// dX are final, so the tensor cores work on them while the element-wise step does the second half (FlashAttention-3's
// intra-warpgroup overlap, here between the element-wise work and the GEMMs that consume it). Opt-in
// (-DHYPTORCH_BWD_SPLIT_STEP=1): passes the tests on the H200 but is slower at D = 64 (session 11: lorentz_dot
// 2.596 → 2.644 ms, distance 4.083 → 4.247) and ties at D = 128.
#ifndef HYPTORCH_BWD_SPLIT_STEP
#define HYPTORCH_BWD_SPLIT_STEP 0
#endif
// Query tile at D = 64 for the arccosh scores (distance, poincare_distance): 64, so the tile gets the dQ_i wgmma
// (GPU-tested on the H200, session 11: distance fwd+bwd 4.349 → 4.083 ms with the two above), or 32
// (-DHYPTORCH_BWD_D64_ARCCOSH_BLOCK_M=32, for A/B). No spills for sm_90a with and without wgmma.
#ifndef HYPTORCH_BWD_D64_ARCCOSH_BLOCK_M
#define HYPTORCH_BWD_D64_ARCCOSH_BLOCK_M 64
#endif
// Kernel 1 with wgmma at D = 128 loads the next query tile (Q_i, dO_i, dO_lo,i into the second query buffer, the
// row fields into registers) right after the step's dV_j/dK_j products have landed, instead of at the start of the
// next step, where every step waited for the global loads (the prefetch at the start of a step, as at D = 64,
// does not fit in registers there). Opt-in (-DHYPTORCH_BWD_D128_PREFETCH=1): compile-checked, not yet run on a GPU.
#ifndef HYPTORCH_BWD_D128_PREFETCH
#define HYPTORCH_BWD_D128_PREFETCH 0
#endif
// Tile loads (Q_i, dO_i, dO_lo,i every step) of whole tiles, the common case: one shared and one global address per
// thread, advanced by constant steps (cp.async with immediate offsets), instead of a clamped row index and both
// addresses per 16-byte chunk; partial tiles (rows past the end, zero-filled) keep the general loop. Opt-in
// (-DHYPTORCH_BWD_FULL_TILE_LOADS=1): compile-checked, not yet run on a GPU.
#ifndef HYPTORCH_BWD_FULL_TILE_LOADS
#define HYPTORCH_BWD_FULL_TILE_LOADS 0
#endif
// Kernel 1 with wgmma: the first k-step of S_ijᵀ, dP_ijᵀ and (64-query tiles) dQ_i overwrites the accumulators
// (scale-d = 0) instead of the warpgroup zeroing them first (64-100 MOVs per step at D = 64, in the issue-bound
// loop). Same products. Opt-in (-DHYPTORCH_BWD_OVERWRITE_FIRST=1): compile-checked, not yet run on a GPU.
#ifndef HYPTORCH_BWD_OVERWRITE_FIRST
#define HYPTORCH_BWD_OVERWRITE_FIRST 0
#endif
// Kernel 1 with wgmma at D = 128: dQ_iᵀ = K_jᵀ dX_ijᵀ by wgmma (m64nMk16 per 64-column block of D, K_j read
// M-major from its 128-byte swizzled blocks, dXᵀ N-major from the dxt tile in the 64-byte (32 queries) or 32-byte
// (16) swizzle), issued right after the dV_j/dK_j products and waited for with them, instead of the mma.sync dQ in
// 16-column chunks after dV_j/dK_j have landed; dQ_i then goes out as float32 atomics of the transposed
// accumulators. Opt-in (-DHYPTORCH_BWD_D128_DQ_WGMMA=1): compile-checked, not yet run on a GPU.
#ifndef HYPTORCH_BWD_D128_DQ_WGMMA
#define HYPTORCH_BWD_D128_DQ_WGMMA 0
#endif
// Arccosh scores (distance, poincare_distance), one-part inputs: 1/√(z² − 1) by one SFU reciprocal square root and
// √(z² − 1) as (z² − 1) times it, instead of an SFU square root and an SFU reciprocal: 3 SFU operations per score
// (with lg2 and ex2) instead of 4, where the SFU (16 lanes per clock per SM) bounds the element-wise step. z² − 1 is
// clamped to FLT_MAX (z ≳ 1.8e19, far past any distance bf16/fp16 inputs resolve: the product stays finite).
// Opt-in (-DHYPTORCH_BWD_ACOSH_RSQRT=1): compile-checked, not yet run on a GPU.
#ifndef HYPTORCH_BWD_ACOSH_RSQRT
#define HYPTORCH_BWD_ACOSH_RSQRT 0
#endif
// One-part inputs: dX_ij is rounded to T two elements at a time (the pair an A-operand register holds: one pack,
// and unpacked for the fp32 sums that use the rounded value), and tile_step leaves that packed pair in dp[n][0|2]
// (its bits) for the A operands (to_a_operands_dx), instead of rounding each element (convert, shift back) and
// packing again: two instructions fewer per pair, 32 per step at 64 queries. Same values, same order of every sum.
// Opt-in (-DHYPTORCH_BWD_PAIR_ROUND=1): compile-checked, not yet run on a GPU.
#ifndef HYPTORCH_BWD_PAIR_ROUND
#define HYPTORCH_BWD_PAIR_ROUND 0
#endif
// Kernel 1 with wgmma (sm_90a, one-part inputs) loads its query tiles Q_i, dO_i, dO_lo,i with the TMA unit: one
// thread issues a tensor load per 64-column block (the 128-byte swizzle of the tiles is the tensor map's), completing
// a shared-memory barrier per query buffer that the others wait for, instead of every thread issuing 4-8 16-byte
// cp.async per tile with their addresses (rows past N come back as zeros either way). The launcher encodes the three
// tensor maps (encode_tile_map). Opt-in (-DHYPTORCH_BWD_TMA_LOADS=1): compile-checked, not yet run on a GPU; needs
// the driver's cuTensorMapEncodeTiled (CUDA 12+).
#ifndef HYPTORCH_BWD_TMA_LOADS
#define HYPTORCH_BWD_TMA_LOADS 0
#endif
// Query tile of kernel 1 (and 2) at D = 128 for the dot scores (lorentz_dot, euclidean): 32 halves the per-step
// overhead (barriers, row fields, dQ atomics) per query against 16 (-DHYPTORCH_BWD_D128_DOT_BLOCK_M=16, for A/B).
#ifndef HYPTORCH_BWD_D128_DOT_BLOCK_M
#define HYPTORCH_BWD_D128_DOT_BLOCK_M 32
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HYPTORCH_BWD_WGMMA
constexpr bool kBwdWgmmaArch = true;
#else
constexpr bool kBwdWgmmaArch = false;
#endif

namespace hyptorch_flash {
namespace bwd {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Score families sharing one kernel body (the variant inside a family is a run-time switch).
enum Family : int { FAMILY_DOT = 0, FAMILY_DISTANCE = 1, FAMILY_POINCARE = 2 };

// kParts = 1: bf16/fp16 inputs. kParts = 3: float32 inputs as three bf16 parts x = hi + mid + lo
// (attention_fwd_split.cu's split), every tensor-core product taking the six part products with
// a + b ≤ 2 (mma_parts), so the contractions keep float32 accuracy.
template <int kHeadDim, int kFamily, int kParts = 1>
struct Tile {
  static constexpr bool kSplit = kParts > 1;
  static constexpr int kBlockN = kBwdBlockN;               // keys per CTA (kernel 1) / per step (kernel 2)
  // queries per step (kernel 1) / per CTA (kernel 2); at D = 128 16 for the arccosh scores keeps kernel 1
  // within 255 registers (dK_j and dV_j alone take 128 per thread there), while the dot scores fit 32
  // (HYPTORCH_BWD_D128_DOT_BLOCK_M); 64 for the arccosh scores at D = 64 (HYPTORCH_BWD_D64_ARCCOSH_BLOCK_M); 16 for
  // split inputs, whose operand fragments come in three parts
  static constexpr int kBlockM = kSplit ? 16
                                 : kHeadDim == 128 ? (kFamily == FAMILY_DOT ? HYPTORCH_BWD_D128_DOT_BLOCK_M : 16)
                                 : kFamily == FAMILY_DOT ? 64 : HYPTORCH_BWD_D64_ARCCOSH_BLOCK_M;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kQTiles = kBlockM / 8;  // n8 tiles of Sᵀ (queries)
  static constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of dK, dV (head dim)
  // dQ_i (kBlockM × D) is split over the 4 warps: 16 query rows × kDqCols columns each.
  static constexpr int kRowGroups = kBlockM / 16;
  static constexpr int kDqCols = kHeadDim * kRowGroups / kWarps;
  // dQ columns per pass of the key-parallel kernel (its accumulators sit next to dK_j and dV_j)
  static constexpr int kDqChunkMax = kHeadDim == 64 ? 32 : 16;
  static constexpr int kDqChunk = kDqChunkMax < kDqCols ? kDqChunkMax : kDqCols;
  static constexpr int kRowFields = 5;  // L_i, D_i, dO0_i, w_i (q0 or a_i), |q_i|²
  static constexpr int kKeyFields = 5;  // w_j (k0 or b_j), |k_j|², v0_j, λ_j, visible
  // Split inputs triple every tile: one query buffer then (no prefetch), so the D = 128 tiles fit in
  // shared memory.
  // Split inputs at D = 128: kernel 1 runs twice, once for dV_j and once for dK_j (and dQ), as dK_j, dV_j
  // and the three-part fragments do not fit in 255 registers together.
  static constexpr bool kKvTwoPasses = kSplit && kHeadDim == 128;
  static constexpr int kQueryBuffers = kSplit ? 1 : 2;
  // tiles of kBlockM × D per query buffer: Q_i and dO_i parts, plus dO_i-lo for one part
  static constexpr int kQueryTiles = kSplit ? 2 * kParts : 3;
  // kernel 1 with wgmma (see HYPTORCH_BWD_WGMMA): every operand tile starts on a 1024-byte boundary (the
  // 128-byte swizzle atoms; at D = 64 the tiles' own swizzle, swz<64>, is that layout)
  static constexpr bool kWgmma = HYPTORCH_BWD_WGMMA && !kSplit && (kHeadDim == 64 || HYPTORCH_BWD_WGMMA_D128);
  static constexpr int kAlignSlack = kWgmma ? 1024 : 0;
  // wgmma, dot scores: K_j carries a "time block" (one more 64-column block of the swizzled layout, of which the
  // tensor cores read 8 columns: k0_j as three parts), so dQ_i's product also gives R_i = Σ_j dX_ij k0_j (the
  // row sums otherwise reduced across lanes with shuffles): dQ is m64n72 (attention_bwd_kv_kernel)
  static constexpr bool kRowSumsTC = kWgmma && kFamily == FAMILY_DOT && kBlockM == 64;
  static constexpr int kKTimeElems = kRowSumsTC ? kBlockN * 64 : 0;
  // One-part inputs: the row fields hold L_i·log2 e, so tile_step's
  // P = exp2(coef·log2e·u − L_i·log2e) is one FFMA, and dP − D_i is two FFMA. Split inputs keep the unscaled
  // form and the original order of dP − D_i: float32-level P, and the rounding the float32 gradient grid was
  // measured with (the reordered dP − D_i failed float32 poincare_distance/lorentz dq at D = 64 on the H200).
  static constexpr bool kLogFold = !kSplit;
  // float fields (key fields, row_part, scal, row fields ×2), padded to 16 bytes (wgmma: 1024): the second
  // Q_i/dO_i buffer follows them (see Smem)
  static constexpr int kFloatAlign = kWgmma ? 256 : 4;
  static constexpr int kFloats =
      (2 * kRowFields * kBlockM + kKeyFields * kBlockN + kWarps * kBlockM * 2 + kWarps * 2 + kFloatAlign - 1) /
      kFloatAlign * kFloatAlign;
  // one Q_i / dO_i / dO_i-lo buffer
  template <typename T>
  static constexpr int query_buffer_bytes() {
    return kQueryTiles * kBlockM * kHeadDim * (int)sizeof(T);
  }
  template <typename T>
  static constexpr int smem_bytes() {
    return (kParts * (2 * kBlockN * kHeadDim + kBlockN * kBlockM) + kKTimeElems) * (int)sizeof(T) +
           kQueryBuffers * query_buffer_bytes<T>() + kFloats * (int)sizeof(float) + kAlignSlack;
  }
  // kernel 2 uses one query buffer: the second one, last in the layout, is not allocated (more CTAs per SM)
  template <typename T>
  static constexpr int one_query_buffer_smem_bytes() {
    return smem_bytes<T>() - (kQueryBuffers - 1) * query_buffer_bytes<T>();
  }
};

// Element offset of (row, col) in a tile of kCols 16-bit columns whose 16-byte chunks are XOR-swizzled,
// so the 8 rows one ldmatrix reads land in 8 different bank groups (narrow tiles hold 128 / (2·kCols)
// rows per 128 bytes, and the XOR uses the row bits above those).
template <int kCols>
__device__ __forceinline__ int swz(int row, int col) {
  constexpr int kChunks = kCols / 8;
  static_assert(kChunks == 2 || kChunks == 4 || kChunks == 8 || kChunks == 16, "tile width must be 16..128");
  const int x = kChunks >= 8 ? (row & 7) : kChunks == 4 ? ((row >> 1) & 3) : ((row >> 2) & 1);
  return row * kCols + ((((col >> 3) ^ x)) << 3) + (col & 7);
}

// Element offset of (row, col) in a tile of kRows × kCols: swz<kCols>, or with HYPTORCH_BWD_WGMMA_D128 at 128
// columns two blocks of kRows × 64 (swz<64> each: the 128-byte swizzle wgmma reads), the second after the first.
template <int kCols, int kRows>
__device__ __forceinline__ int swz_tile(int row, int col) {
  if constexpr (kCols == 128 && HYPTORCH_BWD_WGMMA_D128) {
    return (col >> 6) * (kRows * 64) + swz<64>(row, col & 63);
  } else {
    return swz<kCols>(row, col);
  }
}

// Rows [row0, row0 + kRows) of a contiguous (n_rows, kCols) matrix → swizzled tile; rows past n_rows are 0.
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int row0, int n_rows) {
  constexpr int kChunks = kCols / 8;
  static_assert(kRows * kChunks % kThreads == 0, "tile must split evenly over the threads");
  // HYPTORCH_BWD_FULL_TILE_LOADS: thread t copies chunk t % kChunks of rows t / kChunks + k·kRowStep; the swizzle
  // repeats every 8 rows, so each next row's shared offset is the first one's plus a constant (kSmemStep)
  constexpr int kRowStep = kThreads / kChunks;
  if constexpr (HYPTORCH_BWD_FULL_TILE_LOADS && kThreads % kChunks == 0 && kRowStep % 8 == 0) {
    if (row0 + kRows <= n_rows) {
      // = swz_tile(kRowStep, 0): whole rows of kCols, or of 64 in swz_tile's 64-column blocks
      constexpr int kSmemStep = kRowStep * ((kCols == 128 && HYPTORCH_BWD_WGMMA_D128) ? 64 : kCols);
      const int r = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
      const uint32_t dst = smem_addr(tile + swz_tile<kCols, kRows>(r, c * 8));
      const T* from = src + (size_t)(row0 + r) * kCols + c * 8;
#pragma unroll
      for (int it = 0; it < kRows / kRowStep; ++it) {
        cp_async_16(dst + it * kSmemStep * (int)sizeof(T), from + it * kRowStep * kCols, true);
      }
      return;
    }
  }
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + threadIdx.x;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < n_rows;
    cp_async_16(smem_addr(tile + swz_tile<kCols, kRows>(r, c * 8)), src + (size_t)(valid ? row0 + r : 0) * kCols + c * 8, valid);
  }
}

// mma fragments from swizzled shared memory (lane = thread index in the warp); kRows: the tile's height.
// A (16×16) of a [m][k] tile at (m0, k0).
template <int kCols, int kRows, typename T>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const T* s, int m0, int k0, int lane) {
  ldmatrix_x4(a, smem_addr(s + swz_tile<kCols, kRows>(m0 + (lane & 15), k0 + (lane >> 4) * 8)));
}
// A (16×16) of a tile stored transposed, [k][m], at (m0, k0).
template <int kCols, typename T>
__device__ __forceinline__ void frag_a_trans(uint32_t (&a)[4], const T* s, int m0, int k0, int lane) {
  const int mat = lane >> 3, r = lane & 7;
  ldmatrix_x4_trans(a, smem_addr(s + swz<kCols>(k0 + (mat >> 1) * 8 + r, m0 + (mat & 1) * 8)));
}
// B of two n8 tiles (n0..n0+15) × k16 from a [n][k] tile: b[0], b[1] → tile n0, b[2], b[3] → tile n0 + 8.
template <int kCols, int kRows, typename T>
__device__ __forceinline__ void frag_b_nk(uint32_t (&b)[4], const T* s, int n0, int k0, int lane) {
  const int mat = lane >> 3, r = lane & 7;
  ldmatrix_x4(b, smem_addr(s + swz_tile<kCols, kRows>(n0 + (mat >> 1) * 8 + r, k0 + (mat & 1) * 8)));
}
// Same from a [k][n] tile.
template <int kCols, int kRows, typename T>
__device__ __forceinline__ void frag_b_kn(uint32_t (&b)[4], const T* s, int k0, int n0, int lane) {
  const int mat = lane >> 3, r = lane & 7;
  ldmatrix_x4_trans(b, smem_addr(s + swz_tile<kCols, kRows>(k0 + (mat & 1) * 8 + r, n0 + (mat >> 1) * 8)));
}

// 1/x on the SFU (rcp.approx, 1 ulp; no IEEE slow-path call, which would need a stack frame).
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// sqrt and 1/x for the row/key constants and the arccosh derivative: the SFU approximation (about 1 ulp
// off), or for split float32 inputs (kAccurate) one Newton step more (within an ulp of the IEEE result,
// without the IEEE slow path's call and stack frame). 0 and ±inf results are kept as they are (the step
// would turn them into NaN).
template <bool kAccurate>
__device__ __forceinline__ float sqrt_f(float x) {
  const float s = fast_sqrt(x);
  if constexpr (!kAccurate) {
    return s;
  } else {
    return s > 0.f && s < CUDART_INF_F ? fmaf(fmaf(-s, s, x), 0.5f * fast_rcp(s), s) : s;  // s + (x − s²)/(2s)
  }
}

template <bool kAccurate>
__device__ __forceinline__ float rcp_f(float x) {
  const float y = fast_rcp(x);
  if constexpr (!kAccurate) {
    return y;
  } else {
    return y != 0.f && fabsf(y) < CUDART_INF_F ? fmaf(y, fmaf(-x, y, 1.f), y) : y;  // y + y(1 − xy)
  }
}

template <typename T>
__device__ __forceinline__ float round_to(float x) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(__float2bfloat16_rn(x));
  } else {
    return __half2float(__float2half_rn(x));
  }
}

// Per-(batch, head) constants.
struct HeadConst {
  float kappa, inv_kappa, sqrt_k, coef, acosh_eps;
  bool squared, lorentz;  // lorentz: time coordinates in use (every score but euclidean)
};

// X_ij, u_ij = s_ij/coef and ∂s/∂X for one score element (see the header comment).
// qw, kw: q0/k0 (dot, distance) or a_i/b_j (poincare); qsq, ksq: |q|², |k|² (poincare).
template <int kFamily, bool kAccurate = false>
__device__ __forceinline__ void score_terms(float dot, float qw, float qsq, float kw, float ksq, const HeadConst& hc,
                                            float& X, float& u, float& ds_dX) {
  if constexpr (kFamily == FAMILY_DOT) {
    X = dot - qw * kw;
    u = X;
    ds_dX = hc.coef;
  } else {
    float z, dz_dX;
    bool pass = true;
    if constexpr (kFamily == FAMILY_DISTANCE) {
      X = dot - qw * kw;  // <q,k>_L
      z = -X * hc.inv_kappa;
      dz_dX = -hc.inv_kappa;
    } else {
      const float x_raw = qsq + ksq - 2.f * dot;  // |p − q|², clamped ≥ 0 like the reference
      pass = x_raw >= 0.f;
      X = fmaxf(x_raw, 0.f);
      dz_dX = 2.f * hc.inv_kappa * qw * kw;
      z = fmaf(dz_dX, X, 1.f);
    }
    // arccosh with its argument clamped to ≥ 1 + eps (arccosh' is infinite at 1: the diagonal)
    const float zmin = 1.f + hc.acosh_eps;
    const float zc = fmaxf(z, zmin);
#if HYPTORCH_BWD_ACOSH_RSQRT
    float root, inv_root;  // √(z² − 1) and its reciprocal
    if constexpr (!kAccurate) {
      const float r2 = fminf((zc - 1.f) * (zc + 1.f), FLT_MAX);
      inv_root = fast_rsqrt(r2);
      root = r2 * inv_root;
    } else {
      root = sqrt_f<kAccurate>((zc - 1.f) * (zc + 1.f));
      inv_root = rcp_f<kAccurate>(root);
    }
    const float acosh_z = kLn2 * fast_log2(zc + root);  // arccosh(z) = ln(z + sqrt(z² − 1))
#else
    const float root = sqrt_f<kAccurate>((zc - 1.f) * (zc + 1.f));
    const float acosh_z = kLn2 * fast_log2(zc + root);  // arccosh(z) = ln(z + sqrt(z² − 1))
    const float inv_root = rcp_f<kAccurate>(root);
#endif
    float ds_dz;
    if (hc.squared) {
      u = -hc.kappa * acosh_z * acosh_z;
      ds_dz = -2.f * hc.coef * hc.kappa * acosh_z * inv_root;
    } else {
      u = -hc.sqrt_k * acosh_z;
      ds_dz = -hc.coef * hc.sqrt_k * inv_root;
    }
    ds_dX = (pass && z >= zmin) ? ds_dz * dz_dX : 0.f;
  }
}

// Shared memory of the kernels. With split inputs (kParts = 3) k, v, q, dout and dxt point at part 0
// and part p of each follows at p · k_part / q_part / dxt_part elements.
template <typename T, int kHeadDim, int kFamily, int kParts = 1>
struct Smem {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  static constexpr int kv_part = Tl::kBlockN * kHeadDim;
  static constexpr int q_part = Tl::kBlockM * kHeadDim;
  static constexpr int dxt_part = Tl::kBlockN * Tl::kBlockM;
  T* k;       // K_j  [kBlockN][D]
  T* v;       // V_j  [kBlockN][D]
  T* q;       // Q_i  [kBlockM][D]
  T* dout;    // dO_i [kBlockM][D] (rounded to T)
  T* dout_lo;  // dO_i − dout, rounded to T: dO_i in two terms, so its rounding does not break the
               // cancellation between space and time parts of dP_ij at large norms (kParts = 1 only)
  T* dxt;     // dX_ijᵀ [kBlockN][kBlockM]
  float* row;  // [kRowFields][kBlockM]
  float* key;  // [kKeyFields][kBlockN]
  float* row_part;  // [kWarps][kBlockM][2]: per-warp partial row sums (R_i, RX_i)
  float* scal;      // [kWarps][2]
  // buf selects one of the two Q_i/dO_i/row-field buffers (kernel 1 prefetches the next query tile into
  // the other while it computes); K/V and dxt are single. Layout: K/V | dxt | Q/dO/dO-lo buffer 0 |
  // floats | Q/dO/dO-lo buffer 1 (last, so kernel 2, which uses buffer 0 only, allocates
  // one_query_buffer_smem_bytes). Split inputs have one query buffer (buf = 0).
  __device__ explicit Smem(char* base, int buf = 0) {
    k = reinterpret_cast<T*>(base);
    v = k + kParts * kv_part + Tl::kKTimeElems;  // (K_j's time block between, Tile::kRowSumsTC)
    dxt = v + kParts * kv_part;
    T* const query0 = dxt + kParts * dxt_part;
    float* floats = reinterpret_cast<float*>(query0 + Tl::kQueryTiles * q_part);
    key = floats;
    row_part = floats + Tl::kKeyFields * Tl::kBlockN;
    scal = row_part + Tl::kWarps * Tl::kBlockM * 2;
    row = scal + Tl::kWarps * 2 + buf * Tl::kRowFields * Tl::kBlockM;
    static_assert(Tl::kFloats * sizeof(float) % sizeof(T) == 0, "buffer 1 must start on a T boundary");
    q = query0 + buf * (Tl::kQueryTiles * q_part + Tl::kFloats * (int)(sizeof(float) / sizeof(T)));
    dout = q + kParts * q_part;
    dout_lo = dout + q_part;
  }
};

enum RowField : int { ROW_LSE = 0, ROW_DELTA = 1, ROW_DO0 = 2, ROW_W = 3, ROW_SQ = 4 };
enum KeyField : int { KEY_W = 0, KEY_SQ = 1, KEY_V0 = 2, KEY_LAMBDA = 3, KEY_VISIBLE = 4 };

template <int kFamily, bool kAccurate = false>
__device__ __forceinline__ HeadConst head_const(const BwdParams& p, int h) {
  HeadConst hc;
  hc.kappa = p.curvature[h];
  hc.inv_kappa = rcp_f<kAccurate>(hc.kappa);
  hc.sqrt_k = sqrt_f<kAccurate>(hc.kappa);
  hc.coef = p.coef[h];
  hc.acosh_eps = p.acosh_eps;
  hc.squared = p.squared;
  hc.lorentz = p.score != 0;
  return hc;
}

// Row fields of Q_i (rows i0..i0+kBlockM-1 of head bh), in two halves so that kernel 1 can prefetch them: the
// global loads of thread r's row into registers (load_row_raw), and later the derived fields and the
// shared-memory stores (store_row_fields). Rows ≥ N and rows that see no key get L = +inf, so every P_ij of
// theirs is exp2(−inf) = 0.
struct RowRaw {
  float lse, delta, do0, sq;
};

template <int kHeadDim, int kFamily, int kParts>
__device__ __forceinline__ RowRaw load_row_raw(const BwdParams& p, size_t bh, int i0) {
  static_assert(Tile<kHeadDim, kFamily, kParts>::kBlockM <= Tile<kHeadDim, kFamily, kParts>::kThreads,
                "one row per thread");
  RowRaw raw{CUDART_INF_F, 0.f, 0.f, 0.f};
  const int i = i0 + threadIdx.x;
  if (threadIdx.x < Tile<kHeadDim, kFamily, kParts>::kBlockM && i < p.n_queries) {
    const size_t idx = bh * p.n_queries + i;
    raw.lse = p.lse[idx];
    raw.delta = p.delta[idx];
    raw.do0 = p.dout0[idx];
    raw.sq = p.q_sq[idx];
  }
  return raw;
}

template <int kHeadDim, int kFamily, int kParts>
__device__ __forceinline__ void store_row_fields(float* row, const RowRaw& raw, const HeadConst& hc) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  const int r = threadIdx.x;
  if (r >= Tl::kBlockM) return;
  float w;
  if constexpr (kFamily == FAMILY_POINCARE) {
    w = rcp_f<(kParts > 1)>(1.f - fminf(hc.inv_kappa * raw.sq, 1.f - numerics::BALL_MARGIN_F32));  // a_i
  } else {
    w = hc.lorentz ? sqrt_f<(kParts > 1)>(hc.kappa + raw.sq) : 0.f;  // q0_i
  }
  const float lse = raw.lse == -CUDART_INF_F ? CUDART_INF_F : raw.lse;
  row[ROW_LSE * Tl::kBlockM + r] = Tl::kLogFold ? lse * kLog2e : lse;
  row[ROW_DELTA * Tl::kBlockM + r] = raw.delta;
  row[ROW_DO0 * Tl::kBlockM + r] = raw.do0;
  row[ROW_W * Tl::kBlockM + r] = w;
  row[ROW_SQ * Tl::kBlockM + r] = raw.sq;
}

template <int kHeadDim, int kFamily, int kParts>
__device__ __forceinline__ void load_row_fields(float* row, const BwdParams& p, const HeadConst& hc, size_t bh, int i0) {
  store_row_fields<kHeadDim, kFamily, kParts>(row, load_row_raw<kHeadDim, kFamily, kParts>(p, bh, i0), hc);
}

// Key fields of K_j/V_j (keys j0..j0+kBlockN-1 of kv head (b, hk)); invisible = j ≥ M or padded.
template <int kHeadDim, int kFamily, int kParts>
__device__ __forceinline__ void load_key_fields(float* key, const BwdParams& p, const HeadConst& hc, int b,
                                                size_t bhk, int j0) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  for (int r = threadIdx.x; r < Tl::kBlockN; r += Tl::kThreads) {
    const int j = j0 + r;
    float ksq = 0.f, vsq = 0.f, visible = 0.f;
    if (j < p.n_keys) {
      ksq = p.k_sq[bhk * p.n_keys + j];
      vsq = p.v_sq[bhk * p.n_keys + j];
      visible = (p.key_padding != nullptr && p.key_padding[(size_t)b * p.n_keys + j] != 0) ? 0.f : 1.f;
    }
    float w, v0, lambda = 1.f;
    if constexpr (kFamily == FAMILY_POINCARE) {
      const float top = 1.f - numerics::BALL_MARGIN_F32;
      w = rcp_f<(kParts > 1)>(1.f - fminf(hc.inv_kappa * ksq, top));  // b_j
      const float av = fminf(vsq * hc.inv_kappa, top), inv = rcp_f<(kParts > 1)>(1.f - av);
      v0 = hc.sqrt_k * (1.f + av) * inv;  // Lorentz lift of a ball point: x0 = √k(1 + a)/(1 − a), xs = 2p/(1 − a)
      lambda = 2.f * inv;
    } else {
      w = hc.lorentz ? sqrt_f<(kParts > 1)>(hc.kappa + ksq) : 0.f;   // k0_j
      v0 = hc.lorentz ? sqrt_f<(kParts > 1)>(hc.kappa + vsq) : 0.f;  // v0_j
    }
    key[KEY_W * Tl::kBlockN + r] = w;
    key[KEY_SQ * Tl::kBlockN + r] = ksq;
    key[KEY_V0 * Tl::kBlockN + r] = v0;
    key[KEY_LAMBDA * Tl::kBlockN + r] = lambda;
    key[KEY_VISIBLE * Tl::kBlockN + r] = visible;
  }
}

// Per-thread accumulators of the key-side reductions (kernel 1): rows g and g + 8 of the warp's keys.
struct KeySums {
  float c[2] = {0.f, 0.f}, cx[2] = {0.f, 0.f}, dv0[2] = {0.f, 0.f};
  float s1 = 0.f, s2 = 0.f;  // Σ dS·u, Σ dX·X
  float s1_err = 0.f, s2_err = 0.f;  // split inputs: Kahan compensations of s1, s2 (sums over all N queries)
};

// s + x with Kahan's compensation `err` (Neumaier would not matter here: per-tile partials are small).
__device__ __forceinline__ void kahan_add(float& s, float& err, float x) {
  const float y = x - err;
  const float t = s + y;
  err = (t - s) - y;
  s = t;
}

// acc0, acc1 (two n8 tiles) += Σ A_a·B_b over the part pairs with a + b < max(kA, kB): every product
// for one-part operands, hi·hi + hi·lo + lo·hi for two, the six that matter for three (mma_split in
// attention_fwd_kernel.cuh), smallest first. b[part] holds the B operands of both n8 tiles (frag_b_*).
template <typename T, int kA, int kB>
__device__ __forceinline__ void mma_parts(float (&acc0)[4], float (&acc1)[4], const uint32_t (&a)[kA][4],
                                          const uint32_t (&b)[kB][4]) {
  constexpr int kTerms = kA > kB ? kA : kB;
#pragma unroll
  for (int ia = kA - 1; ia >= 0; --ia) {
#pragma unroll
    for (int ib = kB - 1; ib >= 0; --ib) {
      if (ia + ib < kTerms) {
        mma_16816<T>(acc0, a[ia], b[ib][0], b[ib][1]);
        mma_16816<T>(acc1, a[ia], b[ib][2], b[ib][3]);
      }
    }
  }
}

// Split inputs: the tensor cores round an fp32 accumulation toward zero, and that bias grows with every
// mma into the same registers (the running dK_j, dV_j over all query tiles, S over the head dim). With
// kParts > 1 each k16 step's part products go to zeroed registers first and are added to the running sums
// with round-to-nearest fp32 adds (a few percent more instructions, float32 error no longer growing with N).
__device__ __forceinline__ void add4(float (&acc)[4], const float (&t)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) acc[e] += t[e];
}

template <typename T, int kA, int kB, bool kFresh>
__device__ __forceinline__ void mma_parts_acc(float (&acc0)[4], float (&acc1)[4], const uint32_t (&a)[kA][4],
                                              const uint32_t (&b)[kB][4]) {
  if constexpr (kFresh) {
    float t0[4] = {0.f, 0.f, 0.f, 0.f}, t1[4] = {0.f, 0.f, 0.f, 0.f};
    mma_parts<T, kA, kB>(t0, t1, a, b);
    add4(acc0, t0);
    add4(acc1, t1);
  } else {
    mma_parts<T, kA, kB>(acc0, acc1, a, b);
  }
}

// S_ijᵀ = K_j Q_iᵀ and dP_ijᵀ = V_j (dO_i + dO_lo,i)ᵀ for the warp's 16 keys (space parts, fp32 accumulate).
template <typename T, int kHeadDim, int kFamily, int kParts, bool kWithDp = true>
__device__ __forceinline__ void score_mma(const Smem<T, kHeadDim, kFamily, kParts>& sm, bool has_lo,
                                          float (&sp)[Tile<kHeadDim, kFamily, kParts>::kQTiles][4],
                                          float (&dp)[Tile<kHeadDim, kFamily, kParts>::kQTiles][4]) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  using Sm = Smem<T, kHeadDim, kFamily, kParts>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int key0 = warp * 16;
#pragma unroll
  for (int n = 0; n < Tl::kQTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) sp[n][e] = dp[n][e] = 0.f;
  }
  // split inputs: one k16 step at a time (their part fragments and zeroed accumulators, unrolled over
  // the head dim, would not fit in registers)
  constexpr int kUnrollK = kParts > 1 ? 1 : kHeadDim / 16;
#pragma unroll kUnrollK
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    // One-part inputs interleave the S and dP products; split ones finish S first (fragment registers).
    constexpr bool kInterleave = kWithDp && kParts == 1;
    uint32_t ak[kParts][4], av[kParts][4];
#pragma unroll
    for (int part = 0; part < kParts; ++part) frag_a<kHeadDim, Tl::kBlockN>(ak[part], sm.k + part * Sm::kv_part, key0, kk * 16, lane);
    if constexpr (kInterleave) frag_a<kHeadDim, Tl::kBlockN>(av[0], sm.v, key0, kk * 16, lane);
#pragma unroll
    for (int n2 = 0; n2 < Tl::kQTiles / 2; ++n2) {
      uint32_t bq[kParts][4], bo[kParts][4];
#pragma unroll
      for (int part = 0; part < kParts; ++part) frag_b_nk<kHeadDim, Tl::kBlockM>(bq[part], sm.q + part * Sm::q_part, n2 * 16, kk * 16, lane);
      mma_parts_acc<T, kParts, kParts, (kParts > 1)>(sp[2 * n2], sp[2 * n2 + 1], ak, bq);
      if constexpr (kInterleave) {
        frag_b_nk<kHeadDim, Tl::kBlockM>(bo[0], sm.dout, n2 * 16, kk * 16, lane);
        mma_parts<T, 1, 1>(dp[2 * n2], dp[2 * n2 + 1], av, bo);
      }
    }
    if constexpr (kWithDp && !kInterleave) {
#pragma unroll
      for (int part = 0; part < kParts; ++part) frag_a<kHeadDim, Tl::kBlockN>(av[part], sm.v + part * Sm::kv_part, key0, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < Tl::kQTiles / 2; ++n2) {
        uint32_t bo[kParts][4];
#pragma unroll
        for (int part = 0; part < kParts; ++part) {
          frag_b_nk<kHeadDim, Tl::kBlockM>(bo[part], sm.dout + part * Sm::q_part, n2 * 16, kk * 16, lane);
        }
        mma_parts_acc<T, kParts, kParts, false>(dp[2 * n2], dp[2 * n2 + 1], av, bo);
      }
    }
  }
  if constexpr (kParts == 1 && kWithDp) {
    if (!has_lo) return;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t av[1][4];
      frag_a<kHeadDim, Tl::kBlockN>(av[0], sm.v, key0, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < Tl::kQTiles / 2; ++n2) {
        uint32_t bo[1][4];
        frag_b_nk<kHeadDim, Tl::kBlockM>(bo[0], sm.dout_lo, n2 * 16, kk * 16, lane);
        mma_parts<T, 1, 1>(dp[2 * n2], dp[2 * n2 + 1], av, bo);
      }
    }
  }
}

// score_mma on the Hopper tensor cores (kernel 1, Tile::kWgmma): the warpgroup's 64 keys × kBlockM queries,
// S_ijᵀ = K_j Q_iᵀ and dP_ijᵀ = V_j (dO_i + dO_lo,i)ᵀ, each k-step one wgmma over 16 columns (32 bytes) of the
// 128-byte swizzled rows (at D = 128 in two 64-column blocks). dO_lo is always issued (a zeroed tile without it: exact zeros added), since ptxas
// serialises wgmma issued on some paths only. Accumulators: the mma.sync layout of the warp's 16 keys.
// score_wgmma_issue commits them as one group; score_wgmma_wait waits for every group in flight.
template <typename T, int kHeadDim, int kFamily>
__device__ __forceinline__ void score_wgmma_issue(const Smem<T, kHeadDim, kFamily, 1>& sm,
                                                  float (&sp)[Tile<kHeadDim, kFamily, 1>::kQTiles][4],
                                                  float (&dp)[Tile<kHeadDim, kFamily, 1>::kQTiles][4]) {
  constexpr int kBlockM = Tile<kHeadDim, kFamily, 1>::kBlockM;
  if constexpr (!HYPTORCH_BWD_OVERWRITE_FIRST) {
#pragma unroll
    for (int n = 0; n < kBlockM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sp[n][e] = dp[n][e] = 0.f;
    }
    fence_registers(sp);
    fence_registers(dp);
  }
  const uint32_t k_lo = smem_desc_lo(smem_addr(sm.k), 16), v_lo = smem_desc_lo(smem_addr(sm.v), 16);
  const uint32_t q_lo = smem_desc_lo(smem_addr(sm.q), 16), o_lo = smem_desc_lo(smem_addr(sm.dout), 16);
  const uint32_t dlo_lo = smem_desc_lo(smem_addr(sm.dout_lo), 16);
  // k-step s: columns 16s … 16s + 15, in 64-column block s / 4 of the tile (swz_tile), 32 bytes per step within it
  constexpr int kBlockN = Tile<kHeadDim, kFamily, 1>::kBlockN;
  auto key_col = [](int s) { return (uint32_t)((s >> 2) * kBlockN * 128 + (s & 3) * 32); };
  auto query_col = [](int s) { return (uint32_t)((s >> 2) * kBlockM * 128 + (s & 3) * 32); };
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < kHeadDim / 16; ++s) {
    if (HYPTORCH_BWD_OVERWRITE_FIRST && s == 0) {  // (s is a constant: the loop is unrolled)
      wgmma_ss<T, kBlockM, false>(sp, smem_desc_at(k_lo, key_col(s), 1024), smem_desc_at(q_lo, query_col(s), 1024));
      wgmma_ss<T, kBlockM, false>(dp, smem_desc_at(v_lo, key_col(s), 1024), smem_desc_at(o_lo, query_col(s), 1024));
    } else {
      wgmma_ss<T, kBlockM>(sp, smem_desc_at(k_lo, key_col(s), 1024), smem_desc_at(q_lo, query_col(s), 1024));
      wgmma_ss<T, kBlockM>(dp, smem_desc_at(v_lo, key_col(s), 1024), smem_desc_at(o_lo, query_col(s), 1024));
    }
  }
#pragma unroll
  for (int s = 0; s < kHeadDim / 16; ++s) {
    wgmma_ss<T, kBlockM>(dp, smem_desc_at(v_lo, key_col(s), 1024), smem_desc_at(dlo_lo, query_col(s), 1024));
  }
  wgmma_commit();
}

template <int kTiles>
__device__ __forceinline__ void score_wgmma_wait(float (&sp)[kTiles][4], float (&dp)[kTiles][4]) {
  wgmma_wait<0>();
  fence_registers(sp);
  fence_registers(dp);
}

// HYPTORCH_BWD_PAIR_ROUND applies to one-part inputs of the dot and Poincaré scores (the distance scores' kernel 1
// grows by ~400 instructions with it: not taken)
template <int kFamily, int kParts>
constexpr bool kPairRound = HYPTORCH_BWD_PAIR_ROUND && kParts == 1 && kFamily != FAMILY_DISTANCE;

// poincare_distance: the factor of dX·X in ∂L/∂c (tile_step's key sums, HYPTORCH_BWD_PAIR_ROUND)
__device__ __forceinline__ float poincare_dc(const HeadConst& hc, float qsq, float qw, float ksq, float kw) {
  const float ball = 1.f - numerics::BALL_MARGIN_F32;
  return hc.kappa + (hc.inv_kappa * qsq <= ball ? qsq * qw : 0.f) + (hc.inv_kappa * ksq <= ball ? ksq * kw : 0.f);
}

// One (Q_i, K_j) step shared by both kernels: recompute S_ijᵀ, P_ijᵀ and dP_ijᵀ for the warp's 16 keys
// and all kBlockM queries; leave Pᵀ in `sp` and dXᵀ in `dp` (rounded to T for one-part inputs; split
// inputs split it into parts exactly). Row sums (R_i, RX_i) of the warp go to row_part[warp]
// (overwritten if !kAccumulateRows, else added), or with kRowDs (the delta pass) Σ_j dS_ij; key sums to `ks`.
// kWgmma: S/dP by wgmma (score_wgmma_issue), or with kScoresInFlight already issued by the caller (waited for here).
// on_half (HYPTORCH_BWD_SPLIT_STEP): called between the element-wise work of the first and the second half of the
// queries, with P and dX of the first half final in sp/dp (kernel 1 issues their dV/dK products there).
struct NoHalfCallback {
  __device__ void operator()() const {}
};

template <typename T, int kHeadDim, int kFamily, int kParts, bool kKeySums, bool kAccumulateRows, bool kRowDs = false,
          bool kWgmma = false, bool kScoresInFlight = false, typename OnHalf = NoHalfCallback>
__device__ __forceinline__ void tile_step(const Smem<T, kHeadDim, kFamily, kParts>& sm, const HeadConst& hc, int i0,
                                          int j0, bool causal, bool keys_all_visible, bool row_sums, bool has_lo,
                                          float (&sp)[Tile<kHeadDim, kFamily, kParts>::kQTiles][4],
                                          float (&dp)[Tile<kHeadDim, kFamily, kParts>::kQTiles][4], KeySums& ks,
                                          const OnHalf& on_half = {}) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int key0 = warp * 16;
  // this tile's share of the per-head sums (split inputs add it to ks with Kahan's compensation)
  float tile_s1 = 0.f, tile_s2 = 0.f;
  float& s1 = kParts > 1 ? tile_s1 : ks.s1;
  float& s2 = kParts > 1 ? tile_s2 : ks.s2;

  if constexpr (kWgmma) {
    if constexpr (!kScoresInFlight) score_wgmma_issue<T, kHeadDim, kFamily>(sm, sp, dp);
    score_wgmma_wait(sp, dp);
  } else {
    score_mma<T, kHeadDim, kFamily, kParts>(sm, has_lo, sp, dp);
  }

  // `masked`: some (query, key) pair of the tile is invisible (key padding, keys past M, causal diagonal);
  // the other tiles, most of them, run without the per-element visibility test and its branches (a branch
  // around each exp2 and each key-sum update). `sums`: whether the row sums are formed (a constant
  // true_type/false_type, so the branch is taken once per step). n-tiles [n0, n1) of the queries.
  constexpr bool kLogFold = Tl::kLogFold;
  const float coef_log2e = hc.coef * kLog2e;
  auto elementwise = [&](auto masked, auto sums, auto n0, auto n1) {
    // this thread's two keys' fields, once per step
    float key_w[2], key_sq[2], key_v0[2], key_lam[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = key0 + g + 8 * h;
      key_w[h] = sm.key[KEY_W * Tl::kBlockN + r];
      key_sq[h] = sm.key[KEY_SQ * Tl::kBlockN + r];
      key_v0[h] = sm.key[KEY_V0 * Tl::kBlockN + r];
      key_lam[h] = sm.key[KEY_LAMBDA * Tl::kBlockN + r];
    }
#pragma unroll
  for (int n = decltype(n0)::value; n < decltype(n1)::value; ++n) {
    float r_w[2] = {0.f, 0.f}, r_x[2] = {0.f, 0.f};
#if HYPTORCH_BWD_PAIR_ROUND
    [[maybe_unused]] float pair_dx[2], pair_x[2];  // the pair's unrounded dX and X
    [[maybe_unused]] bool pair_valid[2];
#endif
    // the row fields of this thread's two query columns n·8 + 2t, + 1 (adjacent: one 8-byte load each)
    auto row_pair = [&](int field) {
      return *reinterpret_cast<const float2*>(sm.row + field * Tl::kBlockM + n * 8 + 2 * t);
    };
    const float2 lse2 = row_pair(ROW_LSE), delta2 = row_pair(ROW_DELTA), do02 = row_pair(ROW_DO0),
                 qw2 = row_pair(ROW_W);
    const float2 qsq2 = kFamily == FAMILY_POINCARE ? row_pair(ROW_SQ) : make_float2(0.f, 0.f);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1, c = e & 1;
      const int ii = n * 8 + 2 * t + c;
      const int r = key0 + g + 8 * h;
      const float kw = key_w[h], ksq = key_sq[h], v0 = key_v0[h], lam = key_lam[h];
      const bool visible = decltype(masked)::value && sm.key[KEY_VISIBLE * Tl::kBlockN + r] != 0.f;
      const float lse = c ? lse2.y : lse2.x, delta = c ? delta2.y : delta2.x, do0 = c ? do02.y : do02.x;
      const float qw = c ? qw2.y : qw2.x, qsq = c ? qsq2.y : qsq2.x;
      float X, u, ds_dX;
      score_terms<kFamily, (kParts > 1)>(sp[n][e], qw, qsq, kw, ksq, hc, X, u, ds_dX);
      const bool valid = !decltype(masked)::value || (visible && (!causal || j0 + r <= i0 + ii));
      // P_ij = exp(S_ij − L_i)
      // (kLogFold: lse and the coefficient already scaled by log2 e, one FFMA)
      const float P = valid ? fast_exp2(kLogFold ? fmaf(coef_log2e, u, -lse) : (hc.coef * u - lse) * kLog2e) : 0.f;
      // dP_ij = dO_L,i · lift(v_j) = λ_j (dO_s,i · v_j) + dO0_i v0_j;  dS_ij = P_ij (dP_ij − D_i)
      const float dP_delta = kLogFold ? fmaf(lam, dp[n][e], fmaf(do0, v0, -delta))  // one rounding fewer
                                      : fmaf(lam, dp[n][e], do0 * v0) - delta;
      const float dS = P * dP_delta;
      const float dx_exact = dS * ds_dX;
#if HYPTORCH_BWD_PAIR_ROUND
      // the sums over dX of one element (its rounded value), in the order of the elements
      auto dx_sums = [&](float dX, float X, bool valid, int h, int c, float qw, float kw) {
        if constexpr (kKeySums) {
          if constexpr (kFamily == FAMILY_DISTANCE) {
            if (valid) s2 = fmaf(dX, X, s2);
          }
          ks.c[h] = fmaf(dX, kFamily == FAMILY_POINCARE ? 1.f : qw, ks.c[h]);
          if constexpr (kFamily == FAMILY_POINCARE) ks.cx[h] = fmaf(dX, X, ks.cx[h]);
        }
        if constexpr (!kRowDs) {
          r_w[c] = fmaf(dX, kFamily == FAMILY_POINCARE ? 1.f : kw, r_w[c]);
          if constexpr (kFamily == FAMILY_POINCARE) r_x[c] = fmaf(dX, X, r_x[c]);
        }
      };
      if constexpr (kKeySums) {
        if (valid) {
          s1 = fmaf(dS, u, s1);
          if constexpr (kFamily == FAMILY_POINCARE) s2 = fmaf(dx_exact * X, poincare_dc(hc, qsq, qw, ksq, kw), s2);
        }
        ks.dv0[h] = fmaf(P, do0, ks.dv0[h]);
      }
      if constexpr (kRowDs) r_w[c] += dS;
      sp[n][e] = P;
      if constexpr (kPairRound<kFamily, kParts>) {
        // elements e − 1, e (c = 0, 1 of key row h): rounded together once both are known (e is a constant)
        pair_dx[c] = dx_exact, pair_x[c] = X, pair_valid[c] = valid;
        if (c == 1) {
          const uint32_t packed = pack2<T>(pair_dx[0], pair_dx[1]);
          const float2 rounded = unpack2<T>(packed);
          dx_sums(rounded.x, pair_x[0], pair_valid[0], h, 0, qw2.x, kw);
          dx_sums(rounded.y, pair_x[1], pair_valid[1], h, 1, qw2.y, kw);
          dp[n][e - 1] = __uint_as_float(packed);  // (to_a_operands_dx; dp[n][e] is left as it was)
        }
      } else {
        const float dX = kParts == 1 ? round_to<T>(dx_exact) : dx_exact;
        dx_sums(dX, X, valid, h, c, qw, kw);
        dp[n][e] = dX;
      }
#else
      const float dX = kParts == 1 ? round_to<T>(dx_exact) : dx_exact;
      if constexpr (kKeySums) {
        if (valid) {
          s1 = fmaf(dS, u, s1);
          if constexpr (kFamily == FAMILY_DISTANCE) s2 = fmaf(dX, X, s2);
          if constexpr (kFamily == FAMILY_POINCARE) {
            // ∂L/∂c at fixed p, q (c = 1/k): Σ dX·X·(1/c + |p|²a_i + |q|²b_j), the a/b terms where
            // unclamped. Unrounded dX: no tensor-core term has to cancel against this one.
            const float top = 1.f - numerics::BALL_MARGIN_F32;
            const float alpha = hc.inv_kappa * qsq <= top ? qsq * qw : 0.f;
            const float beta = hc.inv_kappa * ksq <= top ? ksq * kw : 0.f;
            s2 = fmaf(dx_exact * X, hc.kappa + alpha + beta, s2);
          }
        }
        ks.dv0[h] = fmaf(P, do0, ks.dv0[h]);
        ks.c[h] = fmaf(dX, kFamily == FAMILY_POINCARE ? 1.f : qw, ks.c[h]);
        if constexpr (kFamily == FAMILY_POINCARE) ks.cx[h] = fmaf(dX, X, ks.cx[h]);
      }
      if constexpr (kRowDs) {
        r_w[c] += dS;
      } else {
        r_w[c] = fmaf(dX, kFamily == FAMILY_POINCARE ? 1.f : kw, r_w[c]);
        if constexpr (kFamily == FAMILY_POINCARE) r_x[c] = fmaf(dX, X, r_x[c]);
      }
      sp[n][e] = P;
      dp[n][e] = dX;
#endif
    }
    if (sums) {
      // Σ over the warp's 16 keys: the 8 lanes sharing t hold the same two query columns.
#pragma unroll
      for (int c = 0; c < 2; ++c) {
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
          r_w[c] += __shfl_xor_sync(0xffffffffu, r_w[c], off);
          if constexpr (kFamily == FAMILY_POINCARE) r_x[c] += __shfl_xor_sync(0xffffffffu, r_x[c], off);
        }
        if (g == 0) {
          float* dst = sm.row_part + (warp * Tl::kBlockM + n * 8 + 2 * t + c) * 2;
          if constexpr (kAccumulateRows) {
            dst[0] += r_w[c];
            dst[1] += r_x[c];
          } else {
            dst[0] = r_w[c];
            dst[1] = r_x[c];
          }
        }
      }
    }
  }
  };
  const std::true_type yes;
  const std::false_type no;
  const bool masked = !keys_all_visible || (causal && j0 + Tl::kBlockN - 1 > i0);
  auto run = [&](auto n0, auto n1) {
    if (masked) {
      if (row_sums) elementwise(yes, yes, n0, n1);
      else elementwise(yes, no, n0, n1);
    } else {
      if (row_sums) elementwise(no, yes, n0, n1);
      else elementwise(no, no, n0, n1);
    }
  };
  if constexpr (std::is_same<OnHalf, NoHalfCallback>::value) {
    run(std::integral_constant<int, 0>{}, std::integral_constant<int, Tl::kQTiles>{});
  } else {
    run(std::integral_constant<int, 0>{}, std::integral_constant<int, Tl::kQTiles / 2>{});
    on_half();
    run(std::integral_constant<int, Tl::kQTiles / 2>{}, std::integral_constant<int, Tl::kQTiles>{});
  }
  if constexpr (kKeySums && kParts > 1) {
    kahan_add(ks.s1, ks.s1_err, tile_s1);
    kahan_add(ks.s2, ks.s2_err, tile_s2);
  }
}

// m16n8 accumulators of kBlockM columns → A operands (16 × kBlockM), the FA2 register reuse:
// the C fragments of n-tiles 2kk and 2kk+1 are the A fragment of k-step kk. With kParts > 1 the
// values are split, c = Σ_part a[.][part] (each part the rounding of what the previous ones leave).
// (k-steps [kKBegin, kKEnd) only: the A operands of part of the queries)
template <typename T, int kHeadDim, int kFamily, int kParts, int kKBegin = 0,
          int kKEnd = Tile<kHeadDim, kFamily, kParts>::kBlockM / 16>
__device__ __forceinline__ void to_a_operands(const float (&c)[Tile<kHeadDim, kFamily, kParts>::kQTiles][4],
                                              uint32_t (&a)[Tile<kHeadDim, kFamily, kParts>::kBlockM / 16][kParts][4]) {
#pragma unroll
  for (int kk = kKBegin; kk < kKEnd; ++kk) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {  // reg: bit 1 = n-tile 2kk / 2kk + 1, bit 0 = elements 0, 1 / 2, 3
      float x0 = c[2 * kk + (reg >> 1)][2 * (reg & 1)], x1 = c[2 * kk + (reg >> 1)][2 * (reg & 1) + 1];
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        a[kk][part][reg] = pack2<T>(x0, x1);
        if (part + 1 < kParts) {
          const float2 r = unpack2<T>(a[kk][part][reg]);
          x0 -= r.x, x1 -= r.y;  // exact: the rounding residue is representable
        }
      }
    }
  }
}

// The A operands of dXᵀ from tile_step's dp: to_a_operands, or with HYPTORCH_BWD_PAIR_ROUND (one-part inputs) the
// packed pairs tile_step left in dp[n][0] and dp[n][2].
template <typename T, int kHeadDim, int kFamily, int kParts, int kKBegin = 0,
          int kKEnd = Tile<kHeadDim, kFamily, kParts>::kBlockM / 16>
__device__ __forceinline__ void to_a_operands_dx(const float (&dp)[Tile<kHeadDim, kFamily, kParts>::kQTiles][4],
                                                 uint32_t (&a)[Tile<kHeadDim, kFamily, kParts>::kBlockM / 16][kParts][4]) {
  if constexpr (kPairRound<kFamily, kParts>) {
#pragma unroll
    for (int kk = kKBegin; kk < kKEnd; ++kk) {
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) a[kk][0][reg] = __float_as_uint(dp[2 * kk + (reg >> 1)][2 * (reg & 1)]);
    }
  } else {
    to_a_operands<T, kHeadDim, kFamily, kParts, kKBegin, kKEnd>(dp, a);
  }
}

// One-part inputs: the rounding residues c − round(c); with to_a_operands, c ≈ hi + lo to ~16 bits.
template <typename T, int kHeadDim, int kFamily>
__device__ __forceinline__ void to_a_operands_lo(const float (&c)[Tile<kHeadDim, kFamily>::kQTiles][4],
                                                 uint32_t (&a)[Tile<kHeadDim, kFamily>::kBlockM / 16][1][4]) {
  float r[Tile<kHeadDim, kFamily>::kQTiles][4];
#pragma unroll
  for (int n = 0; n < Tile<kHeadDim, kFamily>::kQTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) r[n][e] = c[n][e] - round_to<T>(c[n][e]);
  }
  to_a_operands<T, kHeadDim, kFamily, 1>(r, a);
}

// to_a_operands_lo from the packed hi operands `hi` (= to_a_operands(c)): the residues c − hi from
// unpacking instead of rounding every element again (the same values; ~30 fewer instructions per step).
template <typename T, int kHeadDim, int kFamily, int kKBegin = 0, int kKEnd = Tile<kHeadDim, kFamily>::kBlockM / 16>
__device__ __forceinline__ void to_a_operands_lo_from_hi(const float (&c)[Tile<kHeadDim, kFamily>::kQTiles][4],
                                                         const uint32_t (&hi)[Tile<kHeadDim, kFamily>::kBlockM / 16][1][4],
                                                         uint32_t (&lo)[Tile<kHeadDim, kFamily>::kBlockM / 16][1][4]) {
#pragma unroll
  for (int kk = kKBegin; kk < kKEnd; ++kk) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {  // the register order of to_a_operands
      const float2 h = unpack2<T>(hi[kk][0][reg]);
      const float x0 = c[2 * kk + (reg >> 1)][2 * (reg & 1)], x1 = c[2 * kk + (reg >> 1)][2 * (reg & 1) + 1];
      lo[kk][0][reg] = pack2<T>(x0 - h.x, x1 - h.y);  // exact differences
    }
  }
}

// acc (warp's 16 keys × D) += A (16 keys × kBlockM queries, registers) · tile [query][D] (shared memory,
// kParts parts q_part apart).
template <typename T, int kHeadDim, int kFamily, int kParts>
__device__ __forceinline__ void acc_mma_kn(float (&acc)[Tile<kHeadDim, kFamily, kParts>::kDTiles][4],
                                           const uint32_t (&a)[Tile<kHeadDim, kFamily, kParts>::kBlockM / 16][kParts][4],
                                           const T* tile) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int n2 = 0; n2 < Tl::kDTiles / 2; ++n2) {
#pragma unroll
    for (int kk = 0; kk < Tl::kBlockM / 16; ++kk) {
      // one B part at a time, with the A parts it pairs with (mma_parts' products; fragment registers),
      // into zeroed registers first for split inputs (see mma_parts_acc)
      float t0[4] = {0.f, 0.f, 0.f, 0.f}, t1[4] = {0.f, 0.f, 0.f, 0.f};
      float(&c0)[4] = kParts > 1 ? t0 : acc[2 * n2];
      float(&c1)[4] = kParts > 1 ? t1 : acc[2 * n2 + 1];
#pragma unroll
      for (int ib = kParts - 1; ib >= 0; --ib) {
        uint32_t b[1][4];
        frag_b_kn<kHeadDim, Tl::kBlockM>(b[0], tile + ib * Smem<T, kHeadDim, kFamily, kParts>::q_part, kk * 16, n2 * 16, lane);
#pragma unroll
        for (int ia = kParts - 1 - ib; ia >= 0; --ia) {
          mma_16816<T>(c0, a[kk][ia], b[0][0], b[0][1]);
          mma_16816<T>(c1, a[kk][ia], b[0][2], b[0][3]);
        }
      }
      if constexpr (kParts > 1) {
        add4(acc[2 * n2], t0);
        add4(acc[2 * n2 + 1], t1);
      }
    }
  }
}

// A operands (warp's 16 keys × kBlockM queries, e.g. dXᵀ) → a shared memory tile [key][query] like dxt
// (part p at dst + p · dxt_part).
template <typename T, int kHeadDim, int kFamily, int kParts>
__device__ __forceinline__ void store_dxt(T* dst, const uint32_t (&ax)[Tile<kHeadDim, kFamily, kParts>::kBlockM / 16][kParts][4]) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int part = 0; part < kParts; ++part) {
#pragma unroll
    for (int kk = 0; kk < Tl::kBlockM / 16; ++kk) {
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {  // reg: bit 0 = row g / g+8, bit 1 = query columns +0 / +8
        const int r = warp * 16 + g + 8 * (reg & 1);
        *reinterpret_cast<uint32_t*>(dst + part * Smem<T, kHeadDim, kFamily, kParts>::dxt_part +
                                     swz<Tl::kBlockM>(r, kk * 16 + 8 * (reg >> 1) + 2 * t)) = ax[kk][part][reg];
      }
    }
  }
}

// acc (the warp's 16 query rows × kCols columns from col0) += A_ij B_j, with Aᵀ in a tile laid out like
// dxt (kAParts parts dxt_part apart) and B_j ([key][D], kParts parts kv_part apart) in shared memory:
// dQ_i += dX_ij K_j (kernels 1, 2).
template <typename T, int kHeadDim, int kFamily, int kParts, int kCols, int kAParts = kParts>
__device__ __forceinline__ void rows_mma(const T* a_tile, const T* b_tile, float (&acc)[kCols / 8][4], int col0) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  using Sm = Smem<T, kHeadDim, kFamily, kParts>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = 16 * (warp % Tl::kRowGroups);
#pragma unroll
  for (int kk = 0; kk < Tl::kBlockN / 16; ++kk) {
    uint32_t a[kAParts][4];
#pragma unroll
    for (int part = 0; part < kAParts; ++part) {
      frag_a_trans<Tl::kBlockM>(a[part], a_tile + part * Sm::dxt_part, row0, kk * 16, lane);
    }
#pragma unroll
    for (int n2 = 0; n2 < kCols / 16; ++n2) {
      // one B part at a time, with the A parts it pairs with (mma_parts' products; fragment registers),
      // into zeroed registers first for split inputs (see mma_parts_acc)
      constexpr int kTerms = kAParts > kParts ? kAParts : kParts;
      constexpr bool kFresh = kAParts > 1 && kParts > 1;
      float t0[4] = {0.f, 0.f, 0.f, 0.f}, t1[4] = {0.f, 0.f, 0.f, 0.f};
      float(&c0)[4] = kFresh ? t0 : acc[2 * n2];
      float(&c1)[4] = kFresh ? t1 : acc[2 * n2 + 1];
#pragma unroll
      for (int ib = kParts - 1; ib >= 0; --ib) {
        uint32_t b[4];
        frag_b_kn<kHeadDim, Tl::kBlockN>(b, b_tile + ib * Sm::kv_part, kk * 16, col0 + n2 * 16, lane);
#pragma unroll
        for (int ia = kAParts - 1; ia >= 0; --ia) {
          if (ia + ib < kTerms) {
            mma_16816<T>(c0, a[ia], b[0], b[1]);
            mma_16816<T>(c1, a[ia], b[2], b[3]);
          }
        }
      }
      if constexpr (kFresh) {
        add4(acc[2 * n2], t0);
        add4(acc[2 * n2 + 1], t1);
      }
    }
  }
}

// The warp's rows_mma accumulators (16 query rows × kDqCols) → rows i0.. of a (N, D) float32 matrix.
template <int kHeadDim, int kFamily, int kParts>
__device__ __forceinline__ void store_warp_rows(float* dst,
                                                const float (&acc)[Tile<kHeadDim, kFamily, kParts>::kDqCols / 8][4],
                                                int i0, int N) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = 16 * (warp % Tl::kRowGroups), col0 = (warp / Tl::kRowGroups) * Tl::kDqCols;
#pragma unroll
  for (int n = 0; n < Tl::kDqCols / 8; ++n) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int i = i0 + row0 + g + 8 * hh;
      if (i < N) {
        *reinterpret_cast<float2*>(dst + (size_t)i * kHeadDim + col0 + n * 8 + 2 * t) =
            make_float2(acc[n][2 * hh], acc[n][2 * hh + 1]);
      }
    }
  }
}

__device__ __forceinline__ void add_float2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// Rows [row0, row0 + kRows) of every part of a (parts, n_rows, D) input (parts part_stride elements
// apart) → the parts of a tile (kPartElems elements apart).
template <typename T, int kRows, int kHeadDim, int kThreads, int kParts, int kPartElems>
__device__ __forceinline__ void load_parts(T* tile, const T* src, int64_t part_stride, int row0, int n_rows) {
#pragma unroll
  for (int part = 0; part < kParts; ++part) {
    load_tile<T, kRows, kHeadDim, kThreads>(tile + part * kPartElems, src + part * part_stride, row0, n_rows);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 1 (key-parallel): grid (ceil(M / kBlockN), B·H). kGrads: every output, or (Tile::kKvTwoPasses)
// dV_j alone, then dK_j with dQ, the key sums and the scalars.
// ---------------------------------------------------------------------------------------------
enum KvGrads : int { KV_ALL = 0, KV_DV = 1, KV_DK = 2 };

template <typename T, int kHeadDim, int kFamily, int kParts, int kGrads>
__global__ void __launch_bounds__(Tile<kHeadDim, kFamily, kParts>::kThreads, 1)
    attention_bwd_kv_kernel(const BwdParams p
#if HYPTORCH_BWD_TMA_LOADS
                            , const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap do_map,
                            const __grid_constant__ CUtensorMap dlo_map  // (encode_tile_map; unused off sm_90a)
#endif
    ) {
  constexpr bool kDv = kGrads != KV_DK, kDk = kGrads != KV_DV;
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  using Sm = Smem<T, kHeadDim, kFamily, kParts>;
  constexpr bool use_wgmma = kBwdWgmmaArch && Tl::kWgmma;
  extern __shared__ __align__(16) char smem_dynamic[];
  // wgmma: the tiles from the first 1024-byte boundary (Tile::kAlignSlack bytes are allocated for it)
  char* const smem_raw =
      smem_dynamic + (use_wgmma ? (1024u - (smem_addr(smem_dynamic) & 1023u)) & 1023u : 0u);
  const Sm sm0(smem_raw, 0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const size_t bhk = (size_t)b * p.kv_heads + hk;
  const int j0 = blockIdx.x * Tl::kBlockN;
  const int N = p.n_queries, M = p.n_keys;
  const HeadConst hc = head_const<kFamily, (kParts > 1)>(p, h);
  const bool has_lo = kParts == 1 && p.dout_lo != nullptr;
  // HYPTORCH_BWD_TMA_LOADS: query tiles by TMA, one barrier per query buffer (initialised here, published by the
  // barrier after the key fields), tma_phase bit b the parity of buffer b's next completion
#if HYPTORCH_BWD_TMA_LOADS
  constexpr bool kTmaLoads = use_wgmma;
  __shared__ alignas(8) uint64_t tma_bar[2];
  uint32_t tma_phase = 0;
  if constexpr (kTmaLoads) {
    if (threadIdx.x == 0) {
      mbar_init(smem_addr(&tma_bar[0]), 1);
      mbar_init(smem_addr(&tma_bar[1]), 1);
      mbar_init_fence();
    }
  }
#endif
  // wait for query buffer b's tiles (HYPTORCH_BWD_TMA_LOADS; with cp.async, cp_async_wait does)
  auto wait_query_tiles = [&](int b) {
#if HYPTORCH_BWD_TMA_LOADS
    if constexpr (kTmaLoads) {
      mbar_wait(smem_addr(&tma_bar[b]), (tma_phase >> b) & 1u);
      tma_phase ^= 1u << b;
    }
#endif
  };
  if constexpr (use_wgmma) {
    // wgmma always reads dO_lo (score_wgmma_issue): without one, both buffers' tiles stay zero
    if (!has_lo) {
#pragma unroll 1
      for (int buf = 0; buf < Tl::kQueryBuffers; ++buf) {
        uint4* lo = reinterpret_cast<uint4*>(Sm(smem_raw, buf).dout_lo);
        for (int i = threadIdx.x; i < Tl::kBlockM * kHeadDim / 8; i += Tl::kThreads) lo[i] = make_uint4(0, 0, 0, 0);
      }
    }
  }

  // Load K_j, V_j and the key fields once
  load_parts<T, Tl::kBlockN, kHeadDim, Tl::kThreads, kParts, Sm::kv_part>(
      sm0.k, static_cast<const T*>(p.k) + bhk * M * kHeadDim, p.kv_part_stride, j0, M);
  load_parts<T, Tl::kBlockN, kHeadDim, Tl::kThreads, kParts, Sm::kv_part>(
      sm0.v, static_cast<const T*>(p.v) + bhk * M * kHeadDim, p.kv_part_stride, j0, M);
  cp_async_commit();
  load_key_fields<kHeadDim, kFamily, kParts>(sm0.key, p, hc, b, bhk, j0);
  // R_i on the tensor cores (Tile::kRowSumsTC): row r of K_j's time block, chunk 0 = [k0 as three parts, 0 …]
  // (this thread wrote key r's fields; a fence and barrier follow before any wgmma reads it)
  constexpr bool tc_rows = use_wgmma && Tl::kRowSumsTC;
  if constexpr (tc_rows) {
    const int r = threadIdx.x;
    if (r < Tl::kBlockN) {
      float rest = sm0.key[KEY_W * Tl::kBlockN + r];
      uint32_t part[3];
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        part[i] = pack2<T>(rest, 0.f);   // T(rest) in the low half
        rest -= unpack2<T>(part[i]).x;  // exact: the rounding residue
      }
      *reinterpret_cast<uint4*>(sm0.k + Sm::kv_part + swz<64>(r, 0)) =
          make_uint4(part[0] | part[1] << 16, part[2], 0u, 0u);
    }
  }
  // every key of the tile visible (no padding, none past M): tile_step's unmasked path (also a barrier
  // after the key fields' stores)
  const bool keys_all_visible =
      __syncthreads_and(threadIdx.x >= Tl::kBlockN || sm0.key[KEY_VISIBLE * Tl::kBlockN + threadIdx.x] != 0.f);

  float dk[kDk ? Tl::kDTiles : 1][4], dv[kDv ? Tl::kDTiles : 1][4];
#pragma unroll
  for (int n = 0; n < Tl::kDTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (kDk) dk[kDk ? n : 0][e] = 0.f;
      if (kDv) dv[kDv ? n : 0][e] = 0.f;
    }
  }
  KeySums ks;

  // Causal (top-left): query i sees key j iff j ≤ i, so query tiles ending before j0 are skipped.
  const int i_begin = p.causal ? (j0 / Tl::kBlockM) * Tl::kBlockM : 0;
  // Q_i, dO_i and the row fields of query tile i0 → buffer buf (cp.async, in flight while the CTA computes)
  auto prefetch = [&](int i0, int buf) {
    const Sm sb(smem_raw, buf);
#if HYPTORCH_BWD_TMA_LOADS
    if constexpr (kTmaLoads) {
      if (threadIdx.x == 0) {
        const uint32_t bar = smem_addr(&tma_bar[buf]);
        constexpr uint32_t kTileBytes = Tl::kBlockM * kHeadDim * sizeof(T);
        mbar_arrive_expect_tx(bar, (has_lo ? 3u : 2u) * kTileBytes);
        // 64-column blocks of swz_tile's layout, kBlockM · 128 bytes apart
        auto tile = [&](const CUtensorMap& map, const T* dst) {
#pragma unroll
          for (int cb = 0; cb < kHeadDim / 64; ++cb) {
            tma_load_3d(&map, smem_addr(dst) + cb * (Tl::kBlockM * 128), bar, 64 * cb, i0, bh);
          }
        };
        tile(q_map, sb.q);
        tile(do_map, sb.dout);
        if (has_lo) tile(dlo_map, sb.dout_lo);
      }
      return;
    }
#endif
    const size_t offset = (size_t)bh * N * kHeadDim;
    load_parts<T, Tl::kBlockM, kHeadDim, Tl::kThreads, kParts, Sm::q_part>(
        sb.q, static_cast<const T*>(p.q) + offset, p.q_part_stride, i0, N);
    load_parts<T, Tl::kBlockM, kHeadDim, Tl::kThreads, kParts, Sm::q_part>(
        sb.dout, static_cast<const T*>(p.dout_s) + offset, p.q_part_stride, i0, N);
    if (has_lo) load_tile<T, Tl::kBlockM, kHeadDim, Tl::kThreads>(sb.dout_lo, static_cast<const T*>(p.dout_lo) + offset, i0, N);
    cp_async_commit();
  };
  // At D = 128 (and for split inputs, which have one query buffer) the prefetch's extra registers would
  // spill: load-then-compute there (or with HYPTORCH_BWD_D128_PREFETCH, the load after the dV_j/dK_j wait). The next tile's row fields (L_i, D_i, dO0_i, |q_i|²) go to registers right
  // after the step's barrier and to shared memory (with w_i) at the end of the step: stored in the prefetch
  // itself, the stores would wait for the global loads (~1 µs exposed per step for the warps that own rows).
  constexpr bool kPrefetch = kHeadDim == 64 && Tl::kQueryBuffers == 2;
  // HYPTORCH_BWD_D128_PREFETCH: the same two buffers at D = 128, the next tile loaded after the dV_j/dK_j wait
  constexpr bool kLatePrefetch =
      HYPTORCH_BWD_D128_PREFETCH && use_wgmma && kHeadDim == 128 && Tl::kQueryBuffers == 2;
  constexpr bool kTwoBuffers = kPrefetch || kLatePrefetch;
  RowRaw next_rows{};  // kTwoBuffers: the next query tile's row values, stored at the end of the step
  // wgmma with 64-query tiles: dQ_i by one warpgroup product (below); with HYPTORCH_BWD_EARLY_SCORES the next
  // step's S/dP are issued together with it (kEarlyScores)
  constexpr bool wgmma_dq = use_wgmma && kDk && Tl::kBlockM == 64;
  // HYPTORCH_BWD_D128_DQ_WGMMA: dQ_iᵀ by wgmma at D = 128 (below)
  constexpr bool wgmma_dqt = use_wgmma && kDk && kHeadDim == 128 && HYPTORCH_BWD_D128_DQ_WGMMA;
  constexpr bool kEarlyScores = wgmma_dq && kPrefetch && HYPTORCH_BWD_EARLY_SCORES && kFamily == FAMILY_DOT;
  // HYPTORCH_BWD_SPLIT_STEP: the first half's dV/dK products issued between the halves of the element-wise work
  constexpr bool kSplitStep = use_wgmma && HYPTORCH_BWD_SPLIT_STEP && Tl::kBlockM >= 32;  // (two k-steps or more)
  if (kTwoBuffers && i_begin < N) {
    prefetch(i_begin, 0);
    load_row_fields<kHeadDim, kFamily, kParts>(Sm(smem_raw, 0).row, p, hc, bh, i_begin);
  }
  // S_ijᵀ, dP_ijᵀ; kEarlyScores: in flight from the previous step, the first ones from here (on every path, as
  // ptxas serialises wgmma issued on some paths only: without a query tile they read a buffer nobody uses;
  // waited for here, since ptxas also serialises when they are in flight on entering the loop)
  float sp[Tl::kQTiles][4], dp[Tl::kQTiles][4];
  if constexpr (kEarlyScores) {
    cp_async_wait<0>();
    if (i_begin < N) wait_query_tiles(0);
    fence_proxy_async();
    __syncthreads();
    score_wgmma_issue<T, kHeadDim, kFamily>(Sm(smem_raw, 0), sp, dp);
    score_wgmma_wait(sp, dp);
  }
  int buf = 0;
  for (int i0 = i_begin; i0 < N; i0 += Tl::kBlockM, buf ^= (kTwoBuffers ? 1 : 0)) {
    if (!kTwoBuffers) {
      prefetch(i0, buf);
      load_row_fields<kHeadDim, kFamily, kParts>(Sm(smem_raw, buf).row, p, hc, bh, i0);
    }
    if constexpr (!kEarlyScores) {  // (kEarlyScores: tile i0 was waited for before its S/dP were issued)
      cp_async_wait<0>();
      wait_query_tiles(buf);
      if constexpr (use_wgmma) fence_proxy_async();  // cp.async (and the zeroing above) wrote tiles wgmma reads
    }
    __syncthreads();  // tile i0 has landed, and every warp is done with the previous step's buffers
    if (kPrefetch && i0 + Tl::kBlockM < N) {
      prefetch(i0 + Tl::kBlockM, buf ^ 1);
      next_rows = load_row_raw<kHeadDim, kFamily, kParts>(p, bh, i0 + Tl::kBlockM);
    }
    const Sm sm(smem_raw, buf);

    // dV_j += P_ijᵀ dO_i and dK_j += dX_ijᵀ Q_i: the Sᵀ/dPᵀ accumulators become A operands
    uint32_t ax[Tl::kBlockM / 16][kParts][4];
    uint32_t ap[Tl::kBlockM / 16][1][4], ap_lo[Tl::kBlockM / 16][1][4];  // wgmma: P as hi + lo, in flight
    // wgmma: P in two terms (hi, lo = 0 without dO_lo, as in the mma.sync path) and dO in two (dO_lo is a zeroed
    // tile without one): dV_j += P_hi dO + P_hi dO_lo + P_lo dO; dK_j += dXᵀ Q_i, for the k-steps (16 queries
    // each) [kk0, kk1), issued as one group. They run while dQ_i below is computed (kSplitStep: the first half's
    // also while the element-wise work of the second half runs), and are waited for at the end of the step.
    auto issue_kv_products = [&](auto kk0, auto kk1) {
      if constexpr (use_wgmma) {  // (the mma.sync kernels' accumulators have other shapes)
        constexpr int kK0 = decltype(kk0)::value, kK1 = decltype(kk1)::value;
        to_a_operands<T, kHeadDim, kFamily, 1, kK0, kK1>(sp, ap);
        to_a_operands_lo_from_hi<T, kHeadDim, kFamily, kK0, kK1>(sp, ap, ap_lo);
        to_a_operands_dx<T, kHeadDim, kFamily, 1, kK0, kK1>(dp, ax);
#pragma unroll
        for (int kk = kK0; kk < kK1; ++kk) {
#pragma unroll
          for (int r = 0; r < 4; ++r) ap_lo[kk][0][r] = has_lo ? ap_lo[kk][0][r] : 0u;
          fence_registers(ap[kk]);
          fence_registers(ap_lo[kk]);
          fence_registers(ax[kk]);
        }
        fence_registers(dv);
        fence_registers(dk);
        constexpr uint32_t kLeading = Tl::kBlockM * 128;
        const uint32_t q_lo = smem_desc_lo(smem_addr(sm.q), kLeading), o_lo = smem_desc_lo(smem_addr(sm.dout), kLeading);
        const uint32_t dlo_lo = smem_desc_lo(smem_addr(sm.dout_lo), kLeading);
        wgmma_fence();
#pragma unroll
        for (int kk = kK0; kk < kK1; ++kk) {
          const uint32_t rows = kk * (16 * 128);  // queries 16kk … 16kk + 15 (the k-step) of the [query][D] tiles
          wgmma_rs_bt<T, kHeadDim>(dv, ap[kk][0], smem_desc_at(o_lo, rows, 1024));
          wgmma_rs_bt<T, kHeadDim>(dv, ap[kk][0], smem_desc_at(dlo_lo, rows, 1024));
          wgmma_rs_bt<T, kHeadDim>(dv, ap_lo[kk][0], smem_desc_at(o_lo, rows, 1024));
          wgmma_rs_bt<T, kHeadDim>(dk, ax[kk][0], smem_desc_at(q_lo, rows, 1024));
        }
        wgmma_commit();
      }
    };
    constexpr int kKSteps = Tl::kBlockM / 16;
    if constexpr (kSplitStep) {
      tile_step<T, kHeadDim, kFamily, kParts, kDk, false, false, use_wgmma, kEarlyScores>(
          sm, hc, i0, j0, p.causal, keys_all_visible, kDk && p.dq_atomic && !tc_rows, has_lo, sp, dp, ks,
          [&] { issue_kv_products(std::integral_constant<int, 0>{}, std::integral_constant<int, kKSteps / 2>{}); });
    } else {
      tile_step<T, kHeadDim, kFamily, kParts, kDk, false, false, use_wgmma, kEarlyScores>(
          sm, hc, i0, j0, p.causal, keys_all_visible, kDk && p.dq_atomic && !tc_rows, has_lo, sp, dp, ks);
    }

    if constexpr (use_wgmma) {
      issue_kv_products(std::integral_constant<int, kSplitStep ? kKSteps / 2 : 0>{},
                        std::integral_constant<int, kKSteps>{});
      if constexpr (kHeadDim == 128 && !wgmma_dqt) {
        // dQ_i by mma.sync below: dV_j, dK_j first, so their A operands' registers are free for it (at D = 64 the
        // distance scores' dQ, by mma.sync too, runs while they do)
        wgmma_wait<0>();
        fence_registers(dv);
        fence_registers(dk);
        // (the other buffer was last read in the previous step: every warp passed this step's barrier since)
        if (kLatePrefetch && i0 + Tl::kBlockM < N) {
          prefetch(i0 + Tl::kBlockM, buf ^ 1);
          next_rows = load_row_raw<kHeadDim, kFamily, kParts>(p, bh, i0 + Tl::kBlockM);
        }
      }
    } else if constexpr (kDv) {
      // dXᵀ packed first: its float accumulators are dead during the dV products (registers at D = 128)
      if constexpr (kDk) to_a_operands_dx<T, kHeadDim, kFamily, kParts>(dp, ax);
      uint32_t ap[Tl::kBlockM / 16][kParts][4];
      to_a_operands<T, kHeadDim, kFamily, kParts>(sp, ap);
      acc_mma_kn<T, kHeadDim, kFamily, kParts>(dv, ap, sm.dout);
      if constexpr (kParts == 1) {
        if (has_lo) {
        // P and dO in two terms each (P_lo·dO_lo is below fp32 noise): the value lift's pull-back
        // dv_s + (v_s/v0)·dv0 cancels at large norms and near the Poincaré boundary.
          acc_mma_kn<T, kHeadDim, kFamily, kParts>(dv, ap, sm.dout_lo);
          to_a_operands_lo<T, kHeadDim, kFamily>(sp, ap);
          acc_mma_kn<T, kHeadDim, kFamily, kParts>(dv, ap, sm.dout);
        }
      }
    }
    if constexpr (kDk && !use_wgmma) {
      if constexpr (!kDv) to_a_operands_dx<T, kHeadDim, kFamily, kParts>(dp, ax);
      acc_mma_kn<T, kHeadDim, kFamily, kParts>(dk, ax, sm.q);
    }

    // wgmma at D = 128 (HYPTORCH_BWD_D128_DQ_WGMMA): dQ_iᵀ (D × kBlockM) = K_jᵀ dX_ijᵀ as two m64 products (64-column
    // blocks c of D), A = K_j's block c read M-major, B = dXᵀ read N-major; issued on every path (ptxas serialises
    // wgmma issued on some paths only), then waited for with dV_j, dK_j. Accumulator (c, n8 tile n, e) of warp w,
    // lane (g, t): dQ_i[query 8n + 2t + (e & 1)][column 64c + 16w + g + 8(e >> 1)].
    if constexpr (wgmma_dqt) {
      store_dxt<T, kHeadDim, kFamily, kParts>(sm.dxt, ax);
      fence_proxy_async();  // the dxt stores are read by wgmma
      __syncthreads();
      // HYPTORCH_BWD_D128_PREFETCH: the next tile's loads run during all three products (the other buffer was last
      // read in the previous step: every warp passed this step's first barrier since)
      if (kLatePrefetch && i0 + Tl::kBlockM < N) {
        prefetch(i0 + Tl::kBlockM, buf ^ 1);
        next_rows = load_row_raw<kHeadDim, kFamily, kParts>(p, bh, i0 + Tl::kBlockM);
      }
      float dqt[2][Tl::kBlockM / 8][4];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
#pragma unroll
        for (int n = 0; n < Tl::kBlockM / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dqt[c][n][e] = 0.f;
        }
        fence_registers(dqt[c]);
      }
      constexpr uint32_t kDxtRow = Tl::kBlockM * 2;  // bytes per key of the dxt tile (its swizzle width)
      const uint32_t k_lo = smem_desc_lo(smem_addr(sm.k), Tl::kBlockN * 128), dxt = smem_addr(sm.dxt);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < 2; ++c) {
#pragma unroll
        for (int kk = 0; kk < Tl::kBlockN / 16; ++kk) {  // keys 16kk … 16kk + 15
          wgmma_ss_tt<T, Tl::kBlockM>(dqt[c], smem_desc_at(k_lo, c * (Tl::kBlockN * 128) + kk * (16 * 128), 1024),
                                      smem_desc_swizzled<kDxtRow>(dxt + kk * 16 * kDxtRow, 0, 8 * kDxtRow));
        }
      }
      wgmma_commit();
      wgmma_wait<0>();  // (also dV_j, dK_j above)
      fence_registers(dv);
      fence_registers(dk);
      fence_registers(dqt[0]);
      fence_registers(dqt[1]);
      if (p.dq_atomic) {
        float* const dst = p.dq_acc + ((size_t)bh * N + i0) * kHeadDim + 16 * warp + g;
#pragma unroll
        for (int n = 0; n < Tl::kBlockM / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int q = 8 * n + 2 * t + (e & 1);
            if (i0 + q < N) {
              atomicAdd(dst + (size_t)q * kHeadDim + 8 * (e >> 1), dqt[0][n][e]);
              atomicAdd(dst + (size_t)q * kHeadDim + 64 + 8 * (e >> 1), dqt[1][n][e]);
            }
          }
        }
      }
    }

    // wgmma with 64-query tiles: dQ_i (64 queries × D) = dX_ij K_j by one warpgroup product, A = dXᵀ and B = K_j
    // read transposed from shared memory (the dxt tile's swz<64> layout is the 128-byte swizzle). Issued on
    // every path (ptxas serialises wgmma issued on some paths only); without dq_atomic the result is unused.
    static_assert(!tc_rows || wgmma_dq, "R_i on the tensor cores comes from the wgmma dQ product");
    if constexpr (wgmma_dq) {
      store_dxt<T, kHeadDim, kFamily, kParts>(sm.dxt, ax);
      // kEarlyScores: the next tile (prefetched at this step's start) has landed; after the step's last tile,
      // the other buffer's stale tiles feed S/dP nobody reads
      if constexpr (kEarlyScores) {
        cp_async_wait<0>();
        if (i0 + Tl::kBlockM < N) wait_query_tiles(buf ^ 1);
      }
      fence_proxy_async();  // the dxt stores (kEarlyScores: and the next tile's cp.async) are read by wgmma
      __syncthreads();
      constexpr int kDqCols = kHeadDim + (tc_rows ? 8 : 0);  // + R_i's n8 tile: [k0 hi, mid | lo, 0 | 0, 0 | 0, 0]
      float dq[kDqCols / 8][4];
      if constexpr (!HYPTORCH_BWD_OVERWRITE_FIRST) {
#pragma unroll
        for (int n = 0; n < kDqCols / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;
        }
        fence_registers(dq);
      }
      const uint32_t dxt_lo = smem_desc_lo(smem_addr(sm.dxt), Tl::kBlockN * 128);
      const uint32_t k_lo = smem_desc_lo(smem_addr(sm.k), Tl::kBlockN * 128);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Tl::kBlockN / 16; ++kk) {
        const uint32_t rows = kk * (16 * 128);  // keys 16kk … 16kk + 15 (the k-step) of the [key][·] tiles
        if (HYPTORCH_BWD_OVERWRITE_FIRST && kk == 0) {
          wgmma_ss_tt<T, kDqCols, false>(dq, smem_desc_at(dxt_lo, rows, 1024), smem_desc_at(k_lo, rows, 1024));
        } else {
          wgmma_ss_tt<T, kDqCols>(dq, smem_desc_at(dxt_lo, rows, 1024), smem_desc_at(k_lo, rows, 1024));
        }
      }
      wgmma_commit();
      if constexpr (kEarlyScores) {
        // S/dP of the next step run while this one's dQ atomics and row sums go out
        score_wgmma_issue<T, kHeadDim, kFamily>(Sm(smem_raw, buf ^ 1), sp, dp);
        wgmma_wait<1>();  // dV_j, dK_j and dQ_i of this step
      } else {
        wgmma_wait<0>();  // (also dV_j, dK_j above)
      }
      fence_registers(dq);
      if (p.dq_atomic) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = i0 + warp * 16 + g + 8 * hh;
          if (i < N) {
            float* dst = p.dq_acc + ((size_t)bh * N + i) * kHeadDim + 2 * t;
#pragma unroll
            for (int n = 0; n < kHeadDim / 8; ++n) add_float2(dst + n * 8, dq[n][2 * hh], dq[n][2 * hh + 1]);
          }
          if constexpr (tc_rows) {
            // R_i = hi + mid (lane t = 0) + lo (t = 1); RX_i is 0 for dot scores
            float r_i = dq[kHeadDim / 8][2 * hh] + dq[kHeadDim / 8][2 * hh + 1];
            r_i += __shfl_xor_sync(0xffffffffu, r_i, 1);
            if (t == 0 && i < N) atomicAdd(p.row_acc + ((size_t)bh * N + i) * 2, r_i);
          }
        }
      }
    }
    if (kDk && p.dq_atomic) {
      // dQ_i += dX_ij K_j (fp32 atomics), R_i and RX_i likewise
      if constexpr (!wgmma_dq && !wgmma_dqt) {
        store_dxt<T, kHeadDim, kFamily, kParts>(sm.dxt, ax);
        __syncthreads();
        // in chunks of kDqChunk columns, so the chunk's accumulators fit next to dK_j, dV_j
        const int row0 = 16 * (warp % Tl::kRowGroups), col_begin = (warp / Tl::kRowGroups) * Tl::kDqCols;
#pragma unroll 1
        for (int col0 = col_begin; col0 < (warp / Tl::kRowGroups + 1) * Tl::kDqCols; col0 += Tl::kDqChunk) {
          float acc[Tl::kDqChunk / 8][4];
#pragma unroll
          for (int n = 0; n < Tl::kDqChunk / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
          }
          rows_mma<T, kHeadDim, kFamily, kParts, Tl::kDqChunk>(sm.dxt, sm.k, acc, col0);
#pragma unroll
          for (int n = 0; n < Tl::kDqChunk / 8; ++n) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              const int i = i0 + row0 + g + 8 * hh;
              if (i < N) {
                add_float2(p.dq_acc + ((size_t)bh * N + i) * kHeadDim + col0 + n * 8 + 2 * t, acc[n][2 * hh], acc[n][2 * hh + 1]);
              }
            }
          }
        }
      }
      for (int r = threadIdx.x; r < (tc_rows ? 0 : Tl::kBlockM); r += Tl::kThreads) {
        if (i0 + r < N) {
          float rw = 0.f, rx = 0.f;
#pragma unroll
          for (int w = 0; w < Tl::kWarps; ++w) {
            rw += sm.row_part[(w * Tl::kBlockM + r) * 2];
            rx += sm.row_part[(w * Tl::kBlockM + r) * 2 + 1];
          }
          add_float2(p.row_acc + ((size_t)bh * N + i0 + r) * 2, rw, rx);
        }
      }
    }
    if constexpr (use_wgmma) {
      // dV_j, dK_j of this step have landed; their A operands were held (the fences) until now
      wgmma_wait<kEarlyScores ? 1 : 0>();
      fence_registers(dv);
      fence_registers(dk);
#pragma unroll
      for (int kk = 0; kk < Tl::kBlockM / 16; ++kk) {
        fence_registers(ap[kk]);
        fence_registers(ap_lo[kk]);
        fence_registers(ax[kk]);
      }
    }
    if constexpr (kTwoBuffers) {
      // the other buffer's row fields were last read in the previous step, and are next read after the
      // next step's barrier
      if (i0 + Tl::kBlockM < N) store_row_fields<kHeadDim, kFamily, kParts>(Sm(smem_raw, buf ^ 1).row, next_rows, hc);
    }
    if (!kTwoBuffers) __syncthreads();  // the next step reloads the same buffer
  }
  cp_async_wait<0>();  // K_j/V_j copies are still in flight when no query tile was visited
  if constexpr (kEarlyScores) score_wgmma_wait(sp, dp);  // the S/dP issued after the last tile

  // Write dK_j, dV_j (fp32, this query head) and the key sums
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = j0 + warp * 16 + g + 8 * hh;
    const float c = quad_sum(ks.c[hh]), cx = quad_sum(ks.cx[hh]), dv0 = quad_sum(ks.dv0[hh]);
    if (j < M) {
      const size_t row = (size_t)bh * M + j;
#pragma unroll
      for (int n = 0; n < Tl::kDTiles; ++n) {
        if constexpr (kDk) {
          *reinterpret_cast<float2*>(p.dk_acc + row * kHeadDim + n * 8 + 2 * t) = make_float2(dk[n][2 * hh], dk[n][2 * hh + 1]);
        }
        if constexpr (kDv) {
          *reinterpret_cast<float2*>(p.dv_acc + row * kHeadDim + n * 8 + 2 * t) = make_float2(dv[n][2 * hh], dv[n][2 * hh + 1]);
        }
      }
      if (kDk && t == 0) {
        p.col_acc[row * 3] = c;
        p.col_acc[row * 3 + 1] = cx;
        p.col_acc[row * 3 + 2] = dv0;
      }
    }
  }
  if constexpr (!kDk) return;
  // Per-head scalars: one partial per (batch, head, key tile), summed in a fixed order on the host side.
  float s1 = ks.s1 - ks.s1_err, s2 = ks.s2 - ks.s2_err;  // (the compensations are 0 for one-part inputs)
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    s1 += __shfl_xor_sync(0xffffffffu, s1, off);
    s2 += __shfl_xor_sync(0xffffffffu, s2, off);
  }
  if (lane == 0) {
    sm0.scal[warp * 2] = s1;
    sm0.scal[warp * 2 + 1] = s2;
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < Tl::kWarps; ++w) s += sm0.scal[w * 2 + threadIdx.x];
    p.scalar_partials[((size_t)bh * gridDim.x + blockIdx.x) * 2 + threadIdx.x] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2 (query-parallel, deterministic dQ): grid (ceil(N / kBlockM), B·H).
// kDeltaPass (before kernel 1; split inputs, and the poincare family, whose lifted values grow large
// near the boundary): D_i = Σ_j P_ij dP_ij from the same P and dP as kernel 1
// (run with p.delta = 0, so dS = P·dP) into p.delta_acc, instead of dQ. The identity D_i = dO_L·O_L = 0
// holds for exact O; at float32 precision the kernels' own Σ_j P_ij dP_ij is what makes dS_ij sum to
// zero over a row, as the softmax's Jacobian does (rows that see one or a few keys have dS ≈ 0).
// ---------------------------------------------------------------------------------------------
template <typename T, int kHeadDim, int kFamily, int kParts, bool kDeltaPass = false>
__global__ void __launch_bounds__(Tile<kHeadDim, kFamily, kParts>::kThreads, 1)
    attention_bwd_q_kernel(const BwdParams p) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  using Sm = Smem<T, kHeadDim, kFamily, kParts>;
  extern __shared__ __align__(16) char smem_raw[];
  const Sm sm(smem_raw);
  const int warp = threadIdx.x >> 5;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const size_t bhk = (size_t)b * p.kv_heads + hk;
  const int i0 = blockIdx.x * Tl::kBlockM;
  const int N = p.n_queries, M = p.n_keys;
  const HeadConst hc = head_const<kFamily, (kParts > 1)>(p, h);
  const T* k = static_cast<const T*>(p.k) + bhk * M * kHeadDim;
  const T* v = static_cast<const T*>(p.v) + bhk * M * kHeadDim;

  load_parts<T, Tl::kBlockM, kHeadDim, Tl::kThreads, kParts, Sm::q_part>(
      sm.q, static_cast<const T*>(p.q) + (size_t)bh * N * kHeadDim, p.q_part_stride, i0, N);
  load_parts<T, Tl::kBlockM, kHeadDim, Tl::kThreads, kParts, Sm::q_part>(
      sm.dout, static_cast<const T*>(p.dout_s) + (size_t)bh * N * kHeadDim, p.q_part_stride, i0, N);
  const bool has_lo = kParts == 1 && p.dout_lo != nullptr;
  if (has_lo) {
    load_tile<T, Tl::kBlockM, kHeadDim, Tl::kThreads>(sm.dout_lo, static_cast<const T*>(p.dout_lo) + (size_t)bh * N * kHeadDim, i0, N);
  }
  cp_async_commit();
  load_row_fields<kHeadDim, kFamily, kParts>(sm.row, p, hc, bh, i0);
  for (int r = threadIdx.x; r < Tl::kWarps * Tl::kBlockM * 2; r += Tl::kThreads) sm.row_part[r] = 0.f;

  float acc[Tl::kDqCols / 8][4];
#pragma unroll
  for (int n = 0; n < Tl::kDqCols / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  }
  KeySums unused;
  const int j_end = p.causal ? min(M, i0 + Tl::kBlockM) : M;
  for (int j0 = 0; j0 < j_end; j0 += Tl::kBlockN) {
    load_parts<T, Tl::kBlockN, kHeadDim, Tl::kThreads, kParts, Sm::kv_part>(sm.k, k, p.kv_part_stride, j0, M);
    load_parts<T, Tl::kBlockN, kHeadDim, Tl::kThreads, kParts, Sm::kv_part>(sm.v, v, p.kv_part_stride, j0, M);
    cp_async_commit();
    load_key_fields<kHeadDim, kFamily, kParts>(sm.key, p, hc, b, bhk, j0);
    cp_async_wait<0>();
    __syncthreads();

    float sp[Tl::kQTiles][4], dp[Tl::kQTiles][4];
    tile_step<T, kHeadDim, kFamily, kParts, false, true, kDeltaPass>(sm, hc, i0, j0, p.causal, false, true, has_lo, sp, dp,
                                                                     unused);
    if constexpr (!kDeltaPass) {
      uint32_t ax[Tl::kBlockM / 16][kParts][4];
      to_a_operands_dx<T, kHeadDim, kFamily, kParts>(dp, ax);
      store_dxt<T, kHeadDim, kFamily, kParts>(sm.dxt, ax);
      __syncthreads();
      rows_mma<T, kHeadDim, kFamily, kParts, Tl::kDqCols>(sm.dxt, sm.k, acc, (warp / Tl::kRowGroups) * Tl::kDqCols);
    }
    __syncthreads();
  }

  if constexpr (kDeltaPass) {
    for (int r = threadIdx.x; r < Tl::kBlockM; r += Tl::kThreads) {
      if (i0 + r < N) {
        float d = 0.f;
#pragma unroll
        for (int w = 0; w < Tl::kWarps; ++w) d += sm.row_part[(w * Tl::kBlockM + r) * 2];
        p.delta_acc[(size_t)bh * N + i0 + r] = d;
      }
    }
    return;
  }
  store_warp_rows<kHeadDim, kFamily, kParts>(p.dq_acc + (size_t)bh * N * kHeadDim, acc, i0, N);
  for (int r = threadIdx.x; r < Tl::kBlockM; r += Tl::kThreads) {
    if (i0 + r < N) {
      float rw = 0.f, rx = 0.f;
#pragma unroll
      for (int w = 0; w < Tl::kWarps; ++w) {
        rw += sm.row_part[(w * Tl::kBlockM + r) * 2];
        rx += sm.row_part[(w * Tl::kBlockM + r) * 2 + 1];
      }
      *reinterpret_cast<float2*>(p.row_acc + ((size_t)bh * N + i0 + r) * 2) = make_float2(rw, rx);
    }
  }
}

#if HYPTORCH_BWD_TMA_LOADS
// HYPTORCH_BWD_TMA_LOADS: the tensor map of a (B·H, N, D) bf16/fp16 tensor (q, dout_s, dout_lo) for kernel 1's query
// tile loads: dimensions (D, N, B·H), boxes of 64 columns × box_rows × 1 in the 128-byte swizzle, zeros past the end.
template <typename T>
cudaError_t encode_tile_map(CUtensorMap* map, const void* data, const BwdParams& p, int head_dim, int box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;  // (the driver's, looked up once)
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                           &found);
    if (e != cudaSuccess) return e;
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  const cuuint64_t dims[3] = {(cuuint64_t)head_dim, (cuuint64_t)p.n_queries, (cuuint64_t)p.batch * p.heads};
  const cuuint64_t strides[2] = {(cuuint64_t)head_dim * sizeof(T), (cuuint64_t)p.n_queries * head_dim * sizeof(T)};
  const cuuint32_t box[3] = {64, (cuuint32_t)box_rows, 1}, element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode(map, type, 3, const_cast<void*>(data), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}
#endif

template <typename T, int kHeadDim, int kFamily, int kParts>
cudaError_t launch(const BwdParams& p, int stage, cudaStream_t stream) {
  using Tl = Tile<kHeadDim, kFamily, kParts>;
  constexpr int smem = Tl::template smem_bytes<T>();
  // kernel 2 uses query buffer 0 only
  constexpr int smem_one_query_buffer = Tl::template one_query_buffer_smem_bytes<T>();
  const dim3 grid_q((p.n_queries + Tl::kBlockM - 1) / Tl::kBlockM, p.batch * p.heads);
  cudaError_t err;
  if (stage == 2) {  // the delta pass: split inputs, and the poincare family of bf16/fp16 inputs
    if constexpr (kParts == 1 && kFamily != FAMILY_POINCARE) {
      return cudaErrorInvalidValue;
    } else {
      auto delta = attention_bwd_q_kernel<T, kHeadDim, kFamily, kParts, true>;
      err = cudaFuncSetAttribute(delta, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_one_query_buffer);
      if (err != cudaSuccess) return err;
      delta<<<grid_q, Tl::kThreads, smem_one_query_buffer, stream>>>(p);
      return cudaGetLastError();
    }
  }
  if (stage != 1) return cudaErrorInvalidValue;
  const dim3 grid_kv((p.n_keys + Tl::kBlockN - 1) / Tl::kBlockN, p.batch * p.heads);
#if HYPTORCH_BWD_TMA_LOADS
  // (zero and unused where kernel 1 has no wgmma path: split inputs, GPUs other than sm_90)
  CUtensorMap q_map{}, do_map{}, dlo_map{};
  if constexpr (Tl::kWgmma && kParts == 1) {
    int device = 0, major = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return err;
    if (major == 9 && p.n_queries > 0) {
      err = encode_tile_map<T>(&q_map, p.q, p, kHeadDim, Tl::kBlockM);
      if (err == cudaSuccess) err = encode_tile_map<T>(&do_map, p.dout_s, p, kHeadDim, Tl::kBlockM);
      if (err == cudaSuccess && p.dout_lo != nullptr) err = encode_tile_map<T>(&dlo_map, p.dout_lo, p, kHeadDim, Tl::kBlockM);
      if (err != cudaSuccess) return err;
    }
  }
#endif
  auto run_kv = [&](auto kernel) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
#if HYPTORCH_BWD_TMA_LOADS
    kernel<<<grid_kv, Tl::kThreads, smem, stream>>>(p, q_map, do_map, dlo_map);
#else
    kernel<<<grid_kv, Tl::kThreads, smem, stream>>>(p);
#endif
    return cudaGetLastError();
  };
  if constexpr (Tl::kKvTwoPasses) {
    err = run_kv(attention_bwd_kv_kernel<T, kHeadDim, kFamily, kParts, KV_DV>);
    if (err == cudaSuccess) err = run_kv(attention_bwd_kv_kernel<T, kHeadDim, kFamily, kParts, KV_DK>);
  } else {
    err = run_kv(attention_bwd_kv_kernel<T, kHeadDim, kFamily, kParts, KV_ALL>);
  }
  if (err != cudaSuccess || p.dq_atomic) return err;
  auto qk = attention_bwd_q_kernel<T, kHeadDim, kFamily, kParts>;
  err = cudaFuncSetAttribute(qk, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_one_query_buffer);
  if (err != cudaSuccess) return err;
  qk<<<grid_q, Tl::kThreads, smem_one_query_buffer, stream>>>(p);
  return cudaGetLastError();
}

// All three score families for one (dtype, head dim, parts); instantiated by bwd_hd<D>_<dtype>.cu.
template <typename T, int kHeadDim, int kParts>
cudaError_t launch_for_score(const BwdParams& p, int stage, cudaStream_t stream) {
  switch (p.score) {
    case 0:
    case 1:
      return launch<T, kHeadDim, FAMILY_DOT, kParts>(p, stage, stream);
    case 2:
      return launch<T, kHeadDim, FAMILY_DISTANCE, kParts>(p, stage, stream);
    case 3:
      return launch<T, kHeadDim, FAMILY_POINCARE, kParts>(p, stage, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace bwd
}  // namespace hyptorch_flash
