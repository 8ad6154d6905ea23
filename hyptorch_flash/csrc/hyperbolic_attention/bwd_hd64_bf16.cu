// Backward kernels for bf16, head dim 64, every score family (see bwd_kernel.cuh).
#include "bwd_kernel.cuh"

namespace hyptorch_flash {
namespace bwd {
template cudaError_t launch_for_score<__nv_bfloat16, 64, 1>(const BwdParams&, int, cudaStream_t);
}  // namespace bwd
}  // namespace hyptorch_flash
