"""CPU CI check of the CUDA sources: every ``.cu`` under ``hyptorch_flash/csrc`` compiles for sm_90a
with ``nvcc -Xptxas -v`` and no kernel spills registers or uses a stack frame (a spill turns the
register-resident tiles of a FlashAttention kernel into local-memory traffic). Skipped where nvcc is
absent. Also checks that ``numerics.cuh`` holds the float32 row of ``hyptorch_flash/numerics.py``.
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


def _compile(path: Path, out_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    cmd = [NVCC, *NVCC_ARGS, str(path), "-o", str(out_dir / (path.stem + ".o"))]
    return path, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    out_dir = tmp_path_factory.mktemp("nvcc")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(pool.map(lambda p: _compile(p, out_dir), CU_FILES))


def test_there_are_kernels_to_check():
    assert any(p.name.startswith("attention_fwd") for p in CU_FILES)


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: str(p.relative_to(CSRC)))
def test_compiles_without_spills(path, ptxas_reports):
    result = ptxas_reports[path]
    assert result.returncode == 0, f"nvcc failed on {path.name}:\n{result.stderr[-4000:]}"
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
