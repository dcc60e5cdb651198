"""``group_advantages``: GRPO group-relative advantages (paper Eq. 3), with the TRL / Dr. GRPO scale options."""
from __future__ import annotations

import math

import torch

from zr_kernels import reference
from zr_kernels._backend import fused_op, note, resolve_backend
from zr_kernels.checks import as_int, check_choice, check_float_in, check_float_tensor
from zr_kernels.kernels.group_advantages import SCALES, group_advantages_fwd


def _group_advantages(rewards: torch.Tensor, group_size: int, scale: str, unbiased: bool, eps: float) -> torch.Tensor:
    return group_advantages_fwd(rewards, group_size, scale, unbiased, eps)


def _fake(rewards, group_size, scale, unbiased, eps):
    return rewards.new_empty(rewards.shape[0], dtype=torch.float32)


_group_advantages_route = fused_op("group_advantages", _group_advantages, _fake)


def group_advantages(rewards, group_size, scale="group", unbiased=True, eps=1e-6, *, backend=None) -> torch.Tensor:
    """Group-relative advantages of ``rewards`` laid out as contiguous groups, fused.

    Replaces::

        r = rewards.float().view(-1, group_size)
        adv = r - r.mean(1, keepdim=True)
        std = r.std(1, keepdim=True, unbiased=unbiased)        # scale="group"
        std = r.std(unbiased=unbiased)                         # scale="batch"
        adv = (adv / (std + eps)).view(-1)                     # skipped for scale="none" (Dr. GRPO)

    with the variance taken in two passes (a constant group gives exactly 0) and a one-element group
    (or ``unbiased`` with one element) having std 0 instead of NaN; an exact ``0 / 0`` gives 0.
    With ``eps=1e-4`` and ``unbiased=True`` this is TRL's ``GRPOTrainer`` convention for ``scale_rewards``.

    Args:
        rewards: ``[N]`` fp32/bf16/fp16/fp64, any stride; rows ``g*G .. g*G+G-1`` form group ``g``.
        group_size: ``G``, a positive int dividing ``N``.
        scale: ``"group"`` | ``"batch"`` | ``"none"``: which std divides the centred rewards.
        unbiased: Bessel's correction (divide by ``count - 1``).
        eps: added to the std, ``>= 0``.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env ``ZR_KERNELS_BACKEND`` or auto).

    Returns fp32 advantages ``[N]`` that do not require grad. Bytes: reads ``N`` rewards (up to three passes
    per group, the later ones from cache), writes ``4N``; ``"batch"`` reads them once more and adds
    ``8·ceil(N / 4096)`` bytes of partials.
    """
    check_float_tensor("rewards", rewards, ndim=1)
    group_size = as_int("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} must divide the number of rewards N={rewards.shape[0]}")
    scale = check_choice("scale", scale, SCALES)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    eps = check_float_in("eps", eps, 0.0, math.inf)

    if resolve_backend("group_advantages", backend, rewards.device) == "reference":
        note("group_advantages", "reference")
        return reference.group_advantages(rewards, group_size, scale, unbiased, eps)
    # The advantages are constants of the policy-gradient loss: never part of the autograd graph.
    return _group_advantages_route(rewards.detach(), group_size, scale, unbiased, eps)
