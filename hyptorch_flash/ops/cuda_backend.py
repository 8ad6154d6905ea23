"""The ``cuda`` backend: fused FlashAttention-style kernels (``hyptorch_flash/csrc``).

Placeholder until the fused kernels land: it reports itself unavailable, so ``auto`` passes over
it (saying why) and an explicit ``backend="cuda"`` raises a clear error.
"""
from __future__ import annotations

from typing import Optional

from .problem import AttentionProblem


def unsupported(problem: AttentionProblem) -> Optional[str]:
    if not problem.q.is_cuda:
        return "inputs are not on a CUDA device"
    return "the fused CUDA kernels are not built into this version of hyptorch_flash yet"


def run(problem: AttentionProblem):
    raise NotImplementedError("hyptorch_flash: the fused CUDA attention kernels are not implemented yet")
