// PyTorch binding of the fused hyperbolic attention forward: checks tensors, allocates the outputs
// and the key-record scratch, fills FwdParams and launches on the current stream. The only file of
// the extension that includes torch; hyptorch_flash/ops/cuda_backend.py wraps `fwd` in the custom op
// hyptorch_flash::attention_fwd.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "attention_fwd.h"

namespace {

void check_input(const at::Tensor& x, const char* name, int64_t head_dim) {
  TORCH_CHECK(x.is_cuda(), "hyptorch_flash_cuda.fwd: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, "hyptorch_flash_cuda.fwd: ", name, " must be 4-D (B, H, seq, D), got ", x.sizes());
  TORCH_CHECK(x.size(3) == head_dim, "hyptorch_flash_cuda.fwd: ", name, " has head dim ", x.size(3),
              ", expected ", head_dim);
}

bool starts_16_byte_aligned(const at::Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; }

// The kernel reads 16-byte row chunks: last dim contiguous, other strides and the base 16-byte aligned. A
// contiguous tensor can still start off a 16-byte boundary (a view into a larger buffer): then a copy.
at::Tensor with_kernel_strides(const at::Tensor& x) {
  const bool ok = x.stride(3) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0 &&
                  starts_16_byte_aligned(x);
  if (ok) return x;
  at::Tensor c = x.contiguous();
  return starts_16_byte_aligned(c) ? c : c.clone();
}

// float32 input x → (3, B, H, rows, D) bf16 parts with x = hi + mid + lo to float32 precision, by one
// kernel (attention_fwd_split.cu); the current device and stream are x's.
at::Tensor split_into_bf16_parts(const at::Tensor& x) {
  at::Tensor src = x.contiguous();
  if (!starts_16_byte_aligned(src)) src = src.clone();  // float4 loads
  std::vector<int64_t> sizes{3};
  sizes.insert(sizes.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor parts = at::empty(sizes, x.options().dtype(at::kBFloat16));
  const cudaError_t err = hyptorch_flash::launch_split_fp32(src.data_ptr<float>(), parts.data_ptr(), src.numel(),
                                                            at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hyptorch_flash_cuda.fwd: float32 split failed: ", cudaGetErrorString(err));
  return parts;
}

// The tensor the kernel reads (part 0 of the split for float32) and its strides.
struct KernelInput {
  at::Tensor storage;  // keeps the split parts alive until the launch
  at::Tensor view;
  hyptorch_flash::Strides4 strides;
};

KernelInput kernel_input(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) {
    at::Tensor parts = split_into_bf16_parts(x);
    at::Tensor view = parts[0];
    return {parts, view, {view.stride(0), view.stride(1), view.stride(2), parts.stride(0)}};
  }
  at::Tensor view = with_kernel_strides(x);
  return {view, view, {view.stride(0), view.stride(1), view.stride(2), 0}};
}

// refine_output: bf16/fp16 also return the output's refinement codes (B, H, N, D) int8 for the backward
// (attention_fwd.h: out_refine); otherwise, and for float32 (whose output is float32), an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                   const at::Tensor& curvature, const at::Tensor& coef,
                                                   const std::optional<at::Tensor>& key_padding_mask, int64_t score,
                                                   int64_t output, bool causal, bool squared, double acosh_eps,
                                                   bool refine_output) {
  const int64_t D = q_in.size(-1);
  TORCH_CHECK(D == 64 || D == 128, "hyptorch_flash_cuda.fwd: head dim must be 64 or 128 (pad first), got ", D);
  check_input(q_in, "q", D);
  check_input(k_in, "k", D);
  check_input(v_in, "v", D);
  const at::ScalarType dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "hyptorch_flash_cuda.fwd: dtype must be bfloat16, float16 or float32, got ", dtype);
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype,
              "hyptorch_flash_cuda.fwd: q, k, v must share one dtype");
  const c10::cuda::CUDAGuard device_guard(q_in.device());  // the float32 split launches on q's device
  const KernelInput qi = kernel_input(q_in), ki = kernel_input(k_in), vi = kernel_input(v_in);
  const at::Tensor &q = qi.view, &k = ki.view, &v = vi.view;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Hkv = k.size(1), M = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == M,
              "hyptorch_flash_cuda.fwd: shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "hyptorch_flash_cuda.fwd: H = ", H, " is not a multiple of Hkv = ", Hkv);
  for (const at::Tensor* param : {&curvature, &coef}) {
    TORCH_CHECK(param->is_cuda() && param->scalar_type() == at::kFloat && param->dim() == 1 &&
                    param->size(0) == H && param->is_contiguous(),
                "hyptorch_flash_cuda.fwd: curvature and coef must be contiguous float32 CUDA tensors of shape (H,)");
  }
  TORCH_CHECK(score >= 0 && score <= 3, "hyptorch_flash_cuda.fwd: score id must be 0..3, got ", score);
  TORCH_CHECK(output >= 0 && output <= 3, "hyptorch_flash_cuda.fwd: output id must be 0..3, got ", output);
  TORCH_CHECK((score == hyptorch_flash::SCORE_EUCLIDEAN) == (output == hyptorch_flash::OUTPUT_EUCLIDEAN),
              "hyptorch_flash_cuda.fwd: the euclidean output goes with the euclidean score only");
  at::Tensor padding;
  if (key_padding_mask.has_value()) {
    padding = key_padding_mask->contiguous();
    TORCH_CHECK(padding.is_cuda() && padding.scalar_type() == at::kBool && padding.dim() == 2 &&
                    padding.size(0) == B && padding.size(1) == M,
                "hyptorch_flash_cuda.fwd: key_padding_mask must be a bool CUDA tensor of shape (B, M)");
  }

