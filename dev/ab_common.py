"""Shared parts of the dev/ A/B scripts: CUDA-event timing, the benchmark problems, the command line."""
import statistics
import sys

import torch


def timed(fn, reps=7, inner=10):
    """Median milliseconds per call of ``fn`` over ``reps`` groups of ``inner`` back-to-back calls."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def forward_problems(B=2, H=16, N=4096, device="cuda"):
    """(D, score name, FLOPs, positional arguments of the extension's ``fwd`` without ``refine_output``) for
    bf16 inputs (randn·0.3, seed 0), D ∈ {64, 128}, scores lorentz_dot, euclidean, distance."""
    gen = torch.Generator(device=device).manual_seed(0)
    for D in (64, 128):
        q, k, v = (torch.randn(B, H, N, D, device=device, generator=gen).mul_(0.3).bfloat16() for _ in range(3))
        curv, coef = torch.ones(H, device=device), torch.full((H,), D**-0.5, device=device)
        for name, score, output in (("lorentz_dot", 1, 1), ("euclidean", 0, 0), ("distance", 2, 1)):
            score_coef = coef if score != 2 else torch.ones(H, device=device)
            yield D, name, 4 * B * H * N * N * D, (q, k, v, curv, score_coef, None, score, output, False, False, 1e-6)


def build_settings(argv=None):
    """``[--build-only] SETTING...`` → (settings, build_only); no settings means the default build ("")."""
    args = sys.argv[1:] if argv is None else argv
    build_only = bool(args) and args[0] == "--build-only"
    return (args[1:] if build_only else args or [""]), build_only
