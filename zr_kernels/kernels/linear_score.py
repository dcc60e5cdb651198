"""Triton kernels for the fused score head: ``hidden @ W[rows].T (+ bias)`` → K-way softmax → mean, std.

Forward reads ``hidden [N, D]`` once and the K score rows of ``W`` (cached); it writes ``N·K + 2N``
statistics. Backward turns the upstream gradients into ``grad_logits [N, K]`` (the score_distribution
backward kernel), then ``grad_hidden = grad_logits @ W[rows]`` (reads W rows, writes ``N·D``) and
``grad_W[rows] = grad_logits.T @ hidden`` (reads ``N·D``): each row split writes its own fp32 partial
sums and a second kernel adds them in a fixed order, so the result is deterministic (no atomics).

Score rows are ``W[k]`` (``HAS_IDS=False``) or ``W[ids[k]]``; an id outside ``[0, V)`` or a repeat of an earlier
bin's id (possible only for ids not checked on the host: CUDA tensors) is never read: its logit is NaN (so the
row's outputs and gradients are NaN) and its gradient rows are not written, so no two bins write one row.
Compute is fp32 (fp64 for fp64 inputs, the type of the statistics buffers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zr_kernels._backend import interpreter_enabled, launch_guard, note
from zr_kernels._types import stats_dtype
from zr_kernels._validation import cached_arange
from zr_kernels.kernels._grid import cdiv, next_power_of_2
from zr_kernels.kernels.score_distribution import score_distribution_bwd, store_distribution

BLOCK_ROWS = 16  # tl.dot needs every tile side >= 16
BLOCK_D = 128
ROWS_PER_SPLIT = 1024  # hidden rows per weight-gradient partial (a multiple of BLOCK_ROWS)
MAX_SPLITS = 65535  # a CUDA grid's y dimension; past 67M rows each split takes more rows
MAX_DIM = 2**26  # hidden size limit: one split's [K, D] partial sums (K <= 32) stay below 2^31 elements


def _block_bins(num_bins: int) -> int:
    return max(16, next_power_of_2(num_bins))


def _dot_in_input_dtype(dtype: torch.dtype) -> bool:
    """On a GPU, 16-bit tiles go to tensor cores as they are (products are exact in the fp32 accumulator);
    fp32 stays IEEE fp32 (no TF32), and the interpreter always computes in the statistics type."""
    return dtype in (torch.bfloat16, torch.float16) and not interpreter_enabled()


@triton.jit
def _score_rows(ids_ptr, bins, n_bins, n_weight_rows, HAS_IDS: tl.constexpr):
    """Row of W for each bin and whether it may be read: a real bin whose id is in range and is not a repeat of
    an earlier bin's id (K <= 32, so the all-pairs check is a few hundred comparisons)."""
    bin_ok = bins < n_bins
    if HAS_IDS:
        w_rows = tl.load(ids_ptr + bins, mask=bin_ok, other=0).to(tl.int64)
        earlier_same = (w_rows[:, None] == w_rows[None, :]) & (bins[None, :] < bins[:, None]) & bin_ok[None, :]
        repeat = tl.sum(earlier_same.to(tl.int32), axis=1) > 0
        return w_rows, bin_ok & (w_rows >= 0) & (w_rows < n_weight_rows) & ~repeat
    return bins.to(tl.int64), bin_ok


