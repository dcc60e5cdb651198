"""PyTorch twin of ``zr_kernels.group_advantages`` (same signature, no fusion)."""
from __future__ import annotations

import torch


def _shifted_mean(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean taken relative to the first element, so a constant set has a mean equal to its members exactly."""
    if dim is None:
        return x[0] + (x - x[0]).mean()
    shift = x.narrow(dim, 0, 1)
    return shift + (x - shift).mean(dim, keepdim=True)


def _std(x: torch.Tensor, mean: torch.Tensor, unbiased: bool, dim: int | None = None) -> torch.Tensor:
    """Two-pass std; one element (or ``unbiased`` with one element) gives 0, not NaN."""
    count = x.numel() if dim is None else x.shape[dim]
    m2 = ((x - mean) ** 2).sum() if dim is None else ((x - mean) ** 2).sum(dim, keepdim=True)
    return (m2 / max(count - int(unbiased), 1)).sqrt()


def group_advantages(rewards, group_size, scale="group", unbiased=True, eps=1e-6) -> torch.Tensor:
    """``(r - mean_g) / (std + eps)`` per contiguous group of ``group_size`` rewards, fp32, no gradient."""
    r = rewards.detach().float().reshape(-1, group_size)
    centered = r - _shifted_mean(r, dim=1)
    if scale == "none":
        return centered.reshape(-1)
    if scale == "group":
        std = _std(r, _shifted_mean(r, dim=1), unbiased, dim=1)
    else:
        flat = r.reshape(-1)
        std = _std(flat, _shifted_mean(flat), unbiased) if flat.numel() else flat.new_zeros(())
    denom = std + eps
    return torch.where(denom > 0, centered / denom, 0.0).reshape(-1)
