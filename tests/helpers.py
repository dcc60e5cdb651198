"""Shared test tools: the device, dtypes, the three-way closeness rule and strided inputs."""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Absolute slack per input dtype for the three-way rule (values are fp32 statistics of O(1) size).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-10}


def assert_three_way(name: str, kernel: torch.Tensor, torch_dtype: torch.Tensor, ref_fp32: torch.Tensor,
                     atol: float) -> None:
    """``|kernel − ref_fp32| ≤ 2·|torch_dtype − ref_fp32| + atol`` elementwise.

    ``torch_dtype`` is the PyTorch reference run in the input dtype, ``ref_fp32`` the same run on fp32 (or fp64)
    copies of the inputs: the kernel may be as wrong as eager PyTorch in that dtype, twice over, and no more.
    Non-finite entries must match exactly (same position, same value). An output stored in bf16/fp16 may
    also differ by one rounding step of that dtype (eager and kernel can round a near-tie differently).
    """
    rounding = torch.finfo(kernel.dtype).eps if kernel.dtype in (torch.bfloat16, torch.float16) else 0.0
    assert kernel.shape == ref_fp32.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(ref_fp32.shape)}"
    k, t, r = (x.detach().double().cpu() for x in (kernel, torch_dtype, ref_fp32))
    finite = torch.isfinite(r)
    assert torch.equal(torch.isfinite(k), finite), f"{name}: non-finite entries differ from the reference"
    assert torch.equal(k[~finite].nan_to_num(), r[~finite].nan_to_num()), f"{name}: inf/nan values differ"
    err = (k - r).abs()[finite]
    bound = (2 * (t - r).abs() + atol + rounding * r.abs())[finite]
    worst = (err - bound).argmax() if err.numel() else None
    assert err.numel() == 0 or bool((err <= bound).all()), (
        f"{name}: |kernel - ref| = {err[worst].item():.3g} > bound {bound[worst].item():.3g} "
        f"(max error {err.max().item():.3g})"
    )


def strided_rows(rows: int, cols: int, dtype: torch.dtype, *, seq: int = 3, scale: float = 3.0) -> torch.Tensor:
    """A ``[rows, cols]`` non-contiguous view, the shape of ``logits[:, -1, :]`` from ``[rows, seq, cols]``."""
    full = torch.randn(rows, seq, cols, device=DEVICE, dtype=torch.float32) * scale
    return full.to(dtype)[:, -1, :]
