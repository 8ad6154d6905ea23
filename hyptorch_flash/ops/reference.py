"""The reference backend: eager math that materialises the full (N × M) score matrix.

Short and obviously correct; the oracle for tests and benchmarks (float64-capable). Autograd
differentiates it end to end. Memory is O(B·H·N·M).
"""
from __future__ import annotations

import torch

from .problem import AttentionProblem


def attention_probabilities(problem: AttentionProblem):
    """Softmax weights ``P`` ``(B, H, N, M)``, log-sum-exp ``(B, H, N)`` and lifted values.

    Fully masked rows get P = 0 and LSE = −inf (no NaN in values or gradients).
    """
    q, k, v, curv, coef = problem.expanded()
    s = problem.variant.score(q, k, curv, coef, **problem.score_kwargs())
    bias = problem.mask.tile_bias(0, q.shape[2], 0, k.shape[2], s.dtype, s.device)
    if bias is not None:
        s = s + bias
    dead = (s == float("-inf")).all(dim=-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(dead.squeeze(-1), float("-inf"))
    return p, lse, v


def reference_attention(problem: AttentionProblem):
    """Output (in the problem's output model and input dtype) and LSE, materialising P."""
    p, lse, v = attention_probabilities(problem)
    return problem.finish(p @ v), lse
