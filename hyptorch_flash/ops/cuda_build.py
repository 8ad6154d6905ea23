"""Build of the CUDA extension ``hyptorch_flash_cuda``: JIT on first CUDA use, or ahead of time.

JIT: :func:`load` compiles ``csrc/hyperbolic_attention/binding.cpp`` and the ``attention_fwd*.cu``
files with ``torch.utils.cpp_extension.load`` (ninja, parallel over files) for the architecture of
the current GPU only, into a cache folder keyed by a hash of the sources, the torch/CUDA versions and
the architecture (``$HYPTORCH_FLASH_CACHE`` or ``~/.cache/hyptorch_flash``). A file lock serialises
concurrent builds (several processes on one machine); later imports load the cached ``.so``.
A failed build is remembered for the process, and :func:`build_error` returns its message so the
``cuda`` backend can report it and ``auto`` can fall back.

Ahead of time: ``HYPTORCH_FLASH_BUILD_CUDA=1 pip install -e .`` builds the same sources as the
extension module ``hyptorch_flash._cuda`` (see setup.py, :func:`extension_sources`);
:func:`load` imports it when present and never rebuilds.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
from pathlib import Path
from typing import Optional

EXTENSION_NAME = "hyptorch_flash_cuda"
CSRC = Path(__file__).resolve().parent.parent / "csrc" / "hyperbolic_attention"
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]

_module = None
_error: Optional[str] = None


def extension_sources() -> list[Path]:
    """The binding and every forward kernel file, sorted (one ninja job per file)."""
    return [CSRC / "binding.cpp", *sorted(CSRC.glob("attention_fwd*.cu"))]


# Macro prefixes of each extension's tuning switches (attention_fwd_kernel.cuh, bwd_kernel.cuh)
FORWARD_MACROS, BACKWARD_MACROS = "-DHYPTORCH_FWD_", "-DHYPTORCH_BWD_"


def extra_nvcc_flags(flags: str, other_macros: str) -> list[str]:
    """The extra nvcc flags ``flags`` (a space-separated string) that concern an extension: without the other
    extension's switches (``other_macros``, a prefix), which its code never reads, so that they neither change
    its cache key nor rebuild it."""
    return [f for f in flags.split() if not f.startswith(other_macros)]


def build_name(base: str, extra: list[str]) -> str:
    """``base``, or with extra nvcc flags ``base`` and a hash of them: one module name per setting, so that
    builds of several settings load into one process (the A/B scripts in dev/)."""
    return f"{base}_{hashlib.sha1(' '.join(extra).encode()).hexdigest()[:10]}" if extra else base


def environment_extra_flags(other_macros: str) -> list[str]:
    """$HYPTORCH_FLASH_NVCC_EXTRA (extra nvcc flags for tuning experiments, e.g. -DHYPTORCH_FWD_BLOCK_N_D64=32)
    for one extension (extra_nvcc_flags); part of the build's name and cache key, so each setting gets its own
    build."""
    return extra_nvcc_flags(os.environ.get("HYPTORCH_FLASH_NVCC_EXTRA", ""), other_macros)


def _fingerprint(hashed_files: list[Path], arch: str, nvcc_flags: list[str]) -> str:
    import torch

    digest = hashlib.sha256()
    for path in hashed_files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{arch}|{nvcc_flags}".encode())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    return Path(os.environ.get("HYPTORCH_FLASH_CACHE", Path.home() / ".cache" / "hyptorch_flash"))


def _arch_of_current_device() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    # Hopper: the "a" target, whose instructions (wgmma) the forward kernel uses (attention_fwd_kernel.cuh)
    return "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def jit_build(name: str, sources: list[Path], hashed_files: list[Path], nvcc_flags: list[str]):
    """Build (or load from the cache) extension ``name`` for the current GPU's architecture.

    The cache folder is keyed by a hash of ``hashed_files``, the torch/CUDA versions, the architecture
    and ``nvcc_flags``; a file lock in it serialises concurrent builds.
    """
    from torch.utils import cpp_extension

    arch = _arch_of_current_device()
    build_dir = _cache_root() / f"{name}_{_fingerprint(hashed_files, arch, nvcc_flags)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # Only the GPU in use: a cold build stays around a minute.
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    with open(build_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return cpp_extension.load(
                name=name,
                sources=[str(p) for p in sources],
                extra_cflags=CXX_FLAGS,
                extra_cuda_cflags=nvcc_flags,
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                verbose=os.environ.get("HYPTORCH_FLASH_VERBOSE_BUILD") == "1",
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_extension(extra: list[str]):
    """The forward extension built with extra nvcc flags ``extra`` (JIT, ninja, cached under a file lock)."""
    hashed = [p for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".cu", ".cuh", ".h")]
    return jit_build(build_name(EXTENSION_NAME, extra), extension_sources(), hashed, NVCC_FLAGS + extra)


def _jit_build():
    return build_extension(environment_extra_flags(BACKWARD_MACROS))


def load():
    """The compiled extension module (built on first call); raises ``RuntimeError`` if it cannot be built."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise RuntimeError(_error)
    try:
        try:
            _module = importlib.import_module("hyptorch_flash._cuda")  # ahead-of-time build
        except ImportError:
            _module = _jit_build()
    except Exception as exc:  # noqa: BLE001 - any build failure becomes the backend's reason
        _error = f"the CUDA extension {EXTENSION_NAME} failed to build: {exc}"
        raise RuntimeError(_error) from exc
    return _module


def build_error() -> Optional[str]:
    """``None`` if the extension loads (building it if needed), else the first line of the build error."""
    try:
        load()
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else "the CUDA extension failed to build"
    return None
