// Torch-free interface of the fused hyperbolic attention forward (DESIGN.md §3).
// binding.cpp fills FwdParams from tensors; the .cu files launch the kernels.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "attention_ids.h"

namespace hyptorch_flash {

// Number of per-key records the prologue kernel writes per (batch, query head): see KeyRecord.
constexpr int kKeyRecordFields = 5;

// Element strides of a (batch, heads, rows, D) tensor whose last dim is contiguous; every stride is a
// multiple of 8 elements (16 bytes) so rows can be copied by 16-byte cp.async. `part`: distance between
// the three bf16 parts of a split float32 tensor (parts == 3), else unused.
struct Strides4 {
  int64_t batch, head, row, part;
};

struct FwdParams {
  // Space coordinates: q (B, H, N, D), k and v (B, Hkv, M, D), D = head_dim (64 or 128); any strides
  // with a contiguous last dim (e.g. a transposed (B, N, H, D) projection). float32 inputs arrive split
  // (parts == 3): x = hi + mid + lo, three bf16 tensors `part` elements apart (DESIGN.md §3, 3-term split).
  const void* q;
  const void* k;
  const void* v;
  Strides4 q_stride, k_stride, v_stride;
  // Outputs, contiguous: out (B, H, N, D) in the input dtype (float32 when parts == 3), lse and o0 (B, H, N) float32.
  void* out;
  float* lse;
  float* o0;
  // (B, H, N, D) int8 or nullptr (parts == 1 only): the output's refinement codes for the backward
  // (device_primitives.cuh: refine_code). When set, P also enters P·V as hi + lo, so that O, and the
  // output, are accurate to ~16 bits (the backward's epilogue Jacobian is evaluated there).
  int8_t* out_refine;
  // Scratch (B, H, kKeyRecordFields, Mpad) float32, written by the prologue kernel.
  float* key_records;
  // Scratch (B, H, Mpad, 8) in the input dtype for dot-product scores with parts == 1 (else nullptr), written by
  // the prologue kernel: each key's v0 in parts, the extra columns of the P·V tensor-core product on sm_90a
  // (attention_fwd_kernel.cuh: TimeBlock).
  void* key_time_block;
  // Per query head (H,) float32: curvature k_h > 0 and the score coefficient (scale or β).
  const float* curvature;
  const float* coef;
  // (B, M) bool/uint8, nonzero = padded key; nullptr when there is no padding mask.
  const uint8_t* key_padding;
  int batch, heads, kv_heads, n_queries, n_keys, n_keys_padded;
  int head_dim;
  int score;   // ScoreId
  int output;  // OutputId
  bool causal;
  bool squared;
  bool is_bf16;  // else float16
  int parts;     // 1: q, k, v are the inputs; 3: bf16 parts of float32 inputs (output float32)
  float acosh_eps;
};

// x (n float32, n a multiple of 4, 16-byte aligned) → parts[0 .. 3n) bf16: x = parts[i] + parts[n + i] +
// parts[2n + i] to float32 precision (the input of the parts == 3 path).
cudaError_t launch_split_fp32(const float* x, void* parts, int64_t n, cudaStream_t stream);

// Launches the key-record prologue and the fused forward on `stream`; returns the first CUDA error.
cudaError_t launch_attention_fwd(const FwdParams& params, cudaStream_t stream);

// key_records rows are padded to a multiple of this (a multiple of every kernel's key tile).
constexpr int kKeyRecordPad = 64;

}  // namespace hyptorch_flash
