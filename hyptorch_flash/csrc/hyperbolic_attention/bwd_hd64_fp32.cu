// Backward kernels for float32 inputs split into three bf16 parts, head dim 64, every score family
// (see bwd_kernel.cuh).
#include "bwd_kernel.cuh"

namespace hyptorch_flash {
namespace bwd {
template cudaError_t launch_for_score<__nv_bfloat16, 64, 3>(const BwdParams&, int, cudaStream_t);
}  // namespace bwd
}  // namespace hyptorch_flash
