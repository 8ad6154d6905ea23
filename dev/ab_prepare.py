"""A/B: PyTorch prepare_backward vs bwd_prepare.cu inside the full fused backward, errors vs float64 truth."""
import sys
import torch
sys.path.insert(0, "tests")
from test_cuda_backward import _cuda_inputs, grads_of, SCORE_IDS, OUTPUT_IDS  # noqa: E402
from hyptorch_flash.ops import cuda_backward as cb  # noqa: E402


class PyPrepare(cb.FusedKernels):
    def prepare(self, dout, o_s, o0, curvature, output, dtype):
        return cb.prepare_backward(dout, o_s, o0, curvature, output, dtype)


ext = cb.load_extension()
cases = [("poincare_distance", "lorentz", "gqa_causal_padded", 64, 200, 130, torch.float16)]
cases += [("distance", "lorentz", "gqa_causal_padded", 64, 200, 130, torch.float16),
          ("poincare_distance", "poincare", "gqa_causal_padded", 128, 63, 257, torch.float16)]
for score, output, mode, D, N, M, dtype in cases:
    for seed in range(4):
        args, params, kw, dout, fwd, eps, _ = _cuda_inputs(score, output, dtype, N=N, M=M, D=D, mode=mode, seed=seed)
        leaves64 = [x.double().requires_grad_() for x in (*args, *params)]
        _, truth = grads_of(leaves64, kw, dout.double(), "reference")
        flags = (kw["key_padding_mask"], SCORE_IDS[score], OUTPUT_IDS[output], kw["causal"], kw["squared"], eps, True)
        row = []
        for name, kern in (("py", PyPrepare(ext)), ("cu", cb.FusedKernels(ext))):
            got = cb.backward_in_passes(kern, dout, *args, fwd[1], *params, *flags)
            errs = [(g.double() - t).abs().max().item() / max(t.abs().max().item(), 1.0) for g, t in zip(got, truth)]
            row.append(name + " " + " ".join(f"{e:.2e}" for e in errs))
        print(score, output, mode, D, dtype, "seed", seed, "| dq dk dv dcurv dcoef |", " || ".join(row), flush=True)
