"""Time and peak memory vs sequence length: score="linear" (O(N)) against lorentz_dot's reference (O(N²)), CPU.

Each (variant, N) runs forward + backward in a fresh subprocess, fp32, B=1. Peak memory is the
kernel's resident-set high-water mark (reset through ``/proc/self/clear_refs`` after the inputs
exist and a warm-up ran; ``VmHWM`` read after fwd+bwd), minus the resident set before the call —
the memory the attention call itself needed (as ``bench_memory_cpu.py``). Time: the best of
``--repeats`` fwd+bwd runs; both figures are the minimum over ``--trials`` subprocesses (wall clock
and resident set on a shared machine vary by ±20% from run to run).
The quadratic reference stops at ``--max-quadratic-n`` (its N×N scores, probabilities and their
gradients need ≈ 16·N² bytes per head: 17 GiB at N = 32k). Linux only.

    python benchmarks/bench_linear_scaling.py --repeats 3 --trials 2 --out benchmarks/linear_scaling
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

CHILD = r"""
import gc, json, sys, time, torch
import hyptorch_flash as hf

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

score, backend, causal = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
n, h, d, repeats, threads = map(int, sys.argv[4:])
torch.set_num_threads(threads)
torch.manual_seed(0)
q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))
upstream = torch.randn(1, h, n, d)

def step(q, k, v, up):
    out = hf.hyperbolic_attention(q, k, v, score=score, causal=causal, backend=backend)
    out.backward(up)

small = [x[:, :, :256].detach().requires_grad_() for x in (q, k, v)]
step(*small, upstream[:, :, :256])  # warm-up: load the code paths
gc.collect()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
seconds = []
for _ in range(repeats):
    for x in (q, k, v):
        x.grad = None
    t0 = time.perf_counter()
    step(q, k, v, upstream)
    seconds.append(time.perf_counter() - t0)
peak = status("VmHWM")
print(json.dumps({"peak_extra_bytes": peak - before, "seconds": min(seconds)}))
"""

CONFIGS = (  # (label, score, backend, causal)
    ("linear (blockwise, non-causal)", "linear", "blockwise", False),
    ("linear (blockwise, causal)", "linear", "blockwise", True),
    ("lorentz_dot (reference, non-causal)", "lorentz_dot", "reference", False),
)


def measure(score, backend, causal, n, heads, dim, repeats, threads, trials=1) -> dict:
    runs = []
    for _ in range(trials):
        result = subprocess.run(
            [sys.executable, "-c", CHILD, score, backend, "1" if causal else "0", str(n), str(heads), str(dim),
             str(repeats), str(threads)],
            check=True, capture_output=True, text=True,
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {key: min(run[key] for run in runs) for key in runs[0]}


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, *_ in CONFIGS:
        pts = [r for r in rows if r["config"] == label]
        ns = [r["n"] for r in pts]
        axes[0].loglog(ns, [r["seconds"] for r in pts], "o-", label=label)
        axes[1].loglog(ns, [r["peak_extra_bytes"] / 2**20 for r in pts], "o-", label=label)
    axes[0].set(xlabel="N", ylabel="fwd+bwd seconds", title="time (CPU, fp32)")
    axes[1].set(xlabel="N", ylabel="peak extra MiB", title="peak memory of the call")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-quadratic-n", type=int, default=16384)
    parser.add_argument("--out", default="benchmarks/linear_scaling", help="writes OUT.json and OUT.png")
    args = parser.parse_args()

    rows = []
    print(f"fwd+bwd, B=1, H={args.heads}, D={args.dim}, float32, CPU, {args.threads} threads")
    print(f"{'config':<38} {'N':>6} {'seconds':>9} {'peak MiB':>10}")
    for label, score, backend, causal in CONFIGS:
        for n in args.ns:
            if backend == "reference" and n > args.max_quadratic_n:
                continue
            row = measure(score, backend, causal, n, args.heads, args.dim, args.repeats, args.threads, args.trials)
            rows.append({"config": label, "score": score, "backend": backend, "causal": causal, "n": n, **row})
            print(f"{label:<38} {n:>6} {row['seconds']:>9.3f} {row['peak_extra_bytes'] / 2**20:>10.1f}", flush=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor()
            or platform.machine(), "heads": args.heads, "dim": args.dim, "threads": args.threads,
            "repeats": args.repeats, "trials": args.trials, "max_quadratic_n": args.max_quadratic_n,
            "dtype": "float32", "batch": 1}
    with open(f"{args.out}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, f"{args.out}.png")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
