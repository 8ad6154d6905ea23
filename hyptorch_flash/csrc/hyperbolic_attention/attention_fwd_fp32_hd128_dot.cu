// One instantiation of the forward kernel: float32 inputs split into three bf16 parts, head dim 128,
// dot-product scores (euclidean, lorentz_dot).
#include "attention_fwd_launch.cuh"

namespace hyptorch_flash {
template cudaError_t launch_fwd_main<__nv_bfloat16, 128, false, 3>(const FwdParams&, cudaStream_t);
}  // namespace hyptorch_flash
