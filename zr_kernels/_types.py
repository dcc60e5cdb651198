"""Result tuples shared by the fused ops and their references."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


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
