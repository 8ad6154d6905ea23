"""The refinement codes of a bf16/fp16 kernel output (``hyptorch_flash.ops.output_refinement``) on the CPU:
round trip against float32 values, and the decoder's constants against the kernel header."""
from __future__ import annotations

import re

import pytest
import torch

from hyptorch_flash.ops import cuda_build
from hyptorch_flash.ops import output_refinement as refinement


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_refine_codes_round_trip(dtype):
    """y (float32) → hi = y rounded to the dtype + int8 code → hi + code·2^(e − shift): within one step of y
    (2^-15 (bf16) / 2^-18 (fp16) of |hi|'s power of two; half a step but where the residue is within half a
    step of the ±128 a code cannot hold) over a wide range of magnitudes, signs and zeros; fp16 subnormals
    are only never worse than the rounded value."""
    gen = torch.Generator().manual_seed(4)
    lo_exp = -12 if dtype == torch.float16 else -60
    y = torch.randn(20000, generator=gen) * torch.exp2(torch.randint(lo_exp, 14, (20000,), generator=gen).float())
    y[:10] = 0.0
    hi = y.to(dtype)
    code = refinement.refine_codes(y, hi)
    assert code.dtype == torch.int8 and (code[:10] == 0).all()
    got = refinement.refined_output(hi, code)
    pow2 = torch.exp2(torch.floor(torch.log2(hi.float().abs().clamp_min(1e-38))))
    err = (got.double() - y.double()).abs()
    step = pow2.double() * 2.0 ** -refinement.REFINE_SHIFT[dtype]
    normal = hi.float().abs() >= torch.finfo(dtype).tiny  # fp16 subnormals have a coarser ulp: codes clamp there
    assert (err <= step * (1 + 1e-6))[normal].all()
    assert (err <= step / 2 * (1 + 1e-6))[normal].float().mean() > 0.99
    assert (err <= (hi.double() - y.double()).abs()).all()  # never worse than the rounded value


def test_refine_shift_matches_header():
    """The decoder's shifts are the forward kernel's (device_primitives.cuh, kRefineShift)."""
    text = (cuda_build.CSRC / "device_primitives.cuh").read_text()
    assert re.search(r"constexpr int kRefineShift = (\d+);", text).group(1) == str(refinement.REFINE_SHIFT[torch.bfloat16])
    assert re.search(r"constexpr int kRefineShift<__half> = (\d+);", text).group(1) == str(refinement.REFINE_SHIFT[torch.float16])
