// PyTorch binding of the fused hyperbolic attention backward kernels: checks tensors, allocates the
// float32 contractions (see bwd_params.cuh), fills BwdParams and launches on the current stream.
// hyptorch_flash/ops/cuda_backward.py prepares the inputs (epilogue pull-back, D_i) and finishes the
// gradients from these contractions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

#include "bwd_params.cuh"

namespace {

void check_4d(const at::Tensor& x, const char* name, int64_t head_dim) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.is_contiguous() && x.size(3) == head_dim,
              "hyptorch_flash_cuda_bwd: ", name, " must be a contiguous 4-D CUDA tensor with head dim ", head_dim,
              ", got ", x.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "hyptorch_flash_cuda_bwd: ", name,
              " must start on a 16-byte boundary (the kernels' vector loads); copy it with .clone()");
}

// A kernel operand: a 4-D bf16/fp16 tensor, or a float32 one split into three bf16 parts, (3, B, H, rows, D)
// (part-major, contiguous). view = the 4-D tensor or part 0; part_stride = elements between parts (0 if one).
struct Operand {
  at::Tensor view;
  int64_t part_stride;
  bool split;
};

Operand operand(const at::Tensor& x, const char* name, int64_t head_dim) {
  if (x.dim() == 5) {
    TORCH_CHECK(x.size(0) == 3 && x.scalar_type() == at::kBFloat16,
                "hyptorch_flash_cuda_bwd: a 5-D ", name, " must hold three bf16 parts (3, B, H, rows, D), got ",
                x.scalar_type(), " ", x.sizes());
    TORCH_CHECK(x.is_contiguous(), "hyptorch_flash_cuda_bwd: the parts of ", name, " must be contiguous");
    at::Tensor part0 = x[0];
    check_4d(part0, name, head_dim);
    return {part0, x.stride(0), true};
  }
  check_4d(x, name, head_dim);
  return {x, 0, false};
}

void check_f32(const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.sizes() == shape,
              "hyptorch_flash_cuda_bwd: ", name, " must be a contiguous float32 CUDA tensor of shape ", shape,
              ", got ", x.scalar_type(), " ", x.sizes());
}

// The element type of a 4-D bf16/fp16/float32 tensor for the O(N·D) kernels (BWD_FP32_SPLIT: float32 values).
hyptorch_flash::BwdDtype bwd_dtype_of(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? hyptorch_flash::BWD_BF16
         : x.scalar_type() == at::kHalf   ? hyptorch_flash::BWD_FP16
                                          : hyptorch_flash::BWD_FP32_SPLIT;
}

