"""Launchers of the CUDA score-head extension ``zr_kernels._C``, with the Triton launchers' signatures.

They allocate outputs with PyTorch and pass the extension raw pointers, sizes, strides, the device index
and the current stream, so the kernels run in PyTorch's stream order with no synchronisation. The extension
sets and restores the current device itself, so no Python device guard runs per call.
Inputs are fp32 / bf16 / fp16; statistics and ``grad_logits`` are fp32.
"""
from __future__ import annotations

import torch

from zr_kernels._backend import note

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _ext():
    from zr_kernels import _C

    return _C


def _launch(t: torch.Tensor) -> tuple[int, int]:
    # The raw stream handle, as Triton's launcher reads it: no torch.cuda.Stream object is built per call.
    index = t.get_device()
    return index, torch._C._cuda_getCurrentRawStream(index)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def linear_score_fwd(hidden, weight, ids, bias, values, target, temperature: float):
    # The extension computes no nll: linear_score sends every call with a target to the Triton kernels.
    n_rows, dim = hidden.shape
    n_bins = ids.numel() if ids is not None else weight.shape[0]
    probs = torch.empty(n_rows, n_bins, device=hidden.device, dtype=torch.float32)
    mean, std = (torch.empty(n_rows, device=hidden.device, dtype=torch.float32) for _ in range(2))
    _ext().forward(
        _DTYPE_CODES[hidden.dtype], hidden.data_ptr(), n_rows, dim, hidden.stride(0), hidden.stride(1),
        weight.data_ptr(), weight.shape[0], weight.stride(0), weight.stride(1), _ptr(ids),
        _ptr(bias), bias.stride(0) if bias is not None else 0, n_bins, values.data_ptr(), temperature,
        probs.data_ptr(), mean.data_ptr(), std.data_ptr(), *_launch(hidden),
    )
    _note_if_launched("linear_score", n_rows)
    return probs, mean, std, torch.empty(0, device=hidden.device, dtype=torch.float32)


def linear_score_grad_logits(grad_probs, grad_mean, grad_std, grad_nll, probs, mean, std, target, values,
                             temperature: float):
    n_rows, n_bins = probs.shape
    # The kernel reads contiguous upstream gradients (a .sum()'s broadcast gradient is copied here).
    grad_probs, grad_mean, grad_std = (g if g is None else g.contiguous() for g in (grad_probs, grad_mean, grad_std))
    grad_logits = torch.empty_like(probs)
    _ext().grad_logits(
        n_rows, n_bins, _ptr(grad_probs), _ptr(grad_mean), _ptr(grad_std), probs.data_ptr(),  # None: unused output
        mean.data_ptr(), std.data_ptr(), values.data_ptr(), temperature, grad_logits.data_ptr(), *_launch(probs),
    )
    _note_if_launched("linear_score.backward", n_rows)
    return grad_logits


def linear_score_grad_hidden(grad_logits, weight, ids, dim: int) -> torch.Tensor:
    n_rows, n_bins = grad_logits.shape
    grad_hidden = torch.empty(n_rows, dim, device=grad_logits.device, dtype=weight.dtype)
    _ext().grad_hidden(
        _DTYPE_CODES[weight.dtype], grad_logits.data_ptr(), n_rows, dim, weight.data_ptr(), weight.shape[0],
        weight.stride(0), weight.stride(1), _ptr(ids), n_bins, grad_hidden.data_ptr(), *_launch(weight),
    )
    _note_if_launched("linear_score.grad_hidden", n_rows)
    return grad_hidden


def linear_score_grad_weight(grad_logits, hidden, ids, num_weight_rows: int, with_bias: bool):
    n_rows, n_bins = grad_logits.shape
    dim = hidden.shape[1]
    out = dict(device=hidden.device, dtype=hidden.dtype)
    # Rows off the score slice (LM-head mode) stay zero; a [K, D] head is written in full.
    alloc = torch.zeros if ids is not None else torch.empty
    grad_weight = alloc(num_weight_rows, dim, **out)
    grad_bias = alloc(num_weight_rows if with_bias else 0, **out)
    device, stream = _launch(hidden)
    splits = _ext().weight_splits(n_rows, dim, device)
    workspace = torch.empty(splits, n_bins, dim, device=hidden.device, dtype=torch.float32)
    _ext().grad_weight(
        _DTYPE_CODES[hidden.dtype], grad_logits.data_ptr(), hidden.data_ptr(), n_rows, dim, hidden.stride(0),
        hidden.stride(1), num_weight_rows, _ptr(ids), n_bins, workspace.data_ptr(), splits,
        grad_weight.data_ptr(), grad_bias.data_ptr() if with_bias else 0, device, stream,
    )
    note("linear_score.grad_weight", "cuda")  # launched even for N = 0: it writes the zero gradient
    return grad_weight, grad_bias


def _note_if_launched(op: str, n_rows: int) -> None:
    if n_rows:  # the extension launches nothing for zero rows
        note(op, "cuda")
