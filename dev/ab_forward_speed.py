"""A/B of the forward kernel's speed in one process (GPU): the extension built from an older copy of the
forward sources against the current one, same inputs, interleaved timings (CUDA events, median of 7 × 10
calls), for inference and for the backward (refine_output=True: P·V with P as hi + lo, the output's
refinement codes). The older copy must have the refine_output argument (commit 5066089 or later).

    git show REV:<file> for the forward sources → dev/old_fwd_src/, then: python dev/ab_forward_speed.py

``--build-only`` builds both extensions (or finds them cached) and exits.
"""
import sys
from pathlib import Path

from ab_common import forward_problems, timed  # dev/ab_common.py
from hyptorch_flash.ops import cuda_build

BUILD_ONLY = "--build-only" in sys.argv
_paths = [a for a in sys.argv[1:] if a != "--build-only"]
OLD = Path(_paths[0] if _paths else Path(__file__).resolve().parent / "old_fwd_src")


def main():
    new = cuda_build.load()
    hashed = sorted(p for p in OLD.iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h"))
    old = cuda_build.jit_build("hyptorch_flash_cuda_ab_old", [OLD / "binding.cpp", *sorted(OLD.glob("attention_fwd*.cu"))],
                               hashed, cuda_build.NVCC_FLAGS)
    if BUILD_ONLY:
        return
    for D, name, flops, args in forward_problems():
        runs = {"old": lambda: old.fwd(*args, False), "new": lambda: new.fwd(*args, False),
                "old refine_output": lambda: old.fwd(*args, True), "new refine_output": lambda: new.fwd(*args, True)}
        outs = {key: fn()[0].float() for key, fn in runs.items()}
        diff = max((outs[f"new{r}"] - outs[f"old{r}"]).abs().max().item() for r in ("", " refine_output"))
        ms = {key: [] for key in runs}
        for _ in range(3):  # interleaved
            for key, fn in runs.items():
                ms[key].append(timed(fn))
        line = "  ".join(f"{key} {min(v):.3f} ms ({flops / min(v) / 1e9:.1f} TFLOP/s)" for key, v in ms.items())
        print(f"D={D} {name:12s} {line}  max |new - old| {diff:.1e}", flush=True)

if __name__ == "__main__":
    main()
