"""Installs ``zr_kernels`` and ``zreward``."""
from setuptools import find_packages, setup

setup(
    name="zreward",
    version="0.1.0",
    description="Fused GPU kernels and training layer for Z-Reward score-distribution reward models",
    packages=find_packages(include=["zr_kernels", "zr_kernels.*", "zreward", "zreward.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton>=3.3",
        "numpy",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "scipy"],
    },
)
