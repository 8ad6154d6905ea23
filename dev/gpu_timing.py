"""Shared timing helper of the dev/ A/B scripts: CUDA-event timing, median of `reps` groups of `inner` calls."""
import statistics

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
