"""Triton kernels for the GDSO pairwise score-gap loss and rewards (Eq. 7, 10, 11, 13).

Per pair ``p`` every ``|d_ik|`` with ``d_ik = (mu_w[p, i] - mu_l[p, k]) - gap[p]`` lives only in registers:
a ``[pairs, G, k-chunk]`` tile, summed over ``k`` (row sums: the winner rewards) and over ``i`` (column
sums: the loser rewards, since the ``j = l`` term of Eq. 10 / 11 is ``|mu_l_k - mu_w_i + gap| = |d_ik|``).
Eq. 11's two ``j`` terms are therefore equal and the loss is ``sum_ik |d_ik| / (G² R)``.

Forward reads ``2·P·G + P`` inputs and writes ``4·(P + 2·P·G)`` bytes; backward recomputes the signs from
the same inputs and writes the two ``[P, G]`` gradients. ``gdso_rewards`` is the forward with the ``GDSO``
flag: the gap comes from the annotated scores, Eq. 7 is added by Eq. 13, no loss is written.
Everything is computed and stored in fp32 (fp64 when an input is fp64, so ``gradcheck`` is meaningful):
the kernels take the compute type from an output buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zr_kernels._backend import launch_guard, note
from zr_kernels._types import stats_dtype
from zr_kernels.kernels._grid import cdiv, next_power_of_2

MAX_GROUP_SIZE = 4096
_TILE = 4096


def _pair_tile(group_size: int) -> tuple[int, int, int]:
    """(pairs, G, k-chunk) tile sizes: the whole group along ``i``, ``k`` in chunks, about 4096 elements."""
    block_g = next_power_of_2(group_size)
    block_k = max(1, min(block_g, _TILE // block_g))
    return max(1, min(64, _TILE // (block_g * block_k))), block_g, block_k


@triton.jit
def _pairwise_gap_fwd_kernel(
    mu_w_ptr, mu_l_ptr, gap_ptr, s_w_ptr, s_l_ptr, loss_ptr, reward_w_ptr, reward_l_ptr,
    n_pairs, group_size, stride_wp, stride_wg, stride_lp, stride_lg, stride_gap, stride_sw, stride_sl,
    inv_range, lambda_pt, lambda_pw,
    GDSO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_type = reward_w_ptr.dtype.element_ty
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_G)
    pair_ok = pairs < n_pairs
    pairs64 = pairs.to(tl.int64)
    w_ok = pair_ok[:, None] & (cols < group_size)[None, :]
    mu_w = tl.load(mu_w_ptr + pairs64[:, None] * stride_wp + cols.to(tl.int64)[None, :] * stride_wg, mask=w_ok, other=0.0)
    mu_w = mu_w.to(acc_type)
    if GDSO:
        s_w = tl.load(s_w_ptr + pairs64 * stride_sw, mask=pair_ok, other=0.0).to(acc_type)
        s_l = tl.load(s_l_ptr + pairs64 * stride_sl, mask=pair_ok, other=0.0).to(acc_type)
        gap = s_w - s_l
    else:
        gap = tl.load(gap_ptr + pairs64 * stride_gap, mask=pair_ok, other=0.0).to(acc_type)
    scale = inv_range / group_size

    row_sums = tl.zeros([BLOCK_P, BLOCK_G], dtype=acc_type)
    for start in range(0, group_size, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        l_ok = pair_ok[:, None] & (ks < group_size)[None, :]
        l_offsets = pairs64[:, None] * stride_lp + ks.to(tl.int64)[None, :] * stride_lg
        mu_l = tl.load(mu_l_ptr + l_offsets, mask=l_ok, other=0.0).to(acc_type)
        d = (mu_w[:, :, None] - mu_l[:, None, :]) - gap[:, None, None]
        a = tl.where(w_ok[:, :, None] & l_ok[:, None, :], tl.abs(d), 0.0)
        row_sums += tl.sum(a, axis=2)
        reward_l = 1.0 - tl.sum(a, axis=1) * scale
        if GDSO:
            reward_l = lambda_pt * (1.0 - tl.abs(mu_l - s_l[:, None]) * inv_range) + lambda_pw * reward_l
        tl.store(reward_l_ptr + pairs64[:, None] * group_size + ks[None, :], reward_l, mask=l_ok)

    reward_w = 1.0 - row_sums * scale
    if GDSO:
        reward_w = lambda_pt * (1.0 - tl.abs(mu_w - s_w[:, None]) * inv_range) + lambda_pw * reward_w
    else:
        tl.store(loss_ptr + pairs, tl.sum(row_sums, axis=1) * (scale / group_size), mask=pair_ok)
    tl.store(reward_w_ptr + pairs64[:, None] * group_size + cols[None, :], reward_w, mask=w_ok)


@triton.jit
def _pairwise_gap_bwd_kernel(
    grad_loss_ptr, mu_w_ptr, mu_l_ptr, gap_ptr, grad_w_ptr, grad_l_ptr,
    n_pairs, group_size, stride_wp, stride_wg, stride_lp, stride_lg, stride_gap, stride_grad, inv_range,
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_type = grad_loss_ptr.dtype.element_ty
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_G)
    pair_ok = pairs < n_pairs
    pairs64 = pairs.to(tl.int64)
    w_ok = pair_ok[:, None] & (cols < group_size)[None, :]
    mu_w = tl.load(mu_w_ptr + pairs64[:, None] * stride_wp + cols.to(tl.int64)[None, :] * stride_wg, mask=w_ok, other=0.0)
    mu_w = mu_w.to(acc_type)
    gap = tl.load(gap_ptr + pairs64 * stride_gap, mask=pair_ok, other=0.0).to(acc_type)
    # d loss_p / d d_ik = grad_loss_p * sign(d_ik) / (G² R), with sign(0) = 0 (torch.abs's subgradient).
    g = tl.load(grad_loss_ptr + pairs64 * stride_grad, mask=pair_ok, other=0.0)
    g = g * (inv_range / (group_size * group_size))

    row_sums = tl.zeros([BLOCK_P, BLOCK_G], dtype=acc_type)
    for start in range(0, group_size, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        l_ok = pair_ok[:, None] & (ks < group_size)[None, :]
        mu_l = tl.load(mu_l_ptr + pairs64[:, None] * stride_lp + ks.to(tl.int64)[None, :] * stride_lg, mask=l_ok, other=0.0)
        d = (mu_w[:, :, None] - mu_l.to(acc_type)[:, None, :]) - gap[:, None, None]
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        sign = tl.where(w_ok[:, :, None] & l_ok[:, None, :], sign, 0.0)
        row_sums += tl.sum(sign, axis=2)
        grad_l = -g[:, None] * tl.sum(sign, axis=1)
        tl.store(grad_l_ptr + pairs64[:, None] * group_size + ks[None, :],
                 grad_l.to(grad_l_ptr.dtype.element_ty), mask=l_ok)
    grad_w = g[:, None] * row_sums
    tl.store(grad_w_ptr + pairs64[:, None] * group_size + cols[None, :], grad_w.to(grad_w_ptr.dtype.element_ty),
             mask=w_ok)


def _launch_fwd(mu_w, mu_l, gap, s_w, s_l, inv_range, lambda_pt, lambda_pw, gdso: bool):
    n_pairs, group_size = mu_w.shape
    out = dict(device=mu_w.device, dtype=stats_dtype(mu_w.dtype, mu_l.dtype))
    loss = torch.empty(n_pairs, **out)
    reward_w, reward_l = torch.empty(n_pairs, group_size, **out), torch.empty(n_pairs, group_size, **out)
    if n_pairs:
        block_p, block_g, block_k = _pair_tile(group_size)
        # The inputs of the disabled branch are never read: any tensor stands in for their pointers.
        gap, s_w, s_l = (mu_w if t is None else t for t in (gap, s_w, s_l))
        with launch_guard(mu_w.device):
            _pairwise_gap_fwd_kernel[(cdiv(n_pairs, block_p),)](
                mu_w, mu_l, gap, s_w, s_l, loss, reward_w, reward_l,
                n_pairs, group_size, mu_w.stride(0), mu_w.stride(1), mu_l.stride(0), mu_l.stride(1),
                gap.stride(0), s_w.stride(0), s_l.stride(0), inv_range, lambda_pt, lambda_pw,
                GDSO=gdso, BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_K=block_k,
            )
        note("gdso_rewards" if gdso else "pairwise_gap", "triton")
    return loss, reward_w, reward_l


def pairwise_gap_fwd(mu_w: torch.Tensor, mu_l: torch.Tensor, gap: torch.Tensor, score_range: float):
    """Launch on ``mu_w, mu_l [P, G]``, ``gap [P]`` (any strides); returns ``loss [P]``, ``reward_w/l [P, G]``."""
    return _launch_fwd(mu_w, mu_l, gap, None, None, 1.0 / score_range, 0.0, 0.0, gdso=False)


def gdso_rewards_fwd(mu_w: torch.Tensor, mu_l: torch.Tensor, s_w: torch.Tensor, s_l: torch.Tensor,
                     score_range: float, lambda_pt: float, lambda_pw: float):
    """Launch the forward with the GDSO flag; returns the Eq. 13 rewards ``r_w, r_l [P, G]`` in fp32."""
    _, reward_w, reward_l = _launch_fwd(mu_w, mu_l, None, s_w, s_l, 1.0 / score_range, lambda_pt, lambda_pw,
                                        gdso=True)
    return reward_w, reward_l


def pairwise_gap_bwd(grad_loss: torch.Tensor, mu_w: torch.Tensor, mu_l: torch.Tensor, gap: torch.Tensor,
                     score_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward (``grad_loss [P]`` in the stats dtype, any stride); gradients in each input's dtype."""
    n_pairs, group_size = mu_w.shape
    grad_w = torch.empty(n_pairs, group_size, device=mu_w.device, dtype=mu_w.dtype)
    grad_l = torch.empty(n_pairs, group_size, device=mu_l.device, dtype=mu_l.dtype)
    if n_pairs:
        block_p, block_g, block_k = _pair_tile(group_size)
        with launch_guard(mu_w.device):
            _pairwise_gap_bwd_kernel[(cdiv(n_pairs, block_p),)](
                grad_loss, mu_w, mu_l, gap, grad_w, grad_l,
                n_pairs, group_size, mu_w.stride(0), mu_w.stride(1), mu_l.stride(0), mu_l.stride(1), gap.stride(0),
                grad_loss.stride(0), 1.0 / score_range, BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_K=block_k,
            )
        note("pairwise_gap.backward", "triton")
    return grad_w, grad_l
