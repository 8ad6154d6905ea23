// |x_r|² per row of a contiguous (rows, D) bf16/fp16/float32 tensor, D ∈ {64, 128}, as float32: the backward's
// row and key fields (q_sq, k_sq, v_sq), D/4 lanes per row. bf16/fp16 accumulate in float32; float32 in float64,
// like the forward's split path and cuda_backward._squares (the time coordinates √(κ + |x|²) enter cancelling
// differences at large norms).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bwd_params.cuh"
#include "device_primitives.cuh"

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

// kHeadDim / 4 lanes per row, four columns each (2 rows per warp at D = 64, 1 at 128); every lane of a warp
// runs the same number of iterations (the shuffles need the whole warp), rows past the end add nothing.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kSquaresWarps * 32) row_squares_kernel(const T* x, float* out, int64_t rows) {
  using Acc = typename SquaresAcc<T>::type;
  constexpr int kLanes = kHeadDim / 4, kRowsPerWarp = 32 / kLanes;
  const int lane = threadIdx.x & 31, sub = lane / kLanes, c = 4 * (lane % kLanes);
  const int64_t warp = (int64_t)blockIdx.x * kSquaresWarps + (threadIdx.x >> 5);
  const int64_t n_warps = (int64_t)gridDim.x * kSquaresWarps;
  for (int64_t base = warp * kRowsPerWarp; base < rows; base += n_warps * kRowsPerWarp) {
    const int64_t row = base + sub;
    Acc s = 0;
    if (row < rows) {
      const float4 v = load4(x + row * kHeadDim + c);
      s = (Acc)v.x * (Acc)v.x + (Acc)v.y * (Acc)v.y + (Acc)v.z * (Acc)v.z + (Acc)v.w * (Acc)v.w;
    }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (row < rows && lane % kLanes == 0) out[row] = (float)s;
  }
}

template <typename T>
cudaError_t launch_squares(const void* x, float* out, int64_t rows, int head_dim, cudaStream_t stream) {
  const unsigned grid = row_kernel_grid(rows, kSquaresWarps * (128 / head_dim));  // (2 rows per warp at D = 64)
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
