"""Triton kernels for GRPO group-relative advantages (Eq. 3): centre each group, divide by a std.

``scale="group"`` / ``"none"``: one launch reads the ``N`` rewards (passes over each group for the mean,
the variance when needed and the output, the later ones from cache) and writes ``N`` fp32 advantages.
``scale="batch"`` first writes per-block partial moments (shifted mean and M2 of each block of 4096 rewards)
and the normalising launch combines them in a fixed order (Chan et al.), so the global std needs no host
sync, no atomics and is deterministic.

Every mean is taken relative to a shift (the first reward of the group, or of the batch): a constant
group then has a mean equal to its members bit for bit, so its advantages are exactly 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zr_kernels._backend import launch_guard, note
from zr_kernels.kernels._grid import cdiv, next_power_of_2, row_tile

SCALES = ("group", "batch", "none")
_TILE = 4096


@triton.jit
def _batch_moments_kernel(
    rewards_ptr, part_mean_ptr, part_m2_ptr, n, stride, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    shift = tl.load(rewards_ptr).to(tl.float32)
    x = tl.load(rewards_ptr + offs * stride, mask=ok, other=0.0).to(tl.float32) - shift
    count = tl.minimum(n - pid.to(tl.int64) * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(tl.where(ok, x, 0.0), axis=0) / count
    centered = tl.where(ok, x - mean, 0.0)
    tl.store(part_mean_ptr + pid, mean)
    tl.store(part_m2_ptr + pid, tl.sum(centered * centered, axis=0))


@triton.jit
def _batch_std(rewards_ptr, part_mean_ptr, part_m2_ptr, n, n_parts, eps, unbiased,
               PART_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """``std + eps`` over all ``n`` rewards from the block partials (same order in every program)."""
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        ok = parts < n_parts
        counts = tl.minimum(n - parts.to(tl.int64) * PART_BLOCK, PART_BLOCK).to(tl.float32)
        total += tl.where(ok, counts * tl.load(part_mean_ptr + parts, mask=ok, other=0.0), 0.0)
    mean = tl.sum(total, axis=0) / n
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        ok = parts < n_parts
        counts = tl.minimum(n - parts.to(tl.int64) * PART_BLOCK, PART_BLOCK).to(tl.float32)
        delta = tl.load(part_mean_ptr + parts, mask=ok, other=0.0) - mean
        m2 += tl.where(ok, tl.load(part_m2_ptr + parts, mask=ok, other=0.0) + counts * delta * delta, 0.0)
    dof = tl.maximum(n - unbiased, 1).to(tl.float32)
    return tl.sqrt(tl.sum(m2, axis=0) / dof) + eps


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, part_mean_ptr, part_m2_ptr, out_ptr,
    n, n_groups, group_size, stride, n_parts, eps, unbiased,
    GROUP_STD: tl.constexpr, BATCH_STD: tl.constexpr, PART_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    groups = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    group_ok = groups < n_groups
    first = groups.to(tl.int64) * group_size
    shift = tl.load(rewards_ptr + first * stride, mask=group_ok, other=0.0).to(tl.float32)

    total = tl.zeros([BLOCK_GROUPS, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, group_size, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        ok = group_ok[:, None] & (cols < group_size)[None, :]
        x = tl.load(rewards_ptr + (first[:, None] + cols[None, :]) * stride, mask=ok, other=0.0).to(tl.float32)
        total += tl.where(ok, x - shift[:, None], 0.0)
    mean = shift + tl.sum(total, axis=1) / group_size

    if GROUP_STD:
        # Two-pass variance around the exact group mean: never E[x^2] - E[x]^2.
        m2 = tl.zeros([BLOCK_GROUPS, BLOCK_COLS], dtype=tl.float32)
        for start in range(0, group_size, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            ok = group_ok[:, None] & (cols < group_size)[None, :]
            x = tl.load(rewards_ptr + (first[:, None] + cols[None, :]) * stride, mask=ok, other=0.0)
            centered = tl.where(ok, x.to(tl.float32) - mean[:, None], 0.0)
            m2 += centered * centered
        dof = tl.maximum(group_size - unbiased, 1).to(tl.float32)
        denom = tl.sqrt(tl.sum(m2, axis=1) / dof) + eps
    elif BATCH_STD:
        denom = tl.zeros([BLOCK_GROUPS], dtype=tl.float32) + _batch_std(
            rewards_ptr, part_mean_ptr, part_m2_ptr, n, n_parts, eps, unbiased, PART_BLOCK, BLOCK_P)
    else:
        denom = tl.full([BLOCK_GROUPS], 1.0, dtype=tl.float32)

    for start in range(0, group_size, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        ok = group_ok[:, None] & (cols < group_size)[None, :]
        offs = first[:, None] + cols[None, :]
        x = tl.load(rewards_ptr + offs * stride, mask=ok, other=0.0).to(tl.float32)
        centered = x - mean[:, None]
        # std + eps == 0 only for a constant group (or batch) with eps == 0, whose centred values are exactly 0.
        adv = tl.where(denom[:, None] > 0, centered / denom[:, None], 0.0)
        tl.store(out_ptr + offs, adv, mask=ok)


def group_advantages_fwd(rewards: torch.Tensor, group_size: int, scale: str, unbiased: bool,
                         eps: float) -> torch.Tensor:
    """Launch on ``rewards [N]`` (any stride); returns contiguous fp32 advantages ``[N]``."""
    n = rewards.shape[0]
    out = torch.empty(n, device=rewards.device, dtype=torch.float32)
    if n == 0:
        return out
    n_groups = n // group_size
    part_block = _TILE
    n_parts = cdiv(n, part_block)
    part_mean = part_m2 = out  # placeholders; only read when scale == "batch"
    block_groups, block_cols = row_tile(group_size, max_width=1024, elements=_TILE)
    with launch_guard(rewards.device):
        if scale == "batch":
            part_mean, part_m2 = (torch.empty(n_parts, device=rewards.device, dtype=torch.float32) for _ in range(2))
            _batch_moments_kernel[(n_parts,)](rewards, part_mean, part_m2, n, rewards.stride(0), BLOCK=part_block)
        _group_advantages_kernel[(cdiv(n_groups, block_groups),)](
            rewards, part_mean, part_m2, out,
            n, n_groups, group_size, rewards.stride(0), n_parts, eps, int(unbiased),
            GROUP_STD=scale == "group", BATCH_STD=scale == "batch",
            PART_BLOCK=part_block, BLOCK_P=min(next_power_of_2(n_parts), 1024),
            BLOCK_GROUPS=block_groups, BLOCK_COLS=block_cols,
        )
    note("group_advantages", "triton")
    return out