// Fills the fields shared by the stages; the caller sets the stage's own pointers.
hyptorch_flash::BwdParams common_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& lse, const at::Tensor& q_sq, const at::Tensor& k_sq,
                                        const at::Tensor& v_sq, const at::Tensor& curvature, const at::Tensor& coef,
                                        const at::Tensor& padding, int64_t score, bool causal, bool squared,
                                        double acosh_eps) {
  const int64_t D = q.size(-1);
  TORCH_CHECK(D == 64 || D == 128, "hyptorch_flash_cuda_bwd: head dim must be 64 or 128, got ", D);
  const Operand qo = operand(q, "q", D), ko = operand(k, "k", D), vo = operand(v, "v", D);
  TORCH_CHECK(qo.split == ko.split && qo.split == vo.split,
              "hyptorch_flash_cuda_bwd: q, k, v must all be split into parts or none");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "hyptorch_flash_cuda_bwd: dtype must be bf16 or fp16");
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "hyptorch_flash_cuda_bwd: q, k, v must share one dtype");
  const int64_t B = qo.view.size(0), H = qo.view.size(1), N = qo.view.size(2), Hkv = ko.view.size(1),
                M = ko.view.size(2);
  TORCH_CHECK(ko.view.size(0) == B && v.sizes() == k.sizes() && Hkv > 0 && H % Hkv == 0,
              "hyptorch_flash_cuda_bwd: shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  check_f32(lse, "lse", {B, H, N});
  check_f32(q_sq, "q_sq", {B, H, N});
  check_f32(k_sq, "k_sq", {B, Hkv, M});
  check_f32(v_sq, "v_sq", {B, Hkv, M});
  check_f32(curvature, "curvature", {H});
  check_f32(coef, "coef", {H});
  TORCH_CHECK(score >= 0 && score <= 3, "hyptorch_flash_cuda_bwd: score id must be 0..3, got ", score);
  if (padding.defined()) {
    TORCH_CHECK(padding.is_cuda() && padding.sizes() == at::IntArrayRef({B, M}),
                "hyptorch_flash_cuda_bwd: key_padding_mask must be (B, M) on the device");
  }
  hyptorch_flash::BwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_part_stride = qo.part_stride;
  p.kv_part_stride = ko.part_stride;
  p.lse = lse.data_ptr<float>();
  p.q_sq = q_sq.data_ptr<float>();
  p.k_sq = k_sq.data_ptr<float>();
  p.v_sq = v_sq.data_ptr<float>();
  p.curvature = curvature.data_ptr<float>();
  p.coef = coef.data_ptr<float>();
  p.key_padding = padding.defined() ? padding.data_ptr<uint8_t>() : nullptr;
  p.batch = (int)B;
  p.heads = (int)H;
  p.kv_heads = (int)Hkv;
  p.n_queries = (int)N;
  p.n_keys = (int)M;
  p.score = (int)score;
  p.causal = causal;
  p.squared = squared;
  p.acosh_eps = (float)acosh_eps;
  return p;
}

at::Tensor padding_bytes(const std::optional<at::Tensor>& key_padding_mask) {
  return key_padding_mask.has_value() ? key_padding_mask->to(at::kByte).contiguous() : at::Tensor();
}

