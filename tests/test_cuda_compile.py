"""CPU CI check of the CUDA sources: every ``.cu`` under ``hyptorch_flash/csrc`` compiles for sm_90a
with ``nvcc -Xptxas -v`` (the bf16/fp16 forward kernels also without their wgmma path, the backward also with
its switchable paths off and with its opt-in path, the forward also with its opt-in path), no kernel
spills registers or uses a stack frame (a spill turns the register-resident tiles of a FlashAttention
kernel into local-memory traffic) and ptxas keeps the wgmma asynchronous. Skipped where nvcc is absent. Also checks that ``numerics.cuh`` holds the float32 row of ``hyptorch_flash/numerics.py``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hyptorch_flash import numerics

CSRC = Path(__file__).resolve().parent.parent / "hyptorch_flash" / "csrc"
NVCC = shutil.which("nvcc")
NVCC_ARGS = ["-c", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-std=c++17", "-O3",
             "--expt-relaxed-constexpr"]
CU_FILES = sorted(CSRC.rglob("*.cu"))

_ENTRY = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads")


# The bf16/fp16 forward kernels use wgmma on sm_90a; their mma.sync version (every other GPU) is checked too,
# built for the same target with the wgmma path switched off.
MMA_SYNC_FLAG = "-DHYPTORCH_FWD_WGMMA=0"
MMA_SYNC_FILES = [p for p in CU_FILES if re.match(r"attention_fwd_(bf16|fp16)_", p.name)]
# The backward's switchable paths (bwd_kernel.cuh: wgmma in the key-parallel kernel, 32-query tiles at D = 128,
# 64-query tiles for the arccosh scores at D = 64; on by default) are kept compiling and spill-free when switched
# off too (the A/B baseline; the default mma.sync kernel of other GPUs is the mma_sync_bwd case).
BWD_OPT_OUT_FLAGS = ("-DHYPTORCH_BWD_WGMMA=0", "-DHYPTORCH_BWD_D128_DOT_BLOCK_M=16",
                     "-DHYPTORCH_BWD_D64_ARCCOSH_BLOCK_M=32")
BWD_MMA_SYNC_FLAGS = ("-DHYPTORCH_BWD_WGMMA=0",)
BWD_FILES = [p for p in CU_FILES if re.match(r"bwd_hd\d+_", p.name)]
# The backward's opt-in paths (bwd_kernel.cuh: HYPTORCH_BWD_SPLIT_STEP, HYPTORCH_BWD_D128_PREFETCH,
# HYPTORCH_BWD_FULL_TILE_LOADS, HYPTORCH_BWD_OVERWRITE_FIRST, HYPTORCH_BWD_D128_DQ_WGMMA, HYPTORCH_BWD_ACOSH_RSQRT,
# HYPTORCH_BWD_PAIR_ROUND, HYPTORCH_BWD_TMA_LOADS), not the default.
BWD_OPT_IN_FLAGS = ("-DHYPTORCH_BWD_SPLIT_STEP=1", "-DHYPTORCH_BWD_D128_PREFETCH=1", "-DHYPTORCH_BWD_FULL_TILE_LOADS=1",
                    "-DHYPTORCH_BWD_OVERWRITE_FIRST=1", "-DHYPTORCH_BWD_D128_DQ_WGMMA=1", "-DHYPTORCH_BWD_ACOSH_RSQRT=1",
                    "-DHYPTORCH_BWD_PAIR_ROUND=1", "-DHYPTORCH_BWD_TMA_LOADS=1")
# and the forward's (attention_fwd_kernel.cuh), on its wgmma files
FWD_OPT_IN_FLAGS = ("-DHYPTORCH_FWD_DESC_LO=1", "-DHYPTORCH_FWD_HILO_ONE_GROUP=1")
VARIANTS = {(MMA_SYNC_FLAG,): "mma_sync", BWD_OPT_OUT_FLAGS: "bwd_opt_out", BWD_MMA_SYNC_FLAGS: "mma_sync_bwd",
            BWD_OPT_IN_FLAGS: "bwd_opt_in", FWD_OPT_IN_FLAGS: "fwd_opt_in"}
CASES = ([(p, ()) for p in CU_FILES] + [(p, (MMA_SYNC_FLAG,)) for p in MMA_SYNC_FILES] +
         [(p, BWD_OPT_OUT_FLAGS) for p in BWD_FILES] + [(p, BWD_MMA_SYNC_FLAGS) for p in BWD_FILES] +
         [(p, BWD_OPT_IN_FLAGS) for p in BWD_FILES] +
         [(p, FWD_OPT_IN_FLAGS) for p in MMA_SYNC_FILES])


def _case_id(case) -> str:
    path, flags = case
    return str(path.relative_to(CSRC)) + (f"[{VARIANTS[flags]}]" if flags else "")


def _compile(case, out_dir: Path) -> tuple[str, subprocess.CompletedProcess]:
    path, flags = case
    obj = out_dir / (path.stem + (f"_{VARIANTS[flags]}" if flags else "") + ".o")
    cmd = [NVCC, *NVCC_ARGS, *flags, str(path), "-o", str(obj)]
    return _case_id(case), subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    out_dir = tmp_path_factory.mktemp("nvcc")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(pool.map(lambda c: _compile(c, out_dir), CASES))


def test_there_are_kernels_to_check():
    assert any(p.name.startswith("attention_fwd") for p in CU_FILES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_compiles_without_spills(case, ptxas_reports):
    result = ptxas_reports[_case_id(case)]
    assert result.returncode == 0, f"nvcc failed on {_case_id(case)}:\n{result.stderr[-4000:]}"
    # ptxas falls back to waiting for each wgmma when registers of one in flight are touched (C7514/C7515)
    assert "instructions are serialized" not in result.stderr, result.stderr[-4000:]
    entries = _ENTRY.findall(result.stderr)
    bad = [(name, stack, st, ld) for name, stack, st, ld in entries if int(stack) or int(st) or int(ld)]
    assert not bad, "stack frame / register spills (bytes: stack, spill stores, spill loads): " + "; ".join(
        f"{name}: {stack}, {st}, {ld}" for name, stack, st, ld in bad
    )


def test_numerics_header_matches_python():
    text = (CSRC / "hyperbolic_attention" / "numerics.cuh").read_text()
    values = {name: float(value) for name, value in re.findall(r"constexpr float (\w+)_F32 = ([0-9.eE+-]+)f;", text)}
    expected = {
        "BALL_MARGIN": numerics.ball_margin(torch.float32),
        "ACOSH_MARGIN": numerics.acosh_margin(torch.float32),
        "MIN_SQ_NORM": numerics.min_sq_norm(torch.float32),
        "MANIFOLD_TOL": numerics.manifold_tol(torch.float32),
    }
    assert values == expected
