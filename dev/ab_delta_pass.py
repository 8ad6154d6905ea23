"""Is the delta pass still needed for poincare_distance in bf16/fp16 (GPU)? With and without it, the
gradient error ratio err / (2·err_reference + floor) of every poincare_distance case of the CUDA gradient
grid (≤ 1 passes test_gradients_within_twice_reference_error), over several seeds.

    python dev/ab_delta_pass.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_cuda_backward import GRAD_FLOOR, _cuda_inputs, _op, grads_of  # noqa: E402

from hyptorch_flash.ops import cuda_backward as cb  # noqa: E402

WITH_DELTA = cb.FusedKernels.bwd


def without_delta(self, q, k, v, dout_hi, dout_lo, lse, delta, dout0, *rest):
    return self._bwd(q, k, v, dout_hi, dout_lo, lse, delta, dout0, *rest)


def ratios(got, ref, truth, dtype):
    out = []
    for g, r, t in zip(got, ref, truth):
        scale = max(t.double().abs().max().item(), 1.0)
        e_g, e_r = ((x.double() - t.double()).abs().max().item() for x in (g, r))
        out.append(e_g / (2 * e_r + GRAD_FLOOR[dtype] * scale))
    return out


def main():
    worst = {"delta": 0.0, "none": 0.0}
    for dtype in (torch.bfloat16, torch.float16):
        for D, N, M in ((64, 200, 130), (128, 63, 257)):
            for output in ("lorentz", "klein", "poincare"):
                for mode in ("plain", "gqa_causal_padded"):
                    for seed in range(4):
                        args, params, kw, dout, fwd, eps, _ = _cuda_inputs("poincare_distance", output, dtype, N=N,
                                                                           M=M, D=D, mode=mode, seed=seed)
                        _, truth = grads_of([x.double().requires_grad_() for x in (*args, *params)], kw,
                                            dout.double(), "reference")
                        _, ref = grads_of([x.detach().clone().requires_grad_() for x in (*args, *params)], kw, dout,
                                          "reference")
                        line = []
                        for name, impl in (("delta", WITH_DELTA), ("none", without_delta)):
                            cb.FusedKernels.bwd = impl
                            r = ratios(_op(args, params, kw, dout, fwd, eps, False), ref, truth, dtype)
                            worst[name] = max(worst[name], max(r))
                            line.append(f"{name} {max(r):.2f}({'qkvcb'[r.index(max(r))]})")
                        cb.FusedKernels.bwd = WITH_DELTA
                        print(f"{str(dtype)[6:]:8s} D={D:3d} {output:9s} {mode:17s} seed {seed}  " + "  ".join(line),
                              flush=True)
    print("worst", worst)


if __name__ == "__main__":
    main()
