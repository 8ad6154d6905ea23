"""Every eps survives rounding in its own dtype (geoopt's fixed 1e-5 does not in 16-bit types)."""
import pytest
import torch

from hyptorch_flash import numerics

DTYPES = numerics.FLOAT_DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
def test_margins_survive_rounding(dtype):
    one = torch.tensor(1.0, dtype=dtype)
    assert torch.tensor(1.0 - numerics.ball_margin(dtype), dtype=dtype) < one
    assert torch.tensor(1.0 + numerics.acosh_margin(dtype), dtype=dtype) > one
    assert torch.tensor(numerics.min_sq_norm(dtype), dtype=dtype) > 0
    assert torch.tensor(numerics.manifold_tol(dtype), dtype=dtype) > torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_geoopt_boundary_margin_rounds_away_but_ours_does_not(dtype):
    geoopt_margin = 1e-5
    assert torch.tensor(1.0 - geoopt_margin, dtype=dtype) == 1.0
    assert torch.tensor(1.0 - numerics.ball_margin(dtype), dtype=dtype) < 1.0


def test_compute_dtype_is_float32_or_better():
    assert numerics.compute_dtype(torch.bfloat16) == torch.float32
    assert numerics.compute_dtype(torch.float16) == torch.float32
    assert numerics.compute_dtype(torch.float32) == torch.float32
    assert numerics.compute_dtype(torch.float64) == torch.float64


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="no ball margin for dtype torch.int32"):
        numerics.ball_margin(torch.int32)