void launch(const hyptorch_flash::BwdParams& p, const at::Tensor& q, int stage) {
  const hyptorch_flash::BwdDtype dtype = q.dim() == 5                       ? hyptorch_flash::BWD_FP32_SPLIT
                                         : q.scalar_type() == at::kBFloat16 ? hyptorch_flash::BWD_BF16
                                                                            : hyptorch_flash::BWD_FP16;
  const cudaError_t err =
      hyptorch_flash::launch_attention_bwd(p, (int)q.size(-1), dtype, stage, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hyptorch_flash_cuda_bwd: kernel launch failed: ", cudaGetErrorString(err));
}

// dout_s (like q: 4-D, or (3, …) parts) and dout_lo (4-D inputs only, optional) → p, checked.
void set_dout(hyptorch_flash::BwdParams& p, const at::Tensor& q, const at::Tensor& dout_s,
              const std::optional<at::Tensor>& dout_lo) {
  const int64_t D = q.size(-1);
  operand(dout_s, "dout_s", D);
  TORCH_CHECK(dout_s.scalar_type() == q.scalar_type() && dout_s.sizes() == q.sizes(),
              "hyptorch_flash_cuda_bwd: dout_s must match q in dtype and shape (parts included)");
  if (dout_lo.has_value()) {
    TORCH_CHECK(q.dim() == 4, "hyptorch_flash_cuda_bwd: split inputs take no dout_lo (dout_s has three parts)");
    check_4d(*dout_lo, "dout_lo", D);
    TORCH_CHECK(dout_lo->scalar_type() == q.scalar_type() && dout_lo->sizes() == q.sizes(),
                "hyptorch_flash_cuda_bwd: dout_lo must match q in dtype and shape");
  }
  p.dout_s = dout_s.data_ptr();
  p.dout_lo = dout_lo.has_value() ? dout_lo->data_ptr() : nullptr;
}

// Stage 1: returns (dq_acc, row_acc, dk_acc, dv_acc, col_acc, scalar_partials), all float32.
// q, k, v: (B, H|Hkv, rows, D) bf16/fp16, or float32 inputs as (3, B, H|Hkv, rows, D) bf16 parts; split
// inputs take dout_s as parts too and no dout_lo.
std::vector<at::Tensor> bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout_s,
                            const std::optional<at::Tensor>& dout_lo, const at::Tensor& lse, const at::Tensor& delta,
                            const at::Tensor& dout0, const at::Tensor& q_sq, const at::Tensor& k_sq,
                            const at::Tensor& v_sq, const at::Tensor& curvature, const at::Tensor& coef,
                            const std::optional<at::Tensor>& key_padding_mask, int64_t score, bool causal,
                            bool squared, double acosh_eps, bool deterministic) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor padding = padding_bytes(key_padding_mask);
  hyptorch_flash::BwdParams p = common_params(q, k, v, lse, q_sq, k_sq, v_sq, curvature, coef, padding, score, causal,
                                              squared, acosh_eps);
  const int64_t D = q.size(-1), B = lse.size(0), H = lse.size(1), N = lse.size(2), M = k_sq.size(2);
  set_dout(p, q, dout_s, dout_lo);
  check_f32(delta, "delta", {B, H, N});
  check_f32(dout0, "dout0", {B, H, N});
  const auto f32 = q.options().dtype(at::kFloat);
  const bool atomic = !deterministic;
  // The atomic path adds into dq_acc/row_acc; the deterministic one writes every row.
  at::Tensor dq_acc = atomic ? at::zeros({B, H, N, D}, f32) : at::empty({B, H, N, D}, f32);
  at::Tensor row_acc = atomic ? at::zeros({B, H, N, 2}, f32) : at::empty({B, H, N, 2}, f32);
  at::Tensor dk_acc = at::empty({B, H, M, D}, f32);
  at::Tensor dv_acc = at::empty({B, H, M, D}, f32);
  at::Tensor col_acc = at::empty({B, H, M, 3}, f32);
  const int64_t key_blocks = (M + hyptorch_flash::kBwdBlockN - 1) / hyptorch_flash::kBwdBlockN;
  at::Tensor scalars = at::empty({B, H, key_blocks, 2}, f32);
  p.delta = delta.data_ptr<float>();
  p.dout0 = dout0.data_ptr<float>();
  p.dq_acc = dq_acc.data_ptr<float>();
  p.row_acc = row_acc.data_ptr<float>();
  p.dk_acc = dk_acc.data_ptr<float>();
  p.dv_acc = dv_acc.data_ptr<float>();
  p.col_acc = col_acc.data_ptr<float>();
  p.scalar_partials = scalars.data_ptr<float>();
  p.dq_atomic = atomic;
  launch(p, q, 1);
  return {dq_acc, row_acc, dk_acc, dv_acc, col_acc, scalars};
}

// Stage 2: D_i = Σ_j P_ij dP_ij (B, H, N) float32, from the P and dP that stage 1 recomputes
// (bwd_kernel.cuh, kernel 2's delta pass), for split float32 inputs and the poincare_distance score.
// Arguments as for bwd, without delta.
at::Tensor delta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout_s,
                 const std::optional<at::Tensor>& dout_lo, const at::Tensor& lse, const at::Tensor& dout0,
                 const at::Tensor& q_sq, const at::Tensor& k_sq, const at::Tensor& v_sq, const at::Tensor& curvature,
                 const at::Tensor& coef, const std::optional<at::Tensor>& key_padding_mask, int64_t score,
                 bool causal, bool squared, double acosh_eps) {
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(q.dim() == 5 || score == hyptorch_flash::SCORE_POINCARE,
              "hyptorch_flash_cuda_bwd: the delta pass runs split float32 inputs and the poincare_distance score");
  const at::Tensor padding = padding_bytes(key_padding_mask);
  hyptorch_flash::BwdParams p = common_params(q, k, v, lse, q_sq, k_sq, v_sq, curvature, coef, padding, score, causal,
                                              squared, acosh_eps);
  set_dout(p, q, dout_s, dout_lo);
  check_f32(dout0, "dout0", lse.sizes());
  at::Tensor zero = at::zeros_like(lse);  // dS = P·(dP − 0)
  at::Tensor out = at::empty_like(lse);
  p.delta = zero.data_ptr<float>();
  p.dout0 = dout0.data_ptr<float>();
  p.delta_acc = out.data_ptr<float>();
  launch(p, q, 2);
  return out;
}

