"""Result tuples shared by the fused ops and their references."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def stats_dtype(*input_dtypes: torch.dtype) -> torch.dtype:
    """Statistics are fp32 for fp32/bf16/fp16 inputs and fp64 when an input is fp64 (so gradcheck is meaningful)."""
    dtype = torch.float32
    for input_dtype in input_dtypes:
        dtype = torch.promote_types(dtype, input_dtype)
    return dtype


class ScoreDist(NamedTuple):
    """A distribution over K score bins, per row: ``probs [..., K]``, ``mean``/``std``/``nll [...]`` (fp32)."""

    probs: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    nll: Optional[torch.Tensor]


class PairGap(NamedTuple):
    """Eq. 11 loss per pair ``[P]`` and the detached Eq. 10 rewards of each side ``[P, G]`` (fp32)."""

    loss: torch.Tensor
    reward_w: torch.Tensor
    reward_l: torch.Tensor
