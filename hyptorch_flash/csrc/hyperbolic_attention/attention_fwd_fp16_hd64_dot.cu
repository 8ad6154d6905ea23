// One instantiation of the forward kernel: fp16, head dim 64, dot-product scores (euclidean, lorentz_dot).
#include "attention_fwd_launch.cuh"

namespace hyptorch_flash {
template cudaError_t launch_fwd_main<__half, 64, false, 1>(const FwdParams&, cudaStream_t);
}  // namespace hyptorch_flash