// Step 1: (dout_hi, dout_lo or None, dout0, delta, dkap_rows) from the upstream gradient and the forward's
// output (bwd_prepare.cu). dout and out (B, H, N, D) in one dtype (bf16/fp16), out_refine (B, H, N, D) int8
// (the forward's refinement codes of out), o0 (B, H, N) float32.
std::vector<at::Tensor> prepare(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& out_refine,
                                const at::Tensor& o0, const at::Tensor& curvature, int64_t output) {
  const c10::cuda::CUDAGuard guard(dout.device());
  const int64_t D = dout.size(-1);
  TORCH_CHECK(D == 64 || D == 128, "hyptorch_flash_cuda_bwd: head dim must be 64 or 128, got ", D);
  check_4d(dout, "dout", D);
  check_4d(out, "out", D);
  check_4d(out_refine, "out_refine", D);
  const auto dtype = dout.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "hyptorch_flash_cuda_bwd: dout must be bf16 or fp16");
  TORCH_CHECK(out.scalar_type() == dtype && out.sizes() == dout.sizes(),
              "hyptorch_flash_cuda_bwd: out must match dout in dtype and shape");
  TORCH_CHECK(out_refine.scalar_type() == at::kChar && out_refine.sizes() == dout.sizes(),
              "hyptorch_flash_cuda_bwd: out_refine must be int8 of dout's shape (the forward's refine_output output)");
  check_f32(o0, "o0", {dout.size(0), dout.size(1), dout.size(2)});
  check_f32(curvature, "curvature", {dout.size(1)});
  TORCH_CHECK(output >= 0 && output <= 3, "hyptorch_flash_cuda_bwd: output id must be 0..3, got ", output);
  at::Tensor hi = at::empty_like(dout);
  at::Tensor lo = output == hyptorch_flash::OUTPUT_EUCLIDEAN ? at::Tensor() : at::empty_like(dout);
  at::Tensor dout0 = at::empty_like(o0), delta = at::empty_like(o0), dkap_rows = at::empty_like(o0);
  hyptorch_flash::PrepareParams p{};
  p.out = out.data_ptr();
  p.out_refine = out_refine.data_ptr<int8_t>();
  p.o0 = o0.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.curvature = curvature.data_ptr<float>();
  p.dout_hi = hi.data_ptr();
  p.dout_lo = lo.defined() ? lo.data_ptr() : nullptr;
  p.dout0 = dout0.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dkap_rows = dkap_rows.data_ptr<float>();
  p.rows = o0.numel();
  p.n_queries = (int)dout.size(2);
  p.heads = (int)dout.size(1);
  p.head_dim = (int)D;
  p.output = (int)output;
  const cudaError_t err = hyptorch_flash::launch_bwd_prepare(p, dtype == at::kBFloat16, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hyptorch_flash_cuda_bwd: kernel launch failed: ", cudaGetErrorString(err));
  return {hi, lo, dout0, delta, dkap_rows};
}

