"""Triton kernels for the KL / generalized JSD between a teacher's and a student's score-bin distributions.

Slice mode reads the ``N·K`` score logits (never the other ``V − K`` columns) and ``N·K`` teacher probabilities,
writes ``2N`` fp32 values (loss and log-sum-exp per row); backward writes only the K score columns of a
zero-filled ``[N, V]`` gradient. Vocab mode adds one streaming pass over the V logits of each row (online
max and sum, ``BLOCK_V`` columns at a time) for the forward log-sum-exp, and one pass over V in the backward
that writes the full ``[N, V]`` gradient in the input dtype; no ``N × V`` fp32 temporary exists. When there are
too few row blocks to fill the GPU, each row's V is split across programs: the forward writes a partial
(max, sum) per split, combined by the slice kernel in a fixed order (deterministic, no atomics).

``MODE`` selects the divergence: 0 = KL(teacher ‖ student), 1 = KL(student ‖ teacher), 2 = generalized JSD
with TRL's convention, ``β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`` with ``m = β·p + (1 − β)·q``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zr_kernels._backend import launch_guard, note
from zr_kernels.kernels._grid import cdiv, next_power_of_2, row_tile
from zr_kernels.kernels.score_distribution import load_score_ids

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
MAX_BLOCK_V = 4096
TARGET_PROGRAMS = 1024  # enough programs to keep every SM of an H100 / H200 streaming


def divergence_mode(beta: float) -> int:
    return FORWARD_KL if beta == 0 else REVERSE_KL if beta == 1 else JSD


def _vocab_blocks(n_rows: int, vocab_size: int) -> tuple[int, int, int, int]:
    """``BLOCK_ROWS, BLOCK_V``, the number of V splits per row and the columns per split (a BLOCK_V multiple)."""
    block_v = min(MAX_BLOCK_V, next_power_of_2(vocab_size))
    block_rows = max(1, min(16, MAX_BLOCK_V // block_v))
    chunks = cdiv(vocab_size, block_v)
    splits = max(1, min(chunks, TARGET_PROGRAMS // cdiv(n_rows, block_rows)))
    split_size = cdiv(chunks, splits) * block_v
    return block_rows, block_v, cdiv(vocab_size, split_size), split_size


@triton.jit
def _safe_shift(new_max):
    """The running max to subtract, or 0 while every logit seen is -inf (never -inf - -inf = nan)."""
    return tl.where(new_max == float("-inf"), 0.0, new_max)


@triton.jit
def _kl_terms(a, log_a, log_b):
    """``a·(log a − log b)`` elementwise, 0 where ``a == 0`` (the ``0·log 0 = 0`` convention)."""
    return tl.where(a > 0, a * (log_a - log_b), 0.0)


@triton.jit
def _load_slice(logits_ptr, teacher_ptr, ids_ptr, repeats_ptr, n_rows, n_bins, vocab_size, stride_row, stride_col,
                stride_t_row, stride_t_col, temperature, CHECK_REPEATS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_BINS: tl.constexpr):
    """The row block's scaled score logits ``z = logits[:, ids] / T`` and teacher probs, fp32, and ``bad``: whether
    the call's ids are bad (an id out of range or repeated; see ``load_score_ids``), which makes every row NaN."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    bins = tl.arange(0, BLOCK_BINS)
    row_ok = rows < n_rows
    bin_ok = bins < n_bins
    ok = row_ok[:, None] & bin_ok[None, :]
    ids, id_ok = load_score_ids(ids_ptr, bins, n_bins, vocab_size, repeats_ptr, CHECK_REPEATS)
    bad = tl.sum((bin_ok & ~id_ok).to(tl.int32), axis=0) > 0
    rows64 = rows.to(tl.int64)
    z = tl.load(logits_ptr + rows64[:, None] * stride_row + ids[None, :] * stride_col,
                mask=row_ok[:, None] & id_ok[None, :], other=float("-inf"))
    z = z.to(tl.float32) / temperature
    p = tl.load(teacher_ptr + rows64[:, None] * stride_t_row + bins.to(tl.int64)[None, :] * stride_t_col, mask=ok,
                other=0.0)
    return rows, rows64, ids, id_ok, ok, bad, z, p.to(tl.float32)


