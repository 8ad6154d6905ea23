"""Where the float32 backward's error comes from (GPU): for a few cases, the gradient error vs float64
autograd of (a) the fused op with the forward kernel's lse, (b) the fused op with the float64 lse rounded
to float32, (c) the reference backend in float32; and the forward lse's own error.

    python dev/ab_fp32_bwd.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_cuda_backward import OUTPUT_IDS, SCORE_IDS, _cuda_inputs, _op, grads_of  # noqa: E402

import hyptorch_flash  # noqa: E402,F401 - registers the ops

CASES = [("lorentz_dot", "lorentz", "gqa_causal_padded", 64, 150, 150), ("poincare_distance", "lorentz",
         "gqa_causal_padded", 64, 200, 130), ("euclidean", "euclidean", "plain", 128, 63, 257),
         ("distance", "poincare", "plain", 64, 200, 130)]


def rel_err(g, t):
    return (g.double() - t).abs().max().item() / max(t.abs().max().item(), 1.0)


for score, output, mode, D, N, M in CASES:
    args, params, kw, dout, fwd, eps, _ = _cuda_inputs(score, output, torch.float32, N=N, M=M, D=D, mode=mode)
    leaves64 = [x.double().requires_grad_() for x in (*args, *params)]
    _, truth = grads_of(leaves64, kw, dout.double(), "reference")
    leaves_ref = [x.detach().clone().requires_grad_() for x in (*args, *params)]
    _, ref = grads_of(leaves_ref, kw, dout, "reference")
    out, lse_k, o0_k = torch.ops.hyptorch_flash.attention_fwd(
        *args, *params, kw["key_padding_mask"], SCORE_IDS[score], OUTPUT_IDS[output], kw["causal"], kw["squared"], eps)
    lse64 = fwd[1]  # float64 lse rounded to float32 (the test's contract)
    live = torch.isfinite(lse64)
    lse_err = (lse_k[live].double() - lse64[live].double()).abs().max().item()
    with_kernel_lse = _op(args, params, kw, dout, (out, lse_k, o0_k), eps, False)
    with_exact_lse = _op(args, params, kw, dout, fwd, eps, False)
    print(f"{score}/{output}/{mode} D={D}: forward lse error {lse_err:.2e}")
    for name, a, b, r, t in zip(("dq", "dk", "dv", "dcurv", "dcoef"), with_kernel_lse, with_exact_lse, ref, truth):
        print(f"   {name:6s} kernel-lse {rel_err(a, t):.2e}  exact-lse {rel_err(b, t):.2e}  reference {rel_err(r, t):.2e}")
