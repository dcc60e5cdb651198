"""``slice_kl``: distil a teacher's score-bin distribution into a student's (paper Eq. 15, RISD)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from zr_kernels import reference
from zr_kernels._backend import Kernel, fused_op, note, resolve_backend
from zr_kernels.checks import (check_choice, check_float_in, check_float_tensor, check_positive_float,
                               check_same_device, check_shape)
from zr_kernels._validation import as_token_ids, ids_on_device, repeated_ids
from zr_kernels.kernels.slice_kl import slice_kl_bwd, slice_kl_fwd
from zr_kernels.reference.slice_kl import REDUCTIONS, reduce_rows

NORMALIZATIONS = ("slice", "vocab")


def _forward(student_logits: torch.Tensor, teacher_probs: torch.Tensor, ids: torch.Tensor, vocab_norm: bool,
             beta: float, temperature: float, repeats: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return slice_kl_fwd(student_logits, teacher_probs, ids, vocab_norm, beta, temperature, repeats)


def _fake(student_logits, teacher_probs, ids, vocab_norm, beta, temperature, repeats):
    loss = student_logits.new_empty(student_logits.shape[0], dtype=torch.float32)
    return loss, loss.clone()


def _launch_backward(grad_loss: torch.Tensor, student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                     ids: torch.Tensor, lse: torch.Tensor, vocab_norm: bool, beta: float,
                     temperature: float) -> torch.Tensor:
    return slice_kl_bwd(grad_loss, student_logits, teacher_probs, ids, lse, vocab_norm, beta, temperature)


def _backward_fake(grad_loss, student_logits, teacher_probs, ids, lse, vocab_norm, beta, temperature):
    return student_logits.new_empty(student_logits.shape)


def _setup_context(ctx, inputs, output):
    student_logits, teacher_probs, ids, vocab_norm, beta, temperature, _ = inputs
    loss, lse = output
    # The logits are saved by reference (no copy); the backward recomputes the student distribution from them
    # and the O(N) log-sum-exp, which is an internal output: nothing flows back through it.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(student_logits, teacher_probs, ids, lse)
    ctx.vocab_norm, ctx.beta, ctx.temperature = vocab_norm, beta, temperature
    ctx.set_materialize_grads(False)


def _backward(ctx, kernels, grad_loss, grad_lse):
    if grad_loss is None:
        return None, None, None, None, None, None, None
    student_logits, teacher_probs, ids, lse = ctx.saved_tensors
    grad_logits = kernels.backward(grad_loss.float(), student_logits, teacher_probs, ids, lse, ctx.vocab_norm,
                                   ctx.beta, ctx.temperature)
    return grad_logits, None, None, None, None, None, None


_slice_kl_route = fused_op("slice_kl", _forward, _fake, _setup_context, _backward,
                           {"backward": Kernel(_launch_backward, _backward_fake)})


def slice_kl(student_logits, teacher_probs, token_ids, normalize="slice", beta=0.0, temperature=1.0,
             reduction="batchmean", *, backend=None) -> torch.Tensor:
    """KL divergence (or TRL's generalized JSD) between teacher and student score-bin distributions, fused.

    Replaces (``normalize="slice"``, ``beta=0``, the RISD loss of Eq. 15)::

        log_q = (student_logits[:, token_ids].float() / temperature).log_softmax(-1)
        loss = F.kl_div(log_q, teacher_probs, reduction=reduction)   # 0·log 0 = 0 where p = 0; "none" sums K

    ``normalize="vocab"`` takes ``log_q = (student_logits.float() / temperature).log_softmax(-1)[:, token_ids]``
    instead, so probability mass the student puts off the score tokens is penalised. ``beta=1`` gives
    KL(student ‖ teacher); ``0 < beta < 1`` the generalized JSD of TRL's ``GKDTrainer.generalized_jsd_loss``,
    ``beta·KL(p ‖ m) + (1 − beta)·KL(q ‖ m)`` with ``m = beta·p + (1 − beta)·q`` (slice mode only).

    Args:
        student_logits: ``[N, V]`` fp32/bf16/fp16, any strides (e.g. ``logits[:, -1, :]``).
        teacher_probs: ``[N, K]`` teacher distribution over the score bins, used as given (no gradient).
        token_ids: ``[K]`` unique ids of the score tokens (list or int64 tensor). A list or CPU tensor is checked
            on the host (ValueError); a CUDA tensor on the device: an id out of range or repeated gives NaN.
        normalize: ``"slice"`` (softmax over the K score logits) | ``"vocab"`` (log-softmax over all V).
        beta: in ``[0, 1]``; must be 0 with ``normalize="vocab"``.
        temperature: divides the student logits (all V of them in vocab mode).
        reduction: ``"none"`` (``[N]``) | ``"sum"`` | ``"mean"`` (over ``N·K``) | ``"batchmean"`` (over N).
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env ``ZR_KERNELS_BACKEND`` or auto).

    Returns the fp32 loss, differentiable w.r.t. ``student_logits``. Bytes, slice mode: reads ``N·K`` logits and
    teacher probabilities, writes ``8N``; backward writes the K score columns of a zero-filled ``[N, V]``
    gradient. Vocab mode reads all ``N·V`` logits once forward and once backward, and writes the ``[N, V]``
    gradient in the logits' dtype.
    """
    check_float_tensor("student_logits", student_logits, ndim=2)
    check_float_tensor("teacher_probs", teacher_probs, ndim=2)
    check_same_device("student_logits", student_logits, teacher_probs=teacher_probs)
    ids = as_token_ids(token_ids, student_logits.shape[1], student_logits.device)
    check_shape("teacher_probs", teacher_probs, (student_logits.shape[0], ids.numel()),
                "one probability per row of student_logits and per token id")
    check_choice("normalize", normalize, NORMALIZATIONS)
    beta = check_float_in("beta", beta, 0.0, 1.0)
    if beta > 0 and normalize == "vocab":
        raise ValueError(f"beta must be 0 with normalize='vocab' (KL(teacher || student) only), got {beta}")
    temperature = check_positive_float("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)

    if resolve_backend("slice_kl", backend, student_logits.device) == "reference":
        note("slice_kl", "reference")
        return reference.slice_kl(student_logits, teacher_probs, ids, normalize, beta, temperature, reduction)
    repeats = repeated_ids(ids) if ids_on_device(token_ids) else None
    per_row, _ = _slice_kl_route(student_logits, teacher_probs.detach(), ids, normalize == "vocab", beta, temperature,
                                 repeats, needs_grad=student_logits.requires_grad)
    return reduce_rows(per_row, reduction, ids.numel())


class SliceKLLoss(nn.Module):
    """``slice_kl`` as a loss module holding the score-token ids and the options.

    >>> loss_fn = SliceKLLoss(score_token_ids)   # RISD: KL(teacher ‖ student) over the K score tokens
    >>> loss = loss_fn(logits[:, -1, :], teacher_probs)
    """

    def __init__(self, token_ids, normalize="slice", beta=0.0, temperature=1.0, reduction="batchmean", *,
                 backend=None):
        super().__init__()
        # A buffer, so .to(device) moves the ids with the module (no per-call host-to-device copy).
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.int64), persistent=False)
        self.normalize, self.beta, self.temperature = normalize, beta, temperature
        self.reduction, self.backend = reduction, backend

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        return slice_kl(student_logits, teacher_probs, self.token_ids, self.normalize, self.beta, self.temperature,
                        self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_bins={self.token_ids.numel()}, normalize={self.normalize!r}, beta={self.beta}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")
