"""Aggregation functions A(.) of Eq. 20: per-dimension expected scores [B, D] -> one reward per image [B].

Each function takes ``rewards [B, D]`` plus optional per-dimension ``weights [D]`` (non-negative, any scale:
they are normalised to sum to 1) and keyword options, and is differentiable w.r.t. ``rewards``.
Look them up by name with :func:`get_aggregator`; register new ones with :func:`register_aggregator`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Aggregator = Callable[..., torch.Tensor]
AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(name: str) -> Callable[[Aggregator], Aggregator]:
    def wrap(fn: Aggregator) -> Aggregator:
        if name in AGGREGATORS:
            raise ValueError(f"aggregator {name!r} is already registered")
        AGGREGATORS[name] = fn
        return fn
    return wrap


def get_aggregator(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"aggregation must be one of {tuple(sorted(AGGREGATORS))}, got {name!r}")
    return AGGREGATORS[name]


def _weights(rewards: torch.Tensor, weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, D], got {tuple(rewards.shape)}")
    n_dims = rewards.shape[1]
    if weights is None:
        return rewards.new_full((n_dims,), 1.0 / n_dims)
    w = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if w.shape != (n_dims,):
        raise ValueError(f"weights must have shape ({n_dims},) (one per dimension), got {tuple(w.shape)}")
    if w.device.type == "cpu" and (bool((w < 0).any()) or not float(w.sum()) > 0):
        raise ValueError("weights must be non-negative with a positive sum")
    return w / w.sum()


@register_aggregator("weighted_mean")
def weighted_mean(rewards: torch.Tensor, weights=None) -> torch.Tensor:
    """``sum_d w_d r_d`` with ``w`` normalised to sum to 1 (plain mean when ``weights`` is None)."""
    return rewards @ _weights(rewards, weights)


@register_aggregator("min")
def minimum(rewards: torch.Tensor, weights=None) -> torch.Tensor:
    """The worst dimension, ``min_d r_d`` over dimensions with a positive weight (gradient to the argmin only)."""
    w = _weights(rewards, weights)
    return rewards.masked_fill(w == 0, float("inf")).amin(dim=1)


@register_aggregator("soft_min")
def soft_min(rewards: torch.Tensor, weights=None, temperature: float = 0.5) -> torch.Tensor:
    """``-tau * log sum_d w_d exp(-r_d / tau)``: between ``min`` (tau -> 0) and ``weighted_mean`` (tau -> inf).

    Unlike ``min`` every dimension gets gradient, the weakest ones most (softmax(-r / tau) weights).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    w = _weights(rewards, weights)
    return -temperature * torch.logsumexp(-rewards / temperature + w.log(), dim=1)
