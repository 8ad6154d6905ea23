// Run-time dispatch of the backward over (head dim, dtype); each pair is compiled in its own
// bwd_hd<D>_<dtype>.cu so a cold build compiles them in parallel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bwd_params.cuh"

namespace hyptorch_flash {
namespace bwd {
template <typename T, int kHeadDim>
cudaError_t launch_for_score(const BwdParams& p, int stage, cudaStream_t stream);
}  // namespace bwd

cudaError_t launch_attention_bwd(const BwdParams& params, int head_dim, bool is_bf16, int stage, cudaStream_t stream) {
  if (head_dim == 64) {
    return is_bf16 ? bwd::launch_for_score<__nv_bfloat16, 64>(params, stage, stream)
                   : bwd::launch_for_score<__half, 64>(params, stage, stream);
  }
  if (head_dim == 128) {
    return is_bf16 ? bwd::launch_for_score<__nv_bfloat16, 128>(params, stage, stream)
                   : bwd::launch_for_score<__half, 128>(params, stage, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hyptorch_flash
