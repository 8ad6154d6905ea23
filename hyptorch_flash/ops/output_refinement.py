"""Refinement codes of a bf16/fp16 kernel output: the forward's float32 result y stored as its rounding to
the dtype, hi, plus one int8 code per element, y ≈ hi + code·2^(e − shift) with 2^e the power of two of |hi|
(``csrc/hyperbolic_attention/device_primitives.cuh``: ``refine_code`` writes them, ``refined_value`` reads
them). |y − hi| ≤ ulp(hi)/2, so the code carries 7 more bits: 15 (bf16) or 18 (fp16) significant bits in all.

The fused backward evaluates the epilogue's Jacobian at the refined output, and ``hyperbolic_attention(...,
out_dtype=torch.float32)`` returns it for bf16/fp16 inputs on the ``cuda`` backend.
"""
from __future__ import annotations

import torch

REFINE_SHIFT = {torch.bfloat16: 15, torch.float16: 18}


def _refine_step(hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hi`` (bf16/fp16) → (2^(e − shift) per element as float32, mask of the elements that carry a code:
    hi ≠ 0, finite, and normal as a float32)."""
    h = hi.detach().float()
    e = (h.view(torch.int32) >> 23) & 0xFF
    usable = (e > 0) & (e < 0xFF)
    step = torch.ldexp(torch.ones_like(h), (e - 127 - REFINE_SHIFT[hi.dtype]).to(torch.float32))
    return torch.where(usable, step, torch.zeros_like(step)), usable


def refine_codes(y: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int8 codes of ``y`` (float32) against ``hi`` = y rounded to bf16/fp16: what the forward kernel writes."""
    step, usable = _refine_step(hi)
    code = ((y.float() - hi.float()) / torch.where(usable, step, torch.ones_like(step))).round_().clamp_(-127, 127)
    return torch.where(usable, code, torch.zeros_like(code)).to(torch.int8)


def refined_output(out: torch.Tensor, out_refine: torch.Tensor) -> torch.Tensor:
    """float32 y = out + code·2^(e − shift): the bf16/fp16 output refined to 15/18 significant bits.

    Differentiable in ``out`` (dy/dout = 1: the step only depends on the exponent)."""
    step, _ = _refine_step(out)
    return out.float() + out_refine.float() * step