// Step 3 (euclidean, lorentz_dot, distance): (dq, dk, dv, dkap_q, dkap_k) from stage 1's float32 contractions
// (bwd's outputs but the scalars) and the inputs q, k, v (B, H|Hkv, rows, D) bf16/fp16/float32, contiguous; their
// squares (float32); curvature (H,) float32. dq/dk/dv in the inputs' dtype; dkap_q (B, H, N) and dkap_k (B, H, M)
// float32 per-row shares of dκ (bwd_finish.cu), zero for the euclidean score.
std::vector<at::Tensor> finish(const at::Tensor& dq_acc, const at::Tensor& row_acc, const at::Tensor& dk_acc,
                               const at::Tensor& dv_acc, const at::Tensor& col_acc, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_sq, const at::Tensor& k_sq,
                               const at::Tensor& v_sq, const at::Tensor& curvature, int64_t score) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t D = q.size(-1);
  TORCH_CHECK(D == 64 || D == 128, "hyptorch_flash_cuda_bwd: head dim must be 64 or 128, got ", D);
  check_4d(q, "q", D);
  check_4d(k, "k", D);
  check_4d(v, "v", D);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "hyptorch_flash_cuda_bwd: finish takes bf16, fp16 or float32 inputs, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "hyptorch_flash_cuda_bwd: q, k, v must share one dtype");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Hkv = k.size(1), M = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && Hkv > 0 && H % Hkv == 0,
              "hyptorch_flash_cuda_bwd: shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  TORCH_CHECK(score >= 0 && score <= 2, "hyptorch_flash_cuda_bwd: finish takes the score ids 0..2, got ", score);
  check_f32(dq_acc, "dq_acc", {B, H, N, D});
  check_f32(row_acc, "row_acc", {B, H, N, 2});
  check_f32(dk_acc, "dk_acc", {B, H, M, D});
  check_f32(dv_acc, "dv_acc", {B, H, M, D});
  check_f32(col_acc, "col_acc", {B, H, M, 3});
  check_f32(q_sq, "q_sq", {B, H, N});
  check_f32(k_sq, "k_sq", {B, Hkv, M});
  check_f32(v_sq, "v_sq", {B, Hkv, M});
  check_f32(curvature, "curvature", {H});
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dkap_q = at::zeros({B, H, N}, f32), dkap_k = at::zeros({B, H, M}, f32);
  hyptorch_flash::FinishParams p{};
  p.dq_acc = dq_acc.data_ptr<float>();
  p.row_acc = row_acc.data_ptr<float>();
  p.dk_acc = dk_acc.data_ptr<float>();
  p.dv_acc = dv_acc.data_ptr<float>();
  p.col_acc = col_acc.data_ptr<float>();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sq = q_sq.data_ptr<float>();
  p.k_sq = k_sq.data_ptr<float>();
  p.v_sq = v_sq.data_ptr<float>();
  p.curvature = curvature.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dkap_q = dkap_q.data_ptr<float>();
  p.dkap_k = dkap_k.data_ptr<float>();
  p.batch = (int)B;
  p.heads = (int)H;
  p.kv_heads = (int)Hkv;
  p.n_queries = (int)N;
  p.n_keys = (int)M;
  p.head_dim = (int)D;
  p.score = (int)score;
  const cudaError_t err = hyptorch_flash::launch_bwd_finish(p, bwd_dtype_of(q), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hyptorch_flash_cuda_bwd: kernel launch failed: ", cudaGetErrorString(err));
  return {dq, dk, dv, dkap_q, dkap_k};
}

// |x|² over the last dim: (B, heads, rows) float32 of a contiguous 4-D bf16/fp16/float32 x with head dim 64 or 128
// (bwd_squares.cu; float32 sums in float64).
at::Tensor squares(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t D = x.size(-1);
  TORCH_CHECK(D == 64 || D == 128, "hyptorch_flash_cuda_bwd: head dim must be 64 or 128, got ", D);
  check_4d(x, "x", D);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "hyptorch_flash_cuda_bwd: squares takes bf16, fp16 or float32, got ", x.scalar_type());
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(at::kFloat));
  const cudaError_t err = hyptorch_flash::launch_row_squares(x.data_ptr(), out.data_ptr<float>(), out.numel(), (int)D,
                                                             bwd_dtype_of(x), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hyptorch_flash_cuda_bwd: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prepare", &prepare, "Backward step 1: the upstream gradient pulled back through the centroid epilogue");
  m.def("bwd", &bwd, "Backward stage 1: float32 gradient contractions (see bwd_params.cuh)");
  m.def("squares", &squares, "|x|² over the last dim (float32; float32 inputs summed in float64)");
  m.def("finish", &finish, "Backward step 3 (euclidean, lorentz_dot, distance): the gradients from the contractions");
  m.def("delta", &delta, "Backward stage 2 (split float32 inputs, poincare_distance): D_i from the kernels' own P and dP");
}
