"""``pairwise_gap`` / ``gdso_rewards``: GDSO's pairwise score-gap loss and rewards (paper Eq. 7, 10, 11, 13)."""
from __future__ import annotations

import math

import torch

from zr_kernels import reference
from zr_kernels._backend import Kernel, fused_op, note, resolve_backend
from zr_kernels._types import PairGap, stats_dtype
from zr_kernels.checks import (check_choice, check_float_in, check_float_tensor, check_positive_float,
                               check_same_device, check_shape)
from zr_kernels.kernels.pairwise_gap import MAX_GROUP_SIZE, gdso_rewards_fwd, pairwise_gap_bwd, pairwise_gap_fwd


def _forward(mu_w: torch.Tensor, mu_l: torch.Tensor, gap: torch.Tensor,
             score_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pairwise_gap_fwd(mu_w, mu_l, gap, score_range)


def _fake(mu_w, mu_l, gap, score_range):
    dtype = stats_dtype(mu_w.dtype, mu_l.dtype)
    rewards = mu_w.new_empty(mu_w.shape, dtype=dtype)
    return mu_w.new_empty(mu_w.shape[0], dtype=dtype), rewards, rewards.clone()


def _launch_backward(grad_loss: torch.Tensor, mu_w: torch.Tensor, mu_l: torch.Tensor, gap: torch.Tensor,
                     score_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    return pairwise_gap_bwd(grad_loss, mu_w, mu_l, gap, score_range)


def _backward_fake(grad_loss, mu_w, mu_l, gap, score_range):
    return mu_w.new_empty(mu_w.shape), mu_l.new_empty(mu_l.shape)


def _setup_context(ctx, inputs, output):
    mu_w, mu_l, gap, score_range = inputs
    _, reward_w, reward_l = output
    ctx.mark_non_differentiable(reward_w, reward_l)
    ctx.save_for_backward(mu_w, mu_l, gap)
    ctx.score_range = score_range
    ctx.set_materialize_grads(False)


def _backward(ctx, kernels, grad_loss, grad_reward_w, grad_reward_l):
    if grad_loss is None:
        return None, None, None, None
    mu_w, mu_l, gap = ctx.saved_tensors
    grad_loss = grad_loss.to(stats_dtype(mu_w.dtype, mu_l.dtype))
    grad_w, grad_l = kernels.backward(grad_loss, mu_w, mu_l, gap, ctx.score_range)
    return grad_w, grad_l, None, None


_pairwise_gap_route = fused_op("pairwise_gap", _forward, _fake, _setup_context, _backward,
                               {"backward": Kernel(_launch_backward, _backward_fake)})


def _gdso_rewards(mu_w: torch.Tensor, mu_l: torch.Tensor, s_w: torch.Tensor, s_l: torch.Tensor,
                  score_range: float, lambda_pt: float, lambda_pw: float) -> tuple[torch.Tensor, torch.Tensor]:
    return gdso_rewards_fwd(mu_w, mu_l, s_w, s_l, score_range, lambda_pt, lambda_pw)


def _gdso_rewards_fake(mu_w, mu_l, s_w, s_l, score_range, lambda_pt, lambda_pw):
    dtype = stats_dtype(mu_w.dtype, mu_l.dtype)
    return mu_w.new_empty(mu_w.shape, dtype=dtype), mu_w.new_empty(mu_w.shape, dtype=dtype)


_gdso_rewards_route = fused_op("gdso_rewards", _gdso_rewards, _gdso_rewards_fake)


def _check_pairs(mu_w, mu_l, **per_pair: torch.Tensor) -> None:
    """``mu_w``, ``mu_l`` float ``[P, G]`` with ``1 <= G <= MAX_GROUP_SIZE``; each ``per_pair`` tensor float ``[P]``."""
    check_float_tensor("mu_w", mu_w, ndim=2)
    check_float_tensor("mu_l", mu_l, ndim=2)
    for name, t in per_pair.items():
        check_float_tensor(name, t, ndim=1)
    check_same_device("mu_w", mu_w, mu_l=mu_l, **per_pair)
    n_pairs, group_size = mu_w.shape
    check_shape("mu_l", mu_l, (n_pairs, group_size), "[P, G] like mu_w")
    for name, t in per_pair.items():
        check_shape(name, t, (n_pairs,), "one value per pair, P = mu_w.shape[0]")
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"mu_w must have a group size G (dim 1) in [1, {MAX_GROUP_SIZE}], got {group_size}")


def pairwise_gap(mu_w, mu_l, gap, score_range, *, backend=None) -> PairGap:
    """Pairwise score-gap loss (Eq. 11) and rewards (Eq. 10) over all ``G × G`` cross-side pairs, fused.

    Replaces::

        d = (mu_w.float()[:, :, None] - mu_l.float()[:, None, :]) - gap.float()[:, None, None]   # [P, G, G]
        loss = d.abs().sum((1, 2)) / (G * G * score_range)          # = Eq. 11: its two j-terms are equal
        reward_w = 1 - d.abs().sum(2).detach() / (G * score_range)  # Eq. 10, j = w
        reward_l = 1 - d.abs().sum(1).detach() / (G * score_range)  # Eq. 10, j = l (|mu_l - mu_w + gap|)

    without materialising the ``[P, G, G]`` tensor.

    Args:
        mu_w, mu_l: ``[P, G]`` expected scores of the G sampled outputs of the winner / loser, fp32/bf16/fp16,
            any strides; ``G <= 4096``.
        gap: ``[P]`` annotated gaps ``s_w - s_l`` (a constant: no gradient).
        score_range: ``S_max - S_min > 0``.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env ``ZR_KERNELS_BACKEND`` or auto).

    Returns ``PairGap(loss [P], reward_w [P, G], reward_l [P, G])``, fp32 (fp64 for fp64 inputs); ``loss`` is
    differentiable w.r.t. ``mu_w`` and ``mu_l`` (``sign(0) = 0`` at ties), the rewards are detached.
    Bytes: reads ``2·P·G + P`` inputs, writes ``4·(P + 2·P·G)``; backward reads the same inputs and writes
    both ``[P, G]`` gradients.
    """
    _check_pairs(mu_w, mu_l, gap=gap)
    score_range = check_positive_float("score_range", score_range)
    if resolve_backend("pairwise_gap", backend, mu_w.device) == "reference":
        note("pairwise_gap", "reference")
        return reference.pairwise_gap(mu_w, mu_l, gap, score_range)
    needs_grad = mu_w.requires_grad or mu_l.requires_grad
    return PairGap(*_pairwise_gap_route(mu_w, mu_l, gap.detach(), score_range, needs_grad=needs_grad))


def gdso_rewards(mu_w, mu_l, s_w, s_l, score_min, score_max, lambda_pt, lambda_pw, *, backend=None):
    """GDSO rewards (Eq. 13) of every sampled output: pointwise (Eq. 7) plus pairwise (Eq. 10), fused.

    Replaces::

        R = score_max - score_min
        _, pw_w, pw_l = pairwise_gap(mu_w, mu_l, s_w - s_l, R)                 # Eq. 10
        r_w = lambda_pt * (1 - (mu_w - s_w[:, None]).abs() / R) + lambda_pw * pw_w  # Eq. 7, 13
        r_l = lambda_pt * (1 - (mu_l - s_l[:, None]).abs() / R) + lambda_pw * pw_l

    in one launch of the ``pairwise_gap`` forward kernel (no loss written).

    Args:
        mu_w, mu_l: ``[P, G]`` expected scores (any float dtype, any strides); ``s_w, s_l``: ``[P]`` annotated scores.
        score_min, score_max: the score range (``score_max > score_min``); ``lambda_pt, lambda_pw``: Eq. 13 weights.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env ``ZR_KERNELS_BACKEND`` or auto).

    Returns ``(r_w, r_l)``, ``[P, G]`` fp32 (fp64 for fp64 inputs), detached.
    Bytes: reads ``2·P·G + 2P`` inputs, writes ``8·P·G``.
    """
    _check_pairs(mu_w, mu_l, s_w=s_w, s_l=s_l)
    score_min = check_float_in("score_min", score_min, -math.inf, math.inf)
    score_max = check_float_in("score_max", score_max, -math.inf, math.inf)
    if not (score_min < score_max and math.isfinite(score_max - score_min)):
        raise ValueError(f"score_max must be finite and greater than score_min, got [{score_min}, {score_max}]")
    lambda_pt = check_float_in("lambda_pt", lambda_pt, -math.inf, math.inf)
    lambda_pw = check_float_in("lambda_pw", lambda_pw, -math.inf, math.inf)
    if resolve_backend("gdso_rewards", backend, mu_w.device) == "reference":
        note("gdso_rewards", "reference")
        return reference.gdso_rewards(mu_w, mu_l, s_w, s_l, score_min, score_max, lambda_pt, lambda_pw)
    # Rewards are constants of the policy-gradient loss: never part of the autograd graph.
    return _gdso_rewards_route(mu_w.detach(), mu_l.detach(), s_w.detach(), s_l.detach(), score_max - score_min,
                               lambda_pt, lambda_pw)


class PairwiseGapLoss(torch.nn.Module):
    """Eq. 11 as a loss module: ``PairwiseGapLoss(score_range)(mu_w, mu_l, gap)``, reduced over pairs.

    ``reduction``: ``"mean"`` (default) | ``"sum"`` | ``"none"`` (the ``[P]`` per-pair losses).
    """

    def __init__(self, score_range: float, reduction: str = "mean", *, backend: str | None = None):
        super().__init__()
        self.score_range = check_positive_float("score_range", score_range)
        self.reduction = check_choice("reduction", reduction, ("mean", "sum", "none"))
        self.backend = backend

    def forward(self, mu_w: torch.Tensor, mu_l: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        loss = pairwise_gap(mu_w, mu_l, gap, self.score_range, backend=self.backend).loss
        if self.reduction == "none":
            return loss
        return loss.mean() if self.reduction == "mean" else loss.sum()

    def extra_repr(self) -> str:
        return f"score_range={self.score_range}, reduction={self.reduction!r}"