@triton.jit
def _slice_kl_fwd_kernel(
    logits_ptr, teacher_ptr, ids_ptr, repeats_ptr, part_max_ptr, part_sum_ptr, lse_ptr, loss_ptr,
    n_rows, n_bins, vocab_size, n_splits, stride_row, stride_col, stride_t_row, stride_t_col, beta, temperature,
    MODE: tl.constexpr, VOCAB: tl.constexpr, CHECK_REPEATS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_BINS: tl.constexpr,
):
    rows, rows64, ids, id_ok, ok, bad, z, p = _load_slice(
        logits_ptr, teacher_ptr, ids_ptr, repeats_ptr, n_rows, n_bins, vocab_size, stride_row, stride_col,
        stride_t_row, stride_t_col, temperature, CHECK_REPEATS, BLOCK_ROWS, BLOCK_BINS)
    row_ok = rows < n_rows
    if VOCAB:  # combine the per-split (max, sum) of _vocab_lse_kernel, in split order
        run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
        for split in range(0, n_splits):
            part_max = tl.load(part_max_ptr + split * n_rows + rows, mask=row_ok, other=float("-inf"))
            part_sum = tl.load(part_sum_ptr + split * n_rows + rows, mask=row_ok, other=0.0)
            new_max = tl.maximum(run_max, part_max)
            shift = _safe_shift(new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + part_sum * tl.exp(part_max - shift)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
    else:
        z_max = tl.max(z, axis=1)
        lse = z_max + tl.log(tl.sum(tl.exp(z - z_max[:, None]), axis=1))
    log_q = z - lse[:, None]
    log_p = tl.log(p)
    if MODE == 0:
        terms = _kl_terms(p, log_p, log_q)
    else:
        q = tl.exp(log_q)
        if MODE == 1:
            terms = _kl_terms(q, log_q, log_p)
        else:
            log_m = tl.log(beta * p + (1.0 - beta) * q)
            terms = beta * _kl_terms(p, log_p, log_m) + (1.0 - beta) * _kl_terms(q, log_q, log_m)
    # Bad ids: a NaN loss, and a NaN log-sum-exp that carries NaN into every gradient the backward writes.
    loss = tl.where(bad, float("nan"), tl.sum(tl.where(ok, terms, 0.0), axis=1))
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(bad, float("nan"), lse), mask=row_ok)


