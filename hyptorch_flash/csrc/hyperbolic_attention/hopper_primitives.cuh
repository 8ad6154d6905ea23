// Hopper (sm_90a) building blocks of the forward kernel's warpgroup-MMA path: shared-memory matrix
// descriptors, the wgmma fence / commit / wait protocol and the async-proxy fence. Compiled into the
// kernel only where __CUDA_ARCH_FEAT_SM90_ALL is defined (see kFwdWgmmaArch in attention_fwd_kernel.cuh).
#pragma once

#include <cstdint>

#include "wgmma_ops.cuh"

namespace hyptorch_flash {

// Descriptor of a bf16/fp16 matrix in shared memory in the 128-byte swizzle layout (PTX ISA "Matrix
// Descriptor Format"): rows of 64 elements (128 bytes) whose 16-byte chunks are XOR-ed with row % 8, in
// atoms of 8 rows (1024 bytes, 1024-byte aligned, so the base-offset field is 0).
//   K-major operand (Q, K: contiguous along the reduction dim): stride = 1024 bytes between 8-row groups;
//     leading = unused by this mode (the 16 reduction elements of one wgmma lie inside one 128-byte row).
//   MN-major operand (V in P·V: contiguous along the output dim): stride = 1024 bytes between groups of
//     8 rows (keys); leading = bytes between the 64-column blocks of the output dim.
// smem_desc_swizzled<kRowBytes>: the same for rows of 128, 64 or 32 bytes (the 128-, 64- or 32-byte swizzle: 16-byte
// chunks XOR-ed with address bits 7-9, 7-8 or 7, in 8-row atoms of 8 · kRowBytes bytes, atom-aligned so the
// base-offset field is 0); for MN-major operands stride = 8 · kRowBytes between groups of 8 rows of the reduction
// dim, leading = bytes between kRowBytes / 2-element blocks of the M/N dim (unused within one block).
template <int kRowBytes>
__device__ __forceinline__ uint64_t smem_desc_swizzled(uint32_t smem_byte_addr, uint32_t leading_bytes,
                                                       uint32_t stride_bytes) {
  static_assert(kRowBytes == 128 || kRowBytes == 64 || kRowBytes == 32, "the 128-, 64- and 32-byte swizzles");
  constexpr uint64_t kMode = kRowBytes == 128 ? 1 : kRowBytes == 64 ? 2 : 3;  // the descriptor's layout type
  return (uint64_t)((smem_byte_addr & 0x3FFFF) >> 4) | ((uint64_t)(leading_bytes >> 4) << 16) |
         ((uint64_t)(stride_bytes >> 4) << 32) | (kMode << 62);
}

__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t smem_byte_addr, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  return smem_desc_swizzled<128>(smem_byte_addr, leading_bytes, stride_bytes);
}

// The same descriptor in two steps, for the k-steps of one tile: smem_desc_lo once per tile, then
// smem_desc_at(lo, offset) = smem_desc_sw128(tile + offset, ...) with one 32-bit add (the start-address field,
// address / 16 in 14 bits, never carries for shared-memory addresses, all below 256 KiB) instead of masking and
// shifting every address.
__device__ __forceinline__ uint32_t smem_desc_lo(uint32_t smem_byte_addr, uint32_t leading_bytes) {
  return ((smem_byte_addr & 0x3FFFF) >> 4) | ((leading_bytes >> 4) << 16);
}

__device__ __forceinline__ uint64_t smem_desc_at(uint32_t desc_lo, uint32_t offset_bytes, uint32_t stride_bytes) {
  return (uint64_t)(desc_lo + (offset_bytes >> 4)) | ((uint64_t)(stride_bytes >> 4) << 32) | (1ull << 62);
}

// Orders this thread's earlier shared-memory writes through the generic proxy (plain stores, cp.async)
// before later reads through the async proxy (wgmma operands); a barrier follows before the first wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Shared-memory barriers (mbarrier) and TMA tile loads, for kernels that load tiles with the tensor memory
// accelerator: one thread announces a barrier's byte count and issues the loads, which complete the barrier's phase
// when their bytes have landed; the other threads wait for that phase (parity 0, 1, 0, … per use).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}

// After mbar_init, before a barrier (__syncthreads) and the first use: the initialisation is seen by the TMA unit.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Waits for the phase of `bar` with this parity; traps after ~2^22 tries (seconds) instead of hanging, so that a
// phase that never completes (a bug) fails the launch.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  for (uint32_t tries = 0;; ++tries) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    if (done) return;
    if (tries == (1u << 22)) __trap();
  }
}

// The box of the 3-D tensor map `map` (a __grid_constant__ kernel parameter) at coordinates (c0 fastest, c1, c2)
// → shared memory at dst, completing `bar`'s transaction bytes; box elements outside the tensor are zero.
__device__ __forceinline__ void tma_load_3d(const void* map, uint32_t dst, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2) : "memory");
}

// Before the first wgmma of a group: makes the warpgroup's register writes (accumulators, A fragments)
// visible to the tensor cores.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Wait until at most kPending committed wgmma groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The compiler sees a wgmma read and write its registers when it is issued, not while it runs. Passing
// them through an empty asm orders the code around the asynchronous window: before wgmma_fence(), every
// write of the accumulators and A fragments stays before it (ptxas serialises all wgmma of a kernel that
// writes them inside the window); after wgmma_wait(), every later read stays after the wait.
template <int kTiles>
__device__ __forceinline__ void fence_registers(float (&d)[kTiles][4]) {
#pragma unroll
  for (int n = 0; n < kTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[n][e]));
}

template <int kTiles>
__device__ __forceinline__ void fence_registers(uint32_t (&a)[kTiles][4]) {
#pragma unroll
  for (int n = 0; n < kTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[n][e]));
}

}  // namespace hyptorch_flash
