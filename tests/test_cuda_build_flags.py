"""The JIT builds' extra nvcc flags (CPU): each extension keeps only its own tuning switches of
$HYPTORCH_FLASH_NVCC_EXTRA, and a setting's build name is what the dev/ A/B scripts build, so the tests and an
A/B of one setting share one build."""
from __future__ import annotations

from hyptorch_flash.ops import cuda_backward, cuda_build


def test_each_extension_ignores_the_other_ones_switches(monkeypatch):
    monkeypatch.setenv("HYPTORCH_FLASH_NVCC_EXTRA",
                       "-DHYPTORCH_BWD_PAIR_ROUND=1 -DHYPTORCH_FWD_DESC_LO=1 -lineinfo -DHYPTORCH_BWD_WGMMA=0")
    assert cuda_build.environment_extra_flags(cuda_build.BACKWARD_MACROS) == ["-DHYPTORCH_FWD_DESC_LO=1", "-lineinfo"]
    assert cuda_build.environment_extra_flags(cuda_build.FORWARD_MACROS) == [
        "-DHYPTORCH_BWD_PAIR_ROUND=1", "-lineinfo", "-DHYPTORCH_BWD_WGMMA=0"]
    monkeypatch.setenv("HYPTORCH_FLASH_NVCC_EXTRA", "-DHYPTORCH_BWD_PAIR_ROUND=1")
    assert cuda_build.environment_extra_flags(cuda_build.BACKWARD_MACROS) == []


def test_build_names_tell_settings_apart():
    base = cuda_backward.EXTENSION_NAME
    assert cuda_build.build_name(base, []) == base
    one = cuda_build.build_name(base, ["-DHYPTORCH_BWD_PAIR_ROUND=1"])
    two = cuda_build.build_name(base, ["-DHYPTORCH_BWD_PAIR_ROUND=1", "-DHYPTORCH_BWD_WGMMA=0"])
    assert one.startswith(base + "_") and two.startswith(base + "_") and len({base, one, two}) == 3
    assert one == cuda_build.build_name(base, ["-DHYPTORCH_BWD_PAIR_ROUND=1"])
    assert one.isidentifier()  # (the module name the binding's PYBIND11_MODULE gets)
