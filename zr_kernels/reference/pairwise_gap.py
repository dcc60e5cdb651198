"""PyTorch twins of ``zr_kernels.pairwise_gap`` and ``zr_kernels.gdso_rewards`` (same signatures, no fusion)."""
from __future__ import annotations

import torch

from zr_kernels._types import PairGap, stats_dtype


def _gap_terms(mu_w: torch.Tensor, mu_l: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """``|d_ik| = |(mu_w[p, i] - mu_l[p, k]) - gap[p]|`` as ``[P, G, G]`` (torch.abs has sign(0) = 0)."""
    stats = stats_dtype(mu_w.dtype, mu_l.dtype)
    diff = mu_w.to(stats)[:, :, None] - mu_l.to(stats)[:, None, :]
    return (diff - gap.detach().to(stats)[:, None, None]).abs()


def pairwise_gap(mu_w, mu_l, gap, score_range) -> PairGap:
    """Eq. 11 loss per pair (differentiable w.r.t. ``mu_w``, ``mu_l``) and the detached Eq. 10 rewards, in fp32
    (fp64 for fp64 inputs)."""
    group_size = mu_w.shape[1]
    terms = _gap_terms(mu_w, mu_l, gap)
    # Eq. 11's j = l term is the j = w term with i and k swapped, so the 1/2 cancels the double sum.
    loss = terms.sum((1, 2)) / (group_size * group_size * score_range)
    terms = terms.detach()
    reward_w = 1.0 - terms.sum(2) / (group_size * score_range)
    reward_l = 1.0 - terms.sum(1) / (group_size * score_range)
    return PairGap(loss, reward_w, reward_l)


def gdso_rewards(mu_w, mu_l, s_w, s_l, score_min, score_max, lambda_pt, lambda_pw):
    """Eq. 13: ``lambda_pt`` · Eq. 7 + ``lambda_pw`` · Eq. 10 for each side, ``[P, G]``, detached."""
    score_range = score_max - score_min
    stats = stats_dtype(mu_w.dtype, mu_l.dtype)
    s_w, s_l = s_w.detach().to(stats), s_l.detach().to(stats)
    _, pw_w, pw_l = pairwise_gap(mu_w.detach(), mu_l.detach(), s_w - s_l, score_range)
    pt_w = 1.0 - (mu_w.detach().to(stats) - s_w[:, None]).abs() / score_range
    pt_l = 1.0 - (mu_l.detach().to(stats) - s_l[:, None]).abs() / score_range
    return lambda_pt * pt_w + lambda_pw * pw_w, lambda_pt * pt_l + lambda_pw * pw_l
