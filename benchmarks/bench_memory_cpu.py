"""Peak activation memory of one forward + backward, reference vs blockwise, on the CPU.

Each backend runs in a fresh subprocess. The peak is measured by the kernel's resident-set
high-water mark: reset it (``/proc/self/clear_refs`` ← 5) after the inputs exist and a small warm-up
ran, then read ``VmHWM`` after fwd+bwd. Peak minus the resident set before the call is the memory the
attention call itself needed (scores, probabilities, saved activations, gradients). Linux only.

    python benchmarks/bench_memory_cpu.py --n 8192 --heads 1 --dim 64
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import gc, json, sys, time, torch
import hyptorch_flash as hf

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
backend, n, h, d, score = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))
upstream = torch.randn(1, h, n, d)
small = [x[:, :, :256].detach().requires_grad_() for x in (q, k, v)]
hf.hyperbolic_attention(*small, score=score, backend=backend).sum().backward()  # warm-up: load code paths
gc.collect()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
t0 = time.perf_counter()
out = hf.hyperbolic_attention(q, k, v, score=score, backend=backend)
out.backward(upstream)
seconds = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({"backend": backend, "peak_extra_bytes": peak - before, "seconds": seconds}))
"""


def measure(backend: str, n: int, heads: int, dim: int, score: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, backend, str(n), str(heads), str(dim), score],
        check=True, capture_output=True, text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--score", default="lorentz_dot")
    args = parser.parse_args()
    rows = [measure(b, args.n, args.heads, args.dim, args.score) for b in ("reference", "blockwise")]
    io_bytes = 4 * args.heads * args.n * args.dim * 7  # q, k, v, out and their three gradients, fp32
    print(f"fwd+bwd, score={args.score}, B=1, H={args.heads}, N={args.n}, D={args.dim}, float32, CPU")
    print(f"(inputs + output + gradients themselves: {io_bytes / 2**20:.1f} MiB)")
    for row in rows:
        print(f"{row['backend']:>10}: peak extra {row['peak_extra_bytes'] / 2**20:9.1f} MiB   {row['seconds']:.2f} s")
    ratio = rows[0]["peak_extra_bytes"] / max(rows[1]["peak_extra_bytes"], 1)
    print(f"reference / blockwise peak memory: {ratio:.1f}x")


if __name__ == "__main__":
    main()
