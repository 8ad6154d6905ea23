"""A/B of the forward kernel's speed in one process (GPU): the extension built from an older copy of the
forward sources against the current one, same inputs, interleaved timings (CUDA events, median of 7 × 10
calls), for inference and for the backward (refine_output=True: P·V with P as hi + lo, the output's
refinement codes). The older copy must have the refine_output argument (commit 5066089 or later).

    git show REV:<file> for the forward sources → dev/old_fwd_src/, then: python dev/ab_forward_speed.py
"""
import sys
from pathlib import Path

import torch

from gpu_timing import timed  # dev/gpu_timing.py
from hyptorch_flash.ops import cuda_build

OLD = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "old_fwd_src")


def main():
    new = cuda_build.load()
    hashed = sorted(p for p in OLD.iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h"))
    old = cuda_build.jit_build("hyptorch_flash_cuda_ab_old", [OLD / "binding.cpp", *sorted(OLD.glob("attention_fwd*.cu"))],
                               hashed, cuda_build.NVCC_FLAGS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, N = 2, 16, 4096
    for D in (64, 128):
        q, k, v = (torch.randn(B, H, N, D, device="cuda", generator=gen).mul_(0.3).bfloat16() for _ in range(3))
        curv, coef = torch.ones(H, device="cuda"), torch.full((H,), D**-0.5, device="cuda")
        for name, score, output in (("lorentz_dot", 1, 1), ("euclidean", 0, 0), ("distance", 2, 1)):
            args = (q, k, v, curv, coef if score != 2 else torch.ones(H, device="cuda"), None, score, output, False,
                    False, 1e-6)
            runs = {"old": lambda: old.fwd(*args, False), "new": lambda: new.fwd(*args, False),
                    "old refine_output": lambda: old.fwd(*args, True), "new refine_output": lambda: new.fwd(*args, True)}
            outs = {key: fn()[0].float() for key, fn in runs.items()}
            diff = max((outs[f"new{r}"] - outs[f"old{r}"]).abs().max().item() for r in ("", " refine_output"))
            ms = {key: [] for key in runs}
            for _ in range(3):  # interleaved
                for key, fn in runs.items():
                    ms[key].append(timed(fn))
            flops = 4 * B * H * N * N * D
            line = "  ".join(f"{key} {min(v):.3f} ms ({flops / min(v) / 1e9:.1f} TFLOP/s)" for key, v in ms.items())
            print(f"D={D} {name:12s} {line}  max |new - old| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