  const c10::cuda::CUDAGuard guard(q.device());
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty(q.sizes(), q_in.options());
  at::Tensor lse = at::empty({B, H, N}, f32);
  at::Tensor o0 = at::empty({B, H, N}, f32);
  const bool refine = refine_output && dtype != at::kFloat;
  at::Tensor out_refine = at::empty(refine ? q.sizes() : at::IntArrayRef{0}, q.options().dtype(at::kChar));
  const int64_t m_padded = (M + hyptorch_flash::kKeyRecordPad - 1) / hyptorch_flash::kKeyRecordPad * hyptorch_flash::kKeyRecordPad;
  at::Tensor records = at::empty({B, H, hyptorch_flash::kKeyRecordFields, m_padded}, f32);
  // dot-product scores, bf16/fp16: each key's v0 in parts for the tensor cores (attention_fwd.h)
  const bool time_block_used = dtype != at::kFloat &&
                               (score == hyptorch_flash::SCORE_LORENTZ_DOT || score == hyptorch_flash::SCORE_EUCLIDEAN);
  at::Tensor time_block = at::empty(time_block_used ? at::IntArrayRef{B, H, m_padded, 8} : at::IntArrayRef{0}, q.options());

  hyptorch_flash::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride = qi.strides;
  p.k_stride = ki.strides;
  p.v_stride = vi.strides;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o0 = o0.data_ptr<float>();
  p.out_refine = refine ? out_refine.data_ptr<int8_t>() : nullptr;
  p.key_records = records.data_ptr<float>();
  p.key_time_block = time_block_used ? time_block.data_ptr() : nullptr;
  p.curvature = curvature.data_ptr<float>();
  p.coef = coef.data_ptr<float>();
  p.key_padding = padding.defined() ? reinterpret_cast<const uint8_t*>(padding.data_ptr<bool>()) : nullptr;
  p.batch = (int)B;
  p.heads = (int)H;
  p.kv_heads = (int)Hkv;
  p.n_queries = (int)N;
  p.n_keys = (int)M;
  p.n_keys_padded = (int)m_padded;
  p.head_dim = (int)D;
  p.score = (int)score;
  p.output = (int)output;
  p.causal = causal;
  p.squared = squared;
  p.is_bf16 = q.scalar_type() == at::kBFloat16;  // also for the bf16 parts of float32 inputs
  p.parts = dtype == at::kFloat ? 3 : 1;
  p.acosh_eps = (float)acosh_eps;
  if (N > 0 && B * H > 0) {
    const cudaError_t err = hyptorch_flash::launch_attention_fwd(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "hyptorch_flash_cuda.fwd: kernel launch failed: ", cudaGetErrorString(err));
  }
  return {out, lse, o0, out_refine};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused hyperbolic attention kernels (hyptorch_flash)";
  m.def("fwd", &fwd, "Fused hyperbolic attention forward -> (out, lse, o0, out_refine)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("curvature"), py::arg("coef"), py::arg("key_padding_mask"), py::arg("score"),
        py::arg("output"), py::arg("causal"), py::arg("squared"), py::arg("acosh_eps"),
        py::arg("refine_output"));
}
