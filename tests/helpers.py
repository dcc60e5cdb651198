"""Shared test tools: the device, dtypes, the three-way closeness rule and strided inputs."""
from __future__ import annotations

import torch

from zr_kernels.check import ATOL, three_way  # noqa: F401 - ATOL: the tests' slack per input dtype

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def assert_three_way(name: str, kernel: torch.Tensor, torch_dtype: torch.Tensor, ref_fp32: torch.Tensor,
                     atol: float) -> None:
    """``|kernel − ref_fp32| ≤ 2·|torch_dtype − ref_fp32| + atol`` elementwise (``zr_kernels.check.three_way``).

    ``torch_dtype`` is the PyTorch reference run in the input dtype, ``ref_fp32`` the same run on fp32 (or fp64)
    copies of the inputs: the kernel may be as wrong as eager PyTorch in that dtype, twice over, and no more.
    Non-finite entries must match exactly (same position, same value). An output stored in bf16/fp16 may
    also differ by one rounding step of that dtype (eager and kernel can round a near-tie differently).
    """
    result = three_way(kernel, torch_dtype, ref_fp32, atol)
    assert result.ok, f"{name}: {result.problem or ''} |kernel - ref| = {result.error:.3g} > bound " \
                      f"{result.bound:.3g} (max error {result.max_error:.3g})"


def strided_rows(rows: int, cols: int, dtype: torch.dtype, *, seq: int = 3, scale: float = 3.0) -> torch.Tensor:
    """A ``[rows, cols]`` non-contiguous view, the shape of ``logits[:, -1, :]`` from ``[rows, seq, cols]``."""
    full = torch.randn(rows, seq, cols, device=DEVICE, dtype=torch.float32) * scale
    return full.to(dtype)[:, -1, :]
