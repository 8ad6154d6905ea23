// Run-time dispatch of the backward over (head dim, operand type); each pair is compiled in its own
// bwd_hd<D>_<dtype>.cu so a cold build compiles them in parallel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bwd_params.cuh"

namespace hyptorch_flash {
namespace bwd {
template <typename T, int kHeadDim, int kParts>
cudaError_t launch_for_score(const BwdParams& p, int stage, cudaStream_t stream);

template <int kHeadDim>
cudaError_t launch_for_dtype(const BwdParams& p, BwdDtype dtype, int stage, cudaStream_t stream) {
  switch (dtype) {
    case BWD_BF16:
      return launch_for_score<__nv_bfloat16, kHeadDim, 1>(p, stage, stream);
    case BWD_FP16:
      return launch_for_score<__half, kHeadDim, 1>(p, stage, stream);
    case BWD_FP32_SPLIT:
      return launch_for_score<__nv_bfloat16, kHeadDim, 3>(p, stage, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
}  // namespace bwd

cudaError_t launch_attention_bwd(const BwdParams& params, int head_dim, BwdDtype dtype, int stage, cudaStream_t stream) {
  if (head_dim == 64) return bwd::launch_for_dtype<64>(params, dtype, stage, stream);
  if (head_dim == 128) return bwd::launch_for_dtype<128>(params, dtype, stage, stream);
  return cudaErrorInvalidValue;
}

}  // namespace hyptorch_flash