@triton.jit
def _slice_kl_bwd_kernel(
    grad_loss_ptr, logits_ptr, teacher_ptr, ids_ptr, lse_ptr, grad_logits_ptr,
    n_rows, n_bins, vocab_size, stride_row, stride_col, stride_t_row, stride_t_col, stride_grad, beta, temperature,
    MODE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr,
):
    # Bad ids need no flag here: the forward stored a NaN log-sum-exp, so every value written is NaN.
    rows, rows64, ids, id_ok, ok, bad, z, p = _load_slice(
        logits_ptr, teacher_ptr, ids_ptr, ids_ptr, n_rows, n_bins, vocab_size, stride_row, stride_col,
        stride_t_row, stride_t_col, temperature, False, BLOCK_ROWS, BLOCK_BINS)
    log_q = z - tl.load(lse_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
    q = tl.exp(log_q)
    # h = q·∂L/∂q, so ∂L/∂z = h − q·Σh (softmax chain rule); in vocab mode the sum runs over the K score
    # columns only because h vanishes off them, and the other V − K columns get −q·Σh from _vocab_grad_kernel.
    if MODE == 0:
        h = -p
    elif MODE == 1:
        h = _kl_terms(q, log_q, tl.log(p))  # the +q of d(q log q)/dq cancels against Σq = 1
    else:
        log_m = tl.log(beta * p + (1.0 - beta) * q)
        h = (1.0 - beta) * _kl_terms(q, log_q, log_m)  # the p-terms and the +q cancel through m
    h = tl.where(ok, h, 0.0)
    g = tl.load(grad_loss_ptr + rows64 * stride_grad, mask=rows < n_rows, other=0.0)
    g_z = (h - q * tl.sum(h, axis=1)[:, None]) * (g / temperature)[:, None]
    tl.store(grad_logits_ptr + rows64[:, None] * vocab_size + ids[None, :],
             g_z.to(grad_logits_ptr.dtype.element_ty), mask=ok & id_ok[None, :])


@triton.jit
def _vocab_lse_kernel(
    logits_ptr, part_max_ptr, part_sum_ptr, n_rows, vocab_size, split_size, stride_row, stride_col, temperature,
    BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Online max and sum of ``exp(z − max)`` over columns ``[split·split_size, (split+1)·split_size)``."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    row_offsets = rows.to(tl.int64)[:, None] * stride_row
    run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    for offset in range(0, split_size, BLOCK_V):
        cols = split * split_size + offset + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < vocab_size)[None, :]
        z = tl.load(logits_ptr + row_offsets + cols.to(tl.int64)[None, :] * stride_col, mask=ok,
                    other=float("-inf")).to(tl.float32) / temperature
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        shift = _safe_shift(new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        run_max = new_max
    tl.store(part_max_ptr + split * n_rows + rows, run_max, mask=row_ok)
    tl.store(part_sum_ptr + split * n_rows + rows, run_sum, mask=row_ok)


@triton.jit
def _vocab_grad_kernel(
    grad_loss_ptr, logits_ptr, teacher_ptr, lse_ptr, grad_logits_ptr,
    n_rows, n_bins, vocab_size, split_size, stride_row, stride_col, stride_t_row, stride_t_col, stride_grad,
    temperature, BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``g/T · Σp · softmax(z)`` on every column of the split; the K score columns are then rewritten by the
    slice kernel."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    split = tl.program_id(1)
    bins = tl.arange(0, BLOCK_BINS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    p = tl.load(teacher_ptr + rows64[:, None] * stride_t_row + bins.to(tl.int64)[None, :] * stride_t_col,
                mask=row_ok[:, None] & (bins < n_bins)[None, :], other=0.0).to(tl.float32)
    g = tl.load(grad_loss_ptr + rows64 * stride_grad, mask=row_ok, other=0.0)
    scale = g * tl.sum(p, axis=1) / temperature
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    for offset in range(0, split_size, BLOCK_V):
        cols = split * split_size + offset + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < vocab_size)[None, :]
        z = tl.load(logits_ptr + rows64[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col, mask=ok,
                    other=float("-inf")).to(tl.float32) / temperature
        grad = tl.exp(z - lse[:, None]) * scale[:, None]
        tl.store(grad_logits_ptr + rows64[:, None] * vocab_size + cols.to(tl.int64)[None, :],
                 grad.to(grad_logits_ptr.dtype.element_ty), mask=ok)


def slice_kl_fwd(logits: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, vocab_norm: bool, beta: float,
                 temperature: float, repeats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on ``logits [N, V]`` and ``teacher [N, K]`` (any strides); returns the per-row loss and
    the per-row log-sum-exp of ``logits / temperature`` (over the K score columns, or over V in vocab mode).
    ``repeats``: the repeated-ids flag of ids not checked on the host (None when they were); bad ids (out of
    range, or repeated) are never read and make both outputs NaN."""
    (n_rows, vocab_size), n_bins = logits.shape, ids.numel()
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if not n_rows:
        return loss, lse
    part_max = part_sum = loss  # placeholders in slice mode, never read
    n_splits = 0
    with launch_guard(logits.device):
        if vocab_norm:
            block_rows_v, block_v, n_splits, split_size = _vocab_blocks(n_rows, vocab_size)
            part_max, part_sum = torch.empty(2, n_splits, n_rows, device=logits.device, dtype=torch.float32)
            _vocab_lse_kernel[(cdiv(n_rows, block_rows_v), n_splits)](
                logits, part_max, part_sum, n_rows, vocab_size, split_size, logits.stride(0), logits.stride(1),
                temperature, BLOCK_ROWS=block_rows_v, BLOCK_V=block_v,
            )
        block_rows, block_bins = row_tile(n_bins)
        _slice_kl_fwd_kernel[(cdiv(n_rows, block_rows),)](
            logits, teacher, ids, repeats if repeats is not None else ids, part_max, part_sum, lse, loss,
            n_rows, n_bins, vocab_size, n_splits, logits.stride(0), logits.stride(1), teacher.stride(0),
            teacher.stride(1), beta, temperature, MODE=divergence_mode(beta), VOCAB=vocab_norm,
            CHECK_REPEATS=repeats is not None, BLOCK_ROWS=block_rows, BLOCK_BINS=block_bins,
        )
    note("slice_kl", "triton")
    return loss, lse


def slice_kl_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor,
                 lse: torch.Tensor, vocab_norm: bool, beta: float, temperature: float) -> torch.Tensor:
    """Launch the backward; ``grad_loss`` is fp32 ``[N]``, any stride (a mean's gradient is one value broadcast).
    Returns ``[N, V]`` in the logits' dtype."""
    (n_rows, vocab_size), n_bins = logits.shape, ids.numel()
    make = torch.empty if vocab_norm else torch.zeros  # vocab mode writes every column
    grad_logits = make(n_rows, vocab_size, device=logits.device, dtype=logits.dtype)
    if not n_rows:
        return grad_logits
    strides = (logits.stride(0), logits.stride(1), teacher.stride(0), teacher.stride(1), grad_loss.stride(0))
    block_rows, block_bins = row_tile(n_bins)
    with launch_guard(logits.device):
        if vocab_norm:
            block_rows_v, block_v, n_splits, split_size = _vocab_blocks(n_rows, vocab_size)
            _vocab_grad_kernel[(cdiv(n_rows, block_rows_v), n_splits)](
                grad_loss, logits, teacher, lse, grad_logits, n_rows, n_bins, vocab_size, split_size, *strides,
                temperature, BLOCK_ROWS=block_rows_v, BLOCK_BINS=block_bins, BLOCK_V=block_v,
            )
        # Launched after _vocab_grad_kernel on the same stream, so its score-column values are the ones kept.
        _slice_kl_bwd_kernel[(cdiv(n_rows, block_rows),)](
            grad_loss, logits, teacher, ids, lse, grad_logits, n_rows, n_bins, vocab_size, *strides, beta,
            temperature, MODE=divergence_mode(beta), BLOCK_ROWS=block_rows, BLOCK_BINS=block_bins,
        )
    note("slice_kl.backward", "triton")
    return grad_logits
