"""Triton kernels for the score-bin softmax: gather K logits per row, softmax, mean, std, NLL.

Forward reads ``M·K`` logits (never the other ``V − K`` columns) and writes ``M·K + 3M`` fp32 values.
Statistics are computed and stored in fp32 (fp64 for fp64 logits, so ``gradcheck`` is meaningful): the
kernels take the compute type from the ``probs`` buffer's element type.
Backward reads the saved ``M·K`` probabilities plus the upstream gradients and writes only the K
score columns of each row into a zero-filled ``[M, V]`` gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zr_kernels._backend import launch_guard, note
from zr_kernels._types import stats_dtype
from zr_kernels.kernels._grid import cdiv, row_tile


@triton.jit
def store_distribution(z, rows, bins, n_rows, n_bins, values_ptr, target_ptr, stride_target,
                       probs_ptr, mean_ptr, std_ptr, nll_ptr, HAS_TARGET: tl.constexpr):
    """Softmax of the scaled score logits ``z [rows, bins]`` (-inf off the K bins), then store probs, mean, std
    and, with a target, ``nll`` (also linear_score's forward epilogue)."""
    acc_type = probs_ptr.dtype.element_ty
    row_ok = rows < n_rows
    bin_ok = bins < n_bins
    rows64 = rows.to(tl.int64)
    values = tl.load(values_ptr + bins, mask=bin_ok, other=0.0).to(acc_type)
    z_max = tl.max(z, axis=1)
    e = tl.where(bin_ok[None, :], tl.exp(z - z_max[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    p = e / total[:, None]
    mean = tl.sum(p * values[None, :], axis=1)
    centered = tl.where(bin_ok[None, :], values[None, :] - mean[:, None], 0.0)
    # Two-pass variance: a one-hot or constant distribution gives exactly 0, never a tiny negative.
    std = tl.sqrt(tl.sum(p * centered * centered, axis=1))
    tl.store(probs_ptr + rows64[:, None] * n_bins + bins[None, :], p, mask=row_ok[:, None] & bin_ok[None, :])
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(std_ptr + rows, std, mask=row_ok)
    if HAS_TARGET:
        # -log p[t] from the log-sum-exp, never log(p): exact where p underflows. An out-of-range target (only
        # possible for unchecked CUDA tensors) reads nothing and gives NaN.
        t = tl.load(target_ptr + rows64 * stride_target, mask=row_ok, other=0)
        z_t = tl.sum(tl.where(bins[None, :] == t[:, None], z, 0.0), axis=1)
        nll = tl.where((t >= 0) & (t < n_bins), z_max + tl.log(total) - z_t, float("nan"))
        tl.store(nll_ptr + rows, nll, mask=row_ok)


@triton.jit
def load_score_ids(ids_ptr, bins, n_bins, vocab_size, repeats_ptr, CHECK_REPEATS: tl.constexpr):
    """The score-token ids of ``bins`` (int64) and whether each may be read: a real bin whose id lies in
    ``[0, vocab_size)``, in a call whose ids hold no repeated value (``repeats_ptr``: a device-side flag, read only
    for ids that were not checked on the host). A row with a bin that may not be read must become NaN."""
    bin_ok = bins < n_bins
    ids = tl.load(ids_ptr + bins, mask=bin_ok, other=0).to(tl.int64)
    id_ok = bin_ok & (ids >= 0) & (ids < vocab_size)
    if CHECK_REPEATS:
        id_ok = id_ok & (tl.load(repeats_ptr + bins * 0) == 0)  # the flag broadcast over the bins
    return ids, id_ok


@triton.jit
def _score_distribution_fwd_kernel(
    logits_ptr, ids_ptr, repeats_ptr, values_ptr, target_ptr,
    probs_ptr, mean_ptr, std_ptr, nll_ptr,
    n_rows, n_bins, vocab_size, stride_row, stride_col, stride_target, temperature,
    HAS_TARGET: tl.constexpr, CHECK_REPEATS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    bins = tl.arange(0, BLOCK_BINS)
    row_ok = rows < n_rows
    ids, id_ok = load_score_ids(ids_ptr, bins, n_bins, vocab_size, repeats_ptr, CHECK_REPEATS)
    z = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_row + ids[None, :] * stride_col,
                mask=row_ok[:, None] & id_ok[None, :], other=float("-inf"))
    z = z.to(probs_ptr.dtype.element_ty) / temperature
    # A bad id is never read: its bin's logit is NaN, so the whole row's distribution is NaN.
    z = tl.where((bins < n_bins)[None, :] & ~id_ok[None, :], float("nan"), z)
    store_distribution(z, rows, bins, n_rows, n_bins, values_ptr, target_ptr, stride_target,
                       probs_ptr, mean_ptr, std_ptr, nll_ptr, HAS_TARGET)


@triton.jit
def _score_distribution_bwd_kernel(
    grad_probs_ptr, grad_mean_ptr, grad_std_ptr, grad_nll_ptr,
    probs_ptr, mean_ptr, std_ptr, target_ptr, ids_ptr, values_ptr, grad_logits_ptr,
    n_rows, n_bins, vocab_size, stride_target, stride_gp_row, stride_gp_col, stride_g_mean, stride_g_std,
    stride_g_nll, temperature,
    HAS_TARGET: tl.constexpr, GRAD_PROBS: tl.constexpr, GRAD_MEAN: tl.constexpr, GRAD_STD: tl.constexpr,
    GRAD_NLL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr,
):
    acc_type = probs_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    bins = tl.arange(0, BLOCK_BINS)
    row_ok = rows < n_rows
    bin_ok = bins < n_bins
    ok = row_ok[:, None] & bin_ok[None, :]
    ids = tl.load(ids_ptr + bins, mask=bin_ok, other=0).to(tl.int64)
    values = tl.load(values_ptr + bins, mask=bin_ok, other=0.0).to(acc_type)
    rows64 = rows.to(tl.int64)
    bins64 = bins.to(tl.int64)
    slice_offsets = rows64[:, None] * n_bins + bins64[None, :]

    p = tl.load(probs_ptr + slice_offsets, mask=ok, other=0.0)
    # An output whose gradient is absent (unused downstream) contributes nothing; its pointer is never read.
    # Upstream gradients are read through their strides: the gradient of a .sum() is one value broadcast
    # (stride 0), and making it contiguous would cost a copy kernel per output.
    g_p = tl.zeros([BLOCK_ROWS, BLOCK_BINS], dtype=acc_type)
    if GRAD_PROBS:
        g_p += tl.load(grad_probs_ptr + rows64[:, None] * stride_gp_row + bins64[None, :] * stride_gp_col, mask=ok,
                       other=0.0).to(acc_type)
    if GRAD_MEAN:
        g_mean = tl.load(grad_mean_ptr + rows64 * stride_g_mean, mask=row_ok, other=0.0).to(acc_type)
        g_p += g_mean[:, None] * values[None, :]
    if GRAD_STD:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        std = tl.load(std_ptr + rows, mask=row_ok, other=1.0)
        g_std = tl.load(grad_std_ptr + rows64 * stride_g_std, mask=row_ok, other=0.0).to(acc_type)
        centered = values[None, :] - mean[:, None]
        # d std / d p_k = (v_k - mean)^2 / (2 std); taken as 0 where std == 0 (same as the reference).
        std_scale = tl.where(std > 0, g_std / (2.0 * std), 0.0)
        g_p += std_scale[:, None] * centered * centered
    g_z = p * (g_p - tl.sum(p * g_p, axis=1)[:, None])
    if HAS_TARGET and GRAD_NLL:
        t = tl.load(target_ptr + rows64 * stride_target, mask=row_ok, other=0)
        g_nll = tl.load(grad_nll_ptr + rows64 * stride_g_nll, mask=row_ok, other=0.0).to(acc_type)
        g_z += g_nll[:, None] * (p - tl.where(bins[None, :] == t[:, None], 1.0, 0.0).to(acc_type))
    g_logits = g_z / temperature
    # A bad id made the forward NaN, and with it these gradients; an id outside [0, V) is still never written.
    id_in_range = (ids >= 0) & (ids < vocab_size)
    tl.store(grad_logits_ptr + rows64[:, None] * vocab_size + ids[None, :],
             g_logits.to(grad_logits_ptr.dtype.element_ty), mask=ok & id_in_range[None, :])


def score_distribution_fwd(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                           target: torch.Tensor | None, temperature: float, repeats: torch.Tensor | None = None):
    """Launch the forward on ``logits [M, V]`` (any strides); returns ``probs, mean, std, nll`` in fp32.

    ``nll`` is ``[M]`` with a target and an empty ``[0]`` tensor without one. ``repeats``: the
    :func:`~zr_kernels._validation.repeated_ids` flag of ids that were not checked on the host (None when they
    were); with it set, every row is NaN. An id outside ``[0, V)`` is never read and makes every row NaN.
    """
    n_rows, n_bins = logits.shape[0], ids.numel()
    out = dict(device=logits.device, dtype=stats_dtype(logits.dtype))
    probs = torch.empty(n_rows, n_bins, **out)
    mean, std = torch.empty(n_rows, **out), torch.empty(n_rows, **out)
    nll = torch.empty(n_rows if target is not None else 0, **out)
    if n_rows:
        block_rows, block_bins = row_tile(n_bins)
        with launch_guard(logits.device):
            _score_distribution_fwd_kernel[(cdiv(n_rows, block_rows),)](
                logits, ids, repeats if repeats is not None else ids, values, target if target is not None else ids,
                probs, mean, std, nll,
                n_rows, n_bins, logits.shape[1], logits.stride(0), logits.stride(1),
                target.stride(0) if target is not None else 0, temperature,
                HAS_TARGET=target is not None, CHECK_REPEATS=repeats is not None,
                BLOCK_ROWS=block_rows, BLOCK_BINS=block_bins,
            )
        note("score_distribution", "triton")
    return probs, mean, std, nll


def score_distribution_bwd(grad_probs, grad_mean, grad_std, grad_nll, probs, mean, std, target, ids, values,
                           temperature: float, vocab_size: int, dtype: torch.dtype,
                           op: str = "score_distribution.backward") -> torch.Tensor:
    """Launch the backward. Each upstream gradient is None (that output is unused) or a tensor in the statistics
    dtype with any strides. Returns ``[M, V]`` in ``dtype``, zero off the K score columns. ``op`` names the
    launch in ``trace_backends()`` (linear_score's backward launches this kernel too)."""
    n_rows, n_bins = probs.shape
    grad_logits = torch.zeros(n_rows, vocab_size, device=probs.device, dtype=dtype)
    if n_rows:
        block_rows, block_bins = row_tile(n_bins)
        upstream = (grad_probs, grad_mean, grad_std, grad_nll)
        with launch_guard(probs.device):
            _score_distribution_bwd_kernel[(cdiv(n_rows, block_rows),)](
                *(probs if g is None else g for g in upstream),
                probs, mean, std, target if target is not None else ids, ids, values, grad_logits,
                n_rows, n_bins, vocab_size, target.stride(0) if target is not None else 0,
                *(grad_probs.stride() if grad_probs is not None else (0, 0)),
                *(g.stride(0) if g is not None else 0 for g in upstream[1:]), temperature,
                HAS_TARGET=target is not None, GRAD_PROBS=grad_probs is not None, GRAD_MEAN=grad_mean is not None,
                GRAD_STD=grad_std is not None, GRAD_NLL=grad_nll is not None,
                BLOCK_ROWS=block_rows, BLOCK_BINS=block_bins,
            )
        note(op, "triton")
    return grad_logits
