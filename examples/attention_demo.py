"""Run hyperbolic attention with every available backend on random data: agreement and timing.

    python examples/attention_demo.py                 # CPU, small shapes
    python examples/attention_demo.py --device cuda --n 4096 --dtype bf16

For each score variant, every backend that supports the inputs runs forward + backward; the table
shows its time and its largest difference to the reference backend (output and dq).
"""
from __future__ import annotations

import argparse
import time

import torch

import hyptorch_flash as hf
from hyptorch_flash.ops import backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def make_inputs(score, shape, dtype, device, generator):
    x = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    if score == "poincare_distance":  # points inside the unit ball
        x = [t / (1 + t.norm(dim=-1, keepdim=True)) for t in x]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in x]


def run(backend, score, inputs, upstream, causal):
    for t in inputs:
        t.grad = None
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = hf.hyperbolic_attention(*inputs, score=score, causal=causal, backend=backend)
    out.backward(upstream)
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return out.detach(), inputs[0].grad.detach(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    shape = (args.batch, args.heads, args.n, args.dim)
    print(f"shape (B, H, N, D) = {shape}, dtype {args.dtype}, device {args.device}, causal={args.causal}")
    print(f"{'score':<18} {'backend':<10} {'fwd+bwd ms':>10} {'max|Δout|':>10} {'max|Δdq|':>10}")
    g = torch.Generator().manual_seed(0)
    for score in ("lorentz_dot", "distance", "poincare_distance", "euclidean"):
        inputs = make_inputs(score, shape, DTYPES[args.dtype], args.device, g)
        upstream = torch.randn(shape, generator=g).to(device=args.device, dtype=DTYPES[args.dtype])
        ref_out, ref_dq, _ = run("reference", score, inputs, upstream, args.causal)
        for name in backends.backend_names()[1:]:
            problem_ok = True
            try:
                run(name, score, inputs, upstream, args.causal)  # warm-up (and JIT build for cuda)
                out, dq, seconds = run(name, score, inputs, upstream, args.causal)
            except (RuntimeError, NotImplementedError) as err:
                problem_ok = False
                print(f"{score:<18} {name:<10} {'skipped':>10}  ({str(err).splitlines()[0][:90]})")
            if problem_ok:
                d_out = (out.double() - ref_out.double()).abs().max().item()
                d_dq = (dq.double() - ref_dq.double()).abs().max().item()
                print(f"{score:<18} {name:<10} {seconds * 1e3:10.1f} {d_out:10.2e} {d_dq:10.2e}")


if __name__ == "__main__":
    main()