@triton.jit
def _linear_score_fwd_kernel(
    hidden_ptr, weight_ptr, ids_ptr, bias_ptr, values_ptr, target_ptr, probs_ptr, mean_ptr, std_ptr, nll_ptr,
    n_rows, dim, n_bins, n_weight_rows, stride_hn, stride_hd, stride_wr, stride_wd, stride_b, stride_target,
    temperature,
    HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_type = probs_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    bins = tl.arange(0, BLOCK_BINS)
    row_ok = rows < n_rows
    bin_ok = bins < n_bins
    rows64 = rows.to(tl.int64)
    w_rows, w_ok = _score_rows(ids_ptr, bins, n_bins, n_weight_rows, HAS_IDS)

    acc = tl.zeros((BLOCK_ROWS, BLOCK_BINS), dtype=acc_type)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        cols64 = cols.to(tl.int64)  # a column stride can be large (a column-major [V, D] head): widen first
        h = tl.load(hidden_ptr + rows64[:, None] * stride_hn + cols64[None, :] * stride_hd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + w_rows[:, None] * stride_wr + cols64[None, :] * stride_wd,
                    mask=w_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_INPUT_DTYPE:
            acc += tl.dot(h, tl.trans(w), out_dtype=acc_type)
        else:
            acc += tl.dot(h.to(acc_type), tl.trans(w.to(acc_type)), input_precision="ieee", out_dtype=acc_type)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + w_rows * stride_b, mask=w_ok, other=0.0).to(acc_type)[None, :]

    z = tl.where(w_ok[None, :], acc / temperature, float("nan"))
    z = tl.where(bin_ok[None, :], z, float("-inf"))
    store_distribution(z, rows, bins, n_rows, n_bins, values_ptr, target_ptr, stride_target,
                       probs_ptr, mean_ptr, std_ptr, nll_ptr, HAS_TARGET)


@triton.jit
def _linear_score_grad_hidden_kernel(
    grad_logits_ptr, weight_ptr, ids_ptr, grad_hidden_ptr,
    n_rows, dim, n_bins, n_weight_rows, stride_wr, stride_wd,
    HAS_IDS: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_type = grad_logits_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    bins = tl.arange(0, BLOCK_BINS)
    row_ok = rows < n_rows
    col_ok = cols < dim
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    w_rows, w_ok = _score_rows(ids_ptr, bins, n_bins, n_weight_rows, HAS_IDS)
    g = tl.load(grad_logits_ptr + rows64[:, None] * n_bins + bins[None, :],
                mask=row_ok[:, None] & (bins < n_bins)[None, :], other=0.0)
    w = tl.load(weight_ptr + w_rows[:, None] * stride_wr + cols64[None, :] * stride_wd,
                mask=w_ok[:, None] & col_ok[None, :], other=0.0)
    if DOT_IN_INPUT_DTYPE:
        # fp32 grad_logits meet 16-bit W: both go in at W's precision, as eager PyTorch's backward does.
        dh = tl.dot(g.to(w.dtype), w, out_dtype=acc_type)
    else:
        dh = tl.dot(g, w.to(acc_type), input_precision="ieee", out_dtype=acc_type)
    tl.store(grad_hidden_ptr + rows64[:, None] * dim + cols64[None, :],
             dh.to(grad_hidden_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _linear_score_weight_partials_kernel(
    grad_logits_ptr, hidden_ptr, partial_w_ptr, partial_b_ptr,
    n_rows, dim, n_bins, stride_hn, stride_hd, rows_per_split,
    BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_type = grad_logits_ptr.dtype.element_ty
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    bins = tl.arange(0, BLOCK_BINS)
    col_ok = cols < dim
    bin_ok = bins < n_bins
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_BINS, BLOCK_D), dtype=acc_type)
    acc_b = tl.zeros((BLOCK_BINS,), dtype=acc_type)
    begin = split * rows_per_split
    end = tl.minimum(begin + rows_per_split, n_rows)
    h_cols = hidden_ptr + cols64 * stride_hd  # the column part of the address, once (fewer live registers)
    for n0 in range(begin, end, BLOCK_ROWS):
        rows = n0 + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        g = tl.load(grad_logits_ptr + rows64[:, None] * n_bins + bins[None, :],
                    mask=row_ok[:, None] & bin_ok[None, :], other=0.0)
        h = tl.load(h_cols[None, :] + rows64[:, None] * stride_hn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(acc_type)
        acc += tl.dot(tl.trans(g), h, input_precision="ieee", out_dtype=acc_type)
        acc_b += tl.sum(g, axis=0)
    # A split's [K, D] block is below 2^31 elements (K <= 32, D <= MAX_DIM), so its offsets stay 32-bit, which
    # saves the registers of a [K, BLOCK_D] int64 tile; the split's base is 64-bit.
    split_w = partial_w_ptr + split.to(tl.int64) * n_bins * dim
    tl.store(split_w + bins[:, None] * dim + cols[None, :], acc, mask=bin_ok[:, None] & col_ok[None, :])
    if pid_d == 0:
        tl.store(partial_b_ptr + split * n_bins + bins, acc_b, mask=bin_ok)


@triton.jit
def _linear_score_sum_partials_kernel(
    partial_w_ptr, partial_b_ptr, ids_ptr, grad_weight_ptr, grad_bias_ptr,
    n_splits, dim, n_bins, n_weight_rows,
    HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_type = partial_w_ptr.dtype.element_ty
    pid_d = tl.program_id(0)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    bins = tl.arange(0, BLOCK_BINS)
    bin_ok = bins < n_bins
    col_ok = cols < dim
    cols64 = cols.to(tl.int64)
    w_rows, w_ok = _score_rows(ids_ptr, bins, n_bins, n_weight_rows, HAS_IDS)
    acc = tl.zeros((BLOCK_BINS, BLOCK_D), dtype=acc_type)
    acc_b = tl.zeros((BLOCK_BINS,), dtype=acc_type)
    base = tl.zeros((), dtype=tl.int64)  # splits · K · D passes 2^31 at tens of millions of rows
    for split in range(0, n_splits):  # fixed order: the same bits every run
        acc += tl.load(partial_w_ptr + base + bins[:, None] * dim + cols[None, :],  # 32-bit within a split
                       mask=bin_ok[:, None] & col_ok[None, :], other=0.0)
        acc_b += tl.load(partial_b_ptr + split * n_bins + bins, mask=bin_ok, other=0.0)
        base += n_bins * dim
    tl.store(grad_weight_ptr + w_rows[:, None] * dim + cols64[None, :],
             acc.to(grad_weight_ptr.dtype.element_ty), mask=w_ok[:, None] & col_ok[None, :])
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(grad_bias_ptr + w_rows, acc_b.to(grad_bias_ptr.dtype.element_ty), mask=w_ok)


def _ids_arg(ids: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return ids if ids is not None else fallback


def linear_score_fwd(hidden, weight, ids, bias, values, target, temperature: float):
    """Launch the forward; ``hidden [N, D]``, ``weight [V or K, D]`` (any strides). Returns probs, mean, std and
    nll (``[N]`` with a target, an empty ``[0]`` tensor without one)."""
    n_rows, dim = hidden.shape
    n_bins = ids.numel() if ids is not None else weight.shape[0]
    out = dict(device=hidden.device, dtype=stats_dtype(hidden.dtype))
    probs = torch.empty(n_rows, n_bins, **out)
    mean, std = torch.empty(n_rows, **out), torch.empty(n_rows, **out)
    nll = torch.empty(n_rows if target is not None else 0, **out)
    if n_rows:
        with launch_guard(hidden.device):
            _linear_score_fwd_kernel[(cdiv(n_rows, BLOCK_ROWS),)](
                hidden, weight, _ids_arg(ids, values), bias if bias is not None else values, values,
                target if target is not None else values, probs, mean, std, nll,
                n_rows, dim, n_bins, weight.shape[0], hidden.stride(0), hidden.stride(1), weight.stride(0),
                weight.stride(1), bias.stride(0) if bias is not None else 0,
                target.stride(0) if target is not None else 0, temperature,
                HAS_IDS=ids is not None, HAS_BIAS=bias is not None, HAS_TARGET=target is not None,
                DOT_IN_INPUT_DTYPE=_dot_in_input_dtype(hidden.dtype),
                BLOCK_ROWS=BLOCK_ROWS, BLOCK_BINS=_block_bins(n_bins), BLOCK_D=BLOCK_D,
            )
        note("linear_score", "triton")
    return probs, mean, std, nll


def linear_score_grad_logits(grad_probs, grad_mean, grad_std, grad_nll, probs, mean, std, target, values,
                             temperature: float):
    """``grad_logits [N, K]`` (statistics dtype, divided by the temperature) from the upstream gradients (each
    None when that output is unused, else any strides; ``grad_nll`` only with a ``target``)."""
    n_bins = probs.shape[1]
    return score_distribution_bwd(grad_probs, grad_mean, grad_std, grad_nll, probs, mean, std, target,
                                  cached_arange(n_bins, probs.device), values, temperature, n_bins, probs.dtype,
                                  op="linear_score.backward")


def linear_score_grad_hidden(grad_logits, weight, ids, dim: int) -> torch.Tensor:
    """``grad_logits @ W[rows]`` as a contiguous ``[N, D]`` tensor in W's dtype."""
    n_rows, n_bins = grad_logits.shape
    grad_hidden = torch.empty(n_rows, dim, device=grad_logits.device, dtype=weight.dtype)
    if n_rows:
        grid = (cdiv(n_rows, BLOCK_ROWS), cdiv(dim, BLOCK_D))
        with launch_guard(weight.device):
            _linear_score_grad_hidden_kernel[grid](
                grad_logits, weight, _ids_arg(ids, grad_logits), grad_hidden,
                n_rows, dim, n_bins, weight.shape[0], weight.stride(0), weight.stride(1),
                HAS_IDS=ids is not None, DOT_IN_INPUT_DTYPE=_dot_in_input_dtype(weight.dtype),
                BLOCK_ROWS=BLOCK_ROWS, BLOCK_BINS=_block_bins(n_bins), BLOCK_D=BLOCK_D,
            )
        note("linear_score.grad_hidden", "triton")
    return grad_hidden


def weight_gradient_splits(n_rows: int) -> tuple[int, int]:
    """``(splits, rows_per_split)`` of the weight gradient's partial sums: ``ROWS_PER_SPLIT`` rows each, but at most
    ``MAX_SPLITS`` splits (the grid's y limit), rows per split a multiple of ``BLOCK_ROWS``."""
    splits = max(1, min(cdiv(n_rows, ROWS_PER_SPLIT), MAX_SPLITS))
    return splits, cdiv(cdiv(max(n_rows, 1), splits), BLOCK_ROWS) * BLOCK_ROWS


def linear_score_grad_weight(grad_logits, hidden, ids, num_weight_rows: int, with_bias: bool):
    """``grad_W`` (``[num_weight_rows, D]``, zero outside the score rows) and ``grad_bias`` (``[num_weight_rows]``,
    or an empty tensor when ``with_bias`` is false), both contiguous in hidden's dtype."""
    n_rows, n_bins = grad_logits.shape
    dim = hidden.shape[1]
    out = dict(device=hidden.device, dtype=hidden.dtype)
    scattered = ids is not None
    grad_weight = (torch.zeros if scattered else torch.empty)(num_weight_rows, dim, **out)
    grad_bias = (torch.zeros if scattered else torch.empty)(num_weight_rows if with_bias else 0, **out)
    splits, rows_per_split = weight_gradient_splits(n_rows)
    partial_w = torch.empty(splits, n_bins, dim, device=hidden.device, dtype=grad_logits.dtype)
    partial_b = torch.empty(splits, n_bins, device=hidden.device, dtype=grad_logits.dtype)
    block_bins = _block_bins(n_bins)
    with launch_guard(hidden.device):
        _linear_score_weight_partials_kernel[(cdiv(dim, BLOCK_D), splits)](
            grad_logits, hidden, partial_w, partial_b,
            n_rows, dim, n_bins, hidden.stride(0), hidden.stride(1), rows_per_split,
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_BINS=block_bins, BLOCK_D=BLOCK_D,
        )
        _linear_score_sum_partials_kernel[(cdiv(dim, BLOCK_D),)](
            partial_w, partial_b, _ids_arg(ids, partial_b), grad_weight, grad_bias if with_bias else partial_b,
            splits, dim, n_bins, num_weight_rows,
            HAS_IDS=scattered, HAS_BIAS=with_bias, BLOCK_BINS=block_bins, BLOCK_D=BLOCK_D,
        )
    note("linear_score.grad_weight", "triton")
    return grad_weight, grad_bias
