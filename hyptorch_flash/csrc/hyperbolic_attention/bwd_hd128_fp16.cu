// Backward kernels for fp16, head dim 128, every score family (see bwd_kernel.cuh).
#include "bwd_kernel.cuh"

namespace hyptorch_flash {
namespace bwd {
template cudaError_t launch_for_score<__half, 128, 1>(const BwdParams&, int, cudaStream_t);
}  // namespace bwd
}  // namespace hyptorch_flash
