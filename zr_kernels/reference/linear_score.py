"""PyTorch twin of ``zr_kernels.linear_score`` (same signature, forms the K logits with a matmul)."""
from __future__ import annotations

import torch

from zr_kernels._types import ScoreDist
from zr_kernels.reference.score_distribution import score_distribution


def linear_score(hidden, weight, values, token_ids=None, bias=None, temperature=1.0, target=None) -> ScoreDist:
    """``score_distribution(hidden @ weight[token_ids].T + bias[token_ids], range(K), values, target, temperature)``."""
    if token_ids is not None:
        ids = torch.as_tensor(token_ids, dtype=torch.int64, device=weight.device)
        weight = weight[ids]
        bias = bias[ids] if bias is not None else None
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return score_distribution(logits, torch.arange(weight.shape[0], device=hidden.device), values, target,
                              temperature)
