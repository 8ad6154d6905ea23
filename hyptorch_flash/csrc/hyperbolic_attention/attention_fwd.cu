// Entry point of the forward: validates the run-time configuration, launches the key-record
// prologue, then the main kernel instantiation for (dtype or split float32, head dim, score family).
#include "attention_fwd_kernel.cuh"

namespace hyptorch_flash {

template <typename T, int kHeadDim, bool kDistance, int kParts>
cudaError_t launch_fwd_main(const FwdParams& p, cudaStream_t stream);

namespace {

template <typename T, int kParts>
cudaError_t launch_typed(const FwdParams& p, cudaStream_t stream) {
  // 8 (D = 64) or 16 (D = 128) lanes per key, 256 threads per block
  const int keys_per_block = 256 / (p.head_dim / 8);
  const dim3 grid((p.n_keys_padded + keys_per_block - 1) / keys_per_block, p.batch * p.heads);
  if (p.head_dim == 64) key_records_kernel<T, 8, kParts><<<grid, 256, 0, stream>>>(p);
  else key_records_kernel<T, 16, kParts><<<grid, 256, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const bool distance = p.score == SCORE_DISTANCE || p.score == SCORE_POINCARE;
  if (p.head_dim == 64) {
    return distance ? launch_fwd_main<T, 64, true, kParts>(p, stream) : launch_fwd_main<T, 64, false, kParts>(p, stream);
  }
  return distance ? launch_fwd_main<T, 128, true, kParts>(p, stream) : launch_fwd_main<T, 128, false, kParts>(p, stream);
}

}  // namespace

cudaError_t launch_attention_fwd(const FwdParams& p, cudaStream_t stream) {
  if ((p.head_dim != 64 && p.head_dim != 128) || p.n_keys_padded % kKeyRecordPad != 0 || p.heads % p.kv_heads != 0 ||
      (p.parts != 1 && p.parts != 3) || (p.parts == 3 && !p.is_bf16)) {
    return cudaErrorInvalidValue;
  }
  if (p.parts == 3) return launch_typed<__nv_bfloat16, 3>(p, stream);
  return p.is_bf16 ? launch_typed<__nv_bfloat16, 1>(p, stream) : launch_typed<__half, 1>(p, stream);
}

}  // namespace hyptorch_flash
