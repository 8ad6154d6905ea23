// float32 inputs of the forward → three bf16 parts x = hi + mid + lo (each the bf16 rounding, to nearest
// even, of what the previous parts leave; the subtractions are exact), one pass over x instead of the
// eight ATen operations and their float32 temporaries. The main kernel multiplies the parts (six
// products per tile, attention_fwd_kernel.cuh: mma_split).
#include "attention_fwd.h"
#include "device_primitives.cuh"

namespace hyptorch_flash {

namespace {

__global__ void __launch_bounds__(256) split_fp32_kernel(const float4* __restrict__ x, uint2* __restrict__ parts,
                                                         int64_t n4, int64_t part_stride4) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    float4 rest = x[i];
#pragma unroll
    for (int part = 0; part < 3; ++part) {
      const uint32_t p01 = pack2<__nv_bfloat16>(rest.x, rest.y), p23 = pack2<__nv_bfloat16>(rest.z, rest.w);
      parts[part * part_stride4 + i] = make_uint2(p01, p23);
      const float2 r01 = unpack2<__nv_bfloat16>(p01), r23 = unpack2<__nv_bfloat16>(p23);
      rest.x -= r01.x, rest.y -= r01.y, rest.z -= r23.x, rest.w -= r23.y;
    }
  }
}

}  // namespace

cudaError_t launch_split_fp32(const float* x, void* parts, int64_t n, cudaStream_t stream) {
  if (n % 4 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(parts) % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t n4 = n / 4;
  const int64_t blocks = (n4 + 255) / 256;
  const int grid = (int)(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
  split_fp32_kernel<<<grid, 256, 0, stream>>>(reinterpret_cast<const float4*>(x), static_cast<uint2*>(parts), n4, n4);
  return cudaGetLastError();
}

}  // namespace hyptorch_flash
