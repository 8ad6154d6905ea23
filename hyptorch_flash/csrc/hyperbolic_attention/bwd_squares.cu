// |x_r|² per row of a contiguous (rows, D) bf16/fp16/float32 tensor, D ∈ {64, 128}, as float32: the backward's
// row and key fields (q_sq, k_sq, v_sq). One warp per row, each lane two adjacent columns per 64. bf16/fp16
// accumulate in float32; float32 in float64, like the forward's split path and cuda_backward._squares (the
// time coordinates √(κ + |x|²) enter cancelling differences at large norms).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bwd_params.cuh"

namespace hyptorch_flash {
namespace bwd {

constexpr int kSquaresWarps = 8;

template <typename T>
struct SquaresAcc {
  using type = float;
};
template <>
struct SquaresAcc<float> {
  using type = double;
};

__device__ __forceinline__ float2 pair_of(const __nv_bfloat16* x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x));
}
__device__ __forceinline__ float2 pair_of(const __half* x) { return __half22float2(*reinterpret_cast<const __half2*>(x)); }
__device__ __forceinline__ float2 pair_of(const float* x) { return *reinterpret_cast<const float2*>(x); }

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kSquaresWarps * 32) row_squares_kernel(const T* x, float* out, int64_t rows) {
  using Acc = typename SquaresAcc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t n_warps = (int64_t)gridDim.x * kSquaresWarps;
  for (int64_t row = (int64_t)blockIdx.x * kSquaresWarps + (threadIdx.x >> 5); row < rows; row += n_warps) {
    Acc s = 0;
#pragma unroll
    for (int c = 2 * lane; c < kHeadDim; c += 64) {
      const float2 v = pair_of(x + row * kHeadDim + c);
      s += (Acc)v.x * (Acc)v.x + (Acc)v.y * (Acc)v.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[row] = (float)s;
  }
}

template <typename T>
cudaError_t launch_squares(const void* x, float* out, int64_t rows, int head_dim, cudaStream_t stream) {
  const int64_t blocks = (rows + kSquaresWarps - 1) / kSquaresWarps;
  const unsigned grid = (unsigned)(blocks < (1 << 20) ? blocks : (1 << 20));
  if (head_dim == 64) {
    row_squares_kernel<T, 64><<<grid, kSquaresWarps * 32, 0, stream>>>(static_cast<const T*>(x), out, rows);
  } else {
    row_squares_kernel<T, 128><<<grid, kSquaresWarps * 32, 0, stream>>>(static_cast<const T*>(x), out, rows);
  }
  return cudaGetLastError();
}

}  // namespace bwd

cudaError_t launch_row_squares(const void* x, float* out, int64_t rows, int head_dim, BwdDtype dtype,
                               cudaStream_t stream) {
  if (head_dim != 64 && head_dim != 128) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (dtype == BWD_BF16) return bwd::launch_squares<__nv_bfloat16>(x, out, rows, head_dim, stream);
  if (dtype == BWD_FP16) return bwd::launch_squares<__half>(x, out, rows, head_dim, stream);
  return bwd::launch_squares<float>(x, out, rows, head_dim, stream);
}

}  // namespace hyptorch_flash
