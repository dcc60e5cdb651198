"""The inference-engine interface: what the no-gradient paths ask of an engine, and the error it raises when it
cannot start."""
from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from zr_kernels import ScoreDist
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import Rollouts


class EngineUnavailable(ValueError):
    """An engine option that cannot be honoured here; the message says why (a missing extra, a model or dtype the
    backend does not run) and what to do instead. A ``ValueError``, so the command-line tools report it as they
    report any bad option."""


class InferenceEngine(abc.ABC):
    """Sampling and scoring without gradients, for a :class:`~zreward.scoring.scorer.RewardScorer`'s model.

    ``teacher_rollouts`` returns the scorer's own :class:`~zreward.scoring.scorer.Rollouts` (same prompts, stop and
    cut rules, answer prefix), so a trainer recomputes log-probs and score distributions under its model exactly
    as it does for HF rollouts. ``sync_weights`` makes the engine's weights the training model's.
    """

    name: str

    @abc.abstractmethod
    def teacher_rollouts(self, images: torch.Tensor, prompts: Sequence[str], dimension: str, num_samples: int,
                         max_new_tokens: int, temperature: float = 1.0, *, min_new_tokens: int = 0) -> Rollouts:
        """As :meth:`RewardScorer.teacher_rollouts <zreward.scoring.scorer.RewardScorer.teacher_rollouts>`."""

    @abc.abstractmethod
    def student_scores(self, images: torch.Tensor, prompts: Sequence[str],
                       dimensions: Sequence[str] = DIMENSIONS) -> ScoreDist:
        """Score distributions ``[B, len(dimensions), K]`` (no gradient), as ``RewardScorer.student_scores``."""

    @abc.abstractmethod
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (called after every optimizer step)."""

    def close(self) -> None:
        """Free what the engine holds (no-op by default)."""
