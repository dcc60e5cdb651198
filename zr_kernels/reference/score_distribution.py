"""PyTorch twin of ``zr_kernels.score_distribution`` (same signature, no fusion)."""
from __future__ import annotations

import torch

from zr_kernels._types import ScoreDist, stats_dtype


def safe_sqrt(var: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0, so a one-hot distribution has a finite std gradient."""
    positive = var > 0
    return torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)


def score_distribution(logits, token_ids, values, target=None, temperature=1.0) -> ScoreDist:
    """``softmax(logits[..., token_ids] / T)`` with its mean, std and ``-log p[target]``, in fp32 (fp64 for fp64)."""
    stats = stats_dtype(logits.dtype)
    values = torch.as_tensor(values, dtype=stats, device=logits.device).detach()
    ids = torch.as_tensor(token_ids, dtype=torch.int64, device=logits.device)
    z = logits[..., ids].to(stats) / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    probs = log_probs.exp()
    mean = probs @ values
    var = (probs * (values - mean.unsqueeze(-1)) ** 2).sum(-1)
    nll = None
    if target is not None:
        nll = -log_probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return ScoreDist(probs, mean, safe_sqrt(var), nll)
