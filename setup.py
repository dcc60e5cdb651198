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
        "scipy",
        "pillow",
        "safetensors>=0.4",
        "transformers>=5.0",
        "diffusers>=0.36",
        "peft>=0.15",
        "liger-kernel>=0.6",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "trl>=0.20"],
    },
    entry_points={"console_scripts": ["zreward=zreward.cli:main", "zr-bench=benchmarks.__main__:main"]},
)
