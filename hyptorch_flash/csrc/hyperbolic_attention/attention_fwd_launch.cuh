// Launcher of the main forward kernel for one (dtype, head dim, score family, parts); instantiated by the
// small attention_fwd_<dtype>_hd<D>_<family>.cu files so the cold build compiles them in parallel
// (fp32 = bf16 parts of split float32 inputs, kParts = 3).
#pragma once

#include "attention_fwd_kernel.cuh"

namespace hyptorch_flash {

template <typename T, int kHeadDim, bool kDistance, int kParts>
cudaError_t launch_fwd_main(const FwdParams& p, cudaStream_t stream) {
  using Tile = FwdTile<kHeadDim, kDistance, kParts>;
  int smem = Tile::template smem_bytes<T>();
  if constexpr (Tile::kTimeBlock) {
    // the wgmma kernel (sm_90a builds, which run on compute capability 9.x only) keeps the time block in its V buffers
    int device = 0, major = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return err;
    if (major == 9) smem += Tile::template time_block_bytes<T>();
  }
  // bf16/fp16 run for the backward (out_refine set): the hi + lo P·V variant
  auto kernel = attention_fwd_kernel<T, kHeadDim, kDistance, kParts, false>;
  if constexpr (kParts == 1) {
    if (p.out_refine != nullptr) kernel = attention_fwd_kernel<T, kHeadDim, kDistance, kParts, true>;
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.n_queries + Tile::kBlockM - 1) / Tile::kBlockM, p.batch * p.heads);
  kernel<<<grid, Tile::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hyptorch_flash
