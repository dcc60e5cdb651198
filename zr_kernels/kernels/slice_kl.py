"""Triton kernels for the KL / generalized JSD between a teacher's and a student's score-bin distributions.

Slice mode reads the ``N·K`` score logits (never the other ``V − K`` columns) and ``N·K`` teacher probabilities,
writes ``2N`` fp32 values (loss and log-sum-exp per row); backward writes only the K score columns of a
zero-filled ``[N, V]`` gradient. Vocab mode adds one streaming pass over the V logits of each row (online
max and sum, ``BLOCK_V`` columns at a time) for the forward log-sum-exp, and one pass over V in the backward
that writes the full ``[N, V]`` gradient in the input dtype; no ``N × V`` fp32 temporary exists.

``MODE`` selects the divergence: 0 = KL(teacher ‖ student), 1 = KL(student ‖ teacher), 2 = generalized JSD
with TRL's convention, ``β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`` with ``m = β·p + (1 − β)·q``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zr_kernels.kernels.score_distribution import _blocks

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
MAX_BLOCK_V = 4096


def divergence_mode(beta: float) -> int:
    return FORWARD_KL if beta == 0 else REVERSE_KL if beta == 1 else JSD


def _vocab_blocks(vocab_size: int) -> tuple[int, int]:
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    return max(1, min(16, MAX_BLOCK_V // block_v)), block_v


@triton.jit
def _kl_terms(a, log_a, log_b):
    """``a·(log a − log b)`` elementwise, 0 where ``a == 0`` (the ``0·log 0 = 0`` convention)."""
    return tl.where(a > 0, a * (log_a - log_b), 0.0)


@triton.jit
def _load_slice(logits_ptr, teacher_ptr, ids_ptr, lse_ptr, n_rows, n_bins,
                stride_row, stride_col, stride_t_row, stride_t_col, temperature,
                HAS_LSE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr):
    """The row block's scaled score logits ``z``, student log-probs, teacher probs and log-sum-exp. Without
    ``HAS_LSE`` the log-sum-exp is taken over the K score logits (slice mode), else loaded (vocab mode)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    bins = tl.arange(0, BLOCK_BINS)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (bins < n_bins)[None, :]
    ids = tl.load(ids_ptr + bins, mask=bins < n_bins, other=0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    z = tl.load(logits_ptr + rows64[:, None] * stride_row + ids[None, :] * stride_col, mask=ok, other=float("-inf"))
    z = z.to(tl.float32) / temperature
    p = tl.load(teacher_ptr + rows64[:, None] * stride_t_row + bins[None, :] * stride_t_col, mask=ok, other=0.0)
    p = p.to(tl.float32)
    if HAS_LSE:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    else:
        z_max = tl.max(z, axis=1)
        lse = z_max + tl.log(tl.sum(tl.exp(z - z_max[:, None]), axis=1))
    return rows, rows64, ids, ok, z - lse[:, None], p, lse


@triton.jit
def _slice_kl_fwd_kernel(
    logits_ptr, teacher_ptr, ids_ptr, lse_ptr, loss_ptr,
    n_rows, n_bins, stride_row, stride_col, stride_t_row, stride_t_col, beta, temperature,
    MODE: tl.constexpr, HAS_LSE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr,
):
    rows, rows64, ids, ok, log_q, p, lse = _load_slice(
        logits_ptr, teacher_ptr, ids_ptr, lse_ptr, n_rows, n_bins, stride_row, stride_col,
        stride_t_row, stride_t_col, temperature, HAS_LSE, BLOCK_ROWS, BLOCK_BINS)
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
    row_ok = rows < n_rows
    tl.store(loss_ptr + rows, tl.sum(tl.where(ok, terms, 0.0), axis=1), mask=row_ok)
    if not HAS_LSE:
        tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _slice_kl_bwd_kernel(
    grad_loss_ptr, logits_ptr, teacher_ptr, ids_ptr, lse_ptr, grad_logits_ptr,
    n_rows, n_bins, vocab_size, stride_row, stride_col, stride_t_row, stride_t_col, beta, temperature,
    MODE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr,
):
    rows, rows64, ids, ok, log_q, p, lse = _load_slice(
        logits_ptr, teacher_ptr, ids_ptr, lse_ptr, n_rows, n_bins, stride_row, stride_col,
        stride_t_row, stride_t_col, temperature, True, BLOCK_ROWS, BLOCK_BINS)
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
    g = tl.load(grad_loss_ptr + rows, mask=rows < n_rows, other=0.0)
    g_z = (h - q * tl.sum(h, axis=1)[:, None]) * (g / temperature)[:, None]
    tl.store(grad_logits_ptr + rows64[:, None] * vocab_size + ids[None, :],
             g_z.to(grad_logits_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _vocab_lse_kernel(
    logits_ptr, lse_ptr, n_rows, vocab_size, stride_row, stride_col, temperature,
    BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    row_offsets = rows.to(tl.int64)[:, None] * stride_row
    run_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < vocab_size)[None, :]
        z = tl.load(logits_ptr + row_offsets + cols.to(tl.int64)[None, :] * stride_col, mask=ok,
                    other=float("-inf")).to(tl.float32) / temperature
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # While every logit seen is -inf the max is -inf too: shift by 0 then, never by -inf (-inf - -inf = nan).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        run_max = new_max
    tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=row_ok)


@triton.jit
def _vocab_grad_kernel(
    grad_loss_ptr, logits_ptr, teacher_ptr, lse_ptr, grad_logits_ptr,
    n_rows, n_bins, vocab_size, stride_row, stride_col, stride_t_row, stride_t_col, temperature,
    BLOCK_ROWS: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``g/T · Σp · softmax(z)`` on every column; the K score columns are then rewritten by the slice kernel."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    bins = tl.arange(0, BLOCK_BINS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    p = tl.load(teacher_ptr + rows64[:, None] * stride_t_row + bins[None, :] * stride_t_col,
                mask=row_ok[:, None] & (bins < n_bins)[None, :], other=0.0).to(tl.float32)
    g = tl.load(grad_loss_ptr + rows, mask=row_ok, other=0.0)
    scale = g * tl.sum(p, axis=1) / temperature
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < vocab_size)[None, :]
        z = tl.load(logits_ptr + rows64[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col, mask=ok,
                    other=float("-inf")).to(tl.float32) / temperature
        grad = tl.exp(z - lse[:, None]) * scale[:, None]
        tl.store(grad_logits_ptr + rows64[:, None] * vocab_size + cols[None, :],
                 grad.to(grad_logits_ptr.dtype.element_ty), mask=ok)


def slice_kl_fwd(logits: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, vocab_norm: bool, beta: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on ``logits [N, V]`` and ``teacher [N, K]`` (any strides); returns the per-row loss and
    the per-row log-sum-exp of ``logits / temperature`` (over the K score columns, or over V in vocab mode)."""
    n_rows, n_bins = teacher.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if n_rows:
        if vocab_norm:
            block_rows_v, block_v = _vocab_blocks(logits.shape[1])
            _vocab_lse_kernel[(triton.cdiv(n_rows, block_rows_v),)](
                logits, lse, n_rows, logits.shape[1], logits.stride(0), logits.stride(1), temperature,
                BLOCK_ROWS=block_rows_v, BLOCK_V=block_v,
            )
        block_rows, block_bins = _blocks(n_bins)
        _slice_kl_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            logits, teacher, ids, lse, loss,
            n_rows, n_bins, logits.stride(0), logits.stride(1), teacher.stride(0), teacher.stride(1), beta,
            temperature, MODE=divergence_mode(beta), HAS_LSE=vocab_norm, BLOCK_ROWS=block_rows, BLOCK_BINS=block_bins,
        )
    return loss, lse


def slice_kl_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor,
                 lse: torch.Tensor, vocab_norm: bool, beta: float, temperature: float) -> torch.Tensor:
    """Launch the backward; ``grad_loss`` is contiguous fp32 ``[N]``. Returns ``[N, V]`` in the logits' dtype."""
    (n_rows, vocab_size), n_bins = logits.shape, ids.numel()
    make = torch.empty if vocab_norm else torch.zeros  # vocab mode writes every column
    grad_logits = make(n_rows, vocab_size, device=logits.device, dtype=logits.dtype)
    if n_rows:
        strides = (logits.stride(0), logits.stride(1), teacher.stride(0), teacher.stride(1))
        block_rows, block_bins = _blocks(n_bins)
        if vocab_norm:
            block_rows_v, block_v = _vocab_blocks(vocab_size)
            _vocab_grad_kernel[(triton.cdiv(n_rows, block_rows_v),)](
                grad_loss, logits, teacher, lse, grad_logits, n_rows, n_bins, vocab_size, *strides, temperature,
                BLOCK_ROWS=block_rows_v, BLOCK_BINS=block_bins, BLOCK_V=block_v,
            )
        # Launched after _vocab_grad_kernel on the same stream, so its score-column values are the ones kept.
        _slice_kl_bwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            grad_loss, logits, teacher, ids, lse, grad_logits, n_rows, n_bins, vocab_size, *strides, beta,
            temperature, MODE=divergence_mode(beta), BLOCK_ROWS=block_rows, BLOCK_BINS=block_bins,
        )
    return grad_logits
