"""``score_distribution``: the Q-Align-style close-set softmax over K score tokens (paper Eq. 2, 8, 16)."""
from __future__ import annotations

from typing import Optional

import torch

from zr_kernels import reference
from zr_kernels._backend import Kernel, fused_op, note, resolve_backend
from zr_kernels._types import ScoreDist, stats_dtype
from zr_kernels.checks import check_float_tensor, check_positive_float
from zr_kernels._validation import as_token_ids, as_values, check_target, ids_on_device, repeated_ids
from zr_kernels.kernels.score_distribution import score_distribution_bwd, score_distribution_fwd


def _forward(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, target: Optional[torch.Tensor],
             temperature: float, repeats: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                           torch.Tensor]:
    return score_distribution_fwd(logits, ids, values, target, temperature, repeats)


def _fake(logits, ids, values, target, temperature, repeats):
    n_rows, n_bins, dtype = logits.shape[0], ids.shape[0], stats_dtype(logits.dtype)
    row = logits.new_empty(n_rows, dtype=dtype)
    nll = logits.new_empty(n_rows if target is not None else 0, dtype=dtype)
    return logits.new_empty(n_rows, n_bins, dtype=dtype), row, row.clone(), nll


def _launch_backward(
    grad_probs: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor], grad_std: Optional[torch.Tensor],
    grad_nll: Optional[torch.Tensor], probs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
    target: Optional[torch.Tensor], ids: torch.Tensor, values: torch.Tensor, temperature: float, vocab_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return score_distribution_bwd(grad_probs, grad_mean, grad_std, grad_nll, probs, mean, std, target, ids, values,
                                  temperature, vocab_size, dtype)


def _backward_fake(grad_probs, grad_mean, grad_std, grad_nll, probs, mean, std, target, ids, values, temperature,
                   vocab_size, dtype):
    return probs.new_empty(probs.shape[0], vocab_size, dtype=dtype)


def _setup_context(ctx, inputs, output):
    logits, ids, values, target, temperature, _ = inputs
    probs, mean, std, _ = output
    ctx.save_for_backward(probs, mean, std, target, ids, values)
    ctx.temperature, ctx.vocab_size, ctx.dtype = temperature, logits.shape[1], logits.dtype
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros allocated or read


def _backward(ctx, kernels, grad_probs, grad_mean, grad_std, grad_nll):
    probs, mean, std, target, ids, values = ctx.saved_tensors
    grad_nll = grad_nll if target is not None else None  # without a target, nll is an empty placeholder
    grads = (None if g is None else g.to(probs.dtype) for g in (grad_probs, grad_mean, grad_std, grad_nll))
    grad_logits = kernels.backward(*grads, probs, mean, std, target, ids, values, ctx.temperature, ctx.vocab_size,
                                   ctx.dtype)
    return grad_logits, None, None, None, None, None


_score_distribution_route = fused_op("score_distribution", _forward, _fake, _setup_context, _backward,
                                     {"backward": Kernel(_launch_backward, _backward_fake)})


def _as_rows(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[M, V]`` view of ``logits`` (any strides), or, when the leading dims cannot be merged without a
    copy, the gathered ``[M, K]`` slice (a small copy) with ids ``0..K-1``, NaN in the columns of ids outside
    ``[0, V)`` (which are not read: indexing with them would be an error on the device)."""
    vocab_size = logits.shape[-1]
    if logits.dim() == 2:
        return logits, ids
    try:
        return logits.view(-1, vocab_size), ids
    except RuntimeError:
        in_range = (ids >= 0) & (ids < vocab_size)
        gathered = logits[..., torch.where(in_range, ids, 0)].reshape(-1, ids.numel())
        gathered = gathered.masked_fill(~in_range, float("nan"))
        return gathered, torch.arange(ids.numel(), device=ids.device)


def score_distribution(logits, token_ids, values, target=None, temperature=1.0, *, backend=None) -> ScoreDist:
    """Score-bin distribution from next-token logits, fused.

    Replaces::

        z = logits[..., token_ids].float() / temperature
        probs = z.softmax(-1); mean = probs @ values
        std = ((probs * (values - mean[..., None]) ** 2).sum(-1)).sqrt()
        nll = -z.log_softmax(-1).gather(-1, target[..., None])[..., 0]

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16, any strides (e.g. ``logits[:, -1, :]``).
        token_ids: ``[K]`` unique ids of the score tokens (list or int64 tensor). A list or CPU tensor is checked
            on the host (ValueError); a CUDA tensor on the device: an id out of range or repeated gives NaN.
        values: ``[K]`` score of each bin (e.g. 1.0, 1.5, …, 5.0).
        target: optional ``[...]`` bin index per row; gives ``nll`` (the per-row term of Eq. 8).
        temperature: divides the K logits before the softmax.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env ``ZR_KERNELS_BACKEND`` or auto).

    Returns ``ScoreDist(probs [..., K], mean [...], std [...], nll [...] | None)``, fp32 (fp64 for fp64
    logits), differentiable
    w.r.t. ``logits``. Bytes: reads ``M·K`` logits, writes ``4·(M·K + 3M)``; backward writes the K score
    columns of a zero-filled ``[M, V]`` gradient.
    """
    check_float_tensor("logits", logits, min_ndim=1)
    ids = as_token_ids(token_ids, logits.shape[-1], logits.device)
    values = as_values(values, ids.numel(), logits.device, stats_dtype(logits.dtype))
    temperature = check_positive_float("temperature", temperature)
    lead_shape = logits.shape[:-1]
    if target is not None:
        check_target(target, lead_shape, ids.numel(), logits.device)

    if resolve_backend("score_distribution", backend, logits.device) == "reference":
        note("score_distribution", "reference")
        return reference.score_distribution(logits, ids, values, target, temperature)
    repeats = repeated_ids(ids) if ids_on_device(token_ids) else None
    rows, row_ids = _as_rows(logits, ids)
    target_rows = target.reshape(-1) if target is not None else None
    probs, mean, std, nll = _score_distribution_route(rows, row_ids, values, target_rows, temperature, repeats,
                                                      needs_grad=logits.requires_grad)
    nll = nll if target is not None else None
    if logits.dim() == 2:  # rows are already the caller's shape
        return ScoreDist(probs, mean, std, nll)
    return ScoreDist(probs.view(*lead_shape, ids.numel()), mean.view(lead_shape), std.view(lead_shape),
                     nll.view(lead_shape) if nll is not None else None)

