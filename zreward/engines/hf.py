"""The default engine: the scorer's own transformers model, in this process (nothing extra to install)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from zr_kernels import ScoreDist
from zreward.engines.base import InferenceEngine
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import RewardScorer, Rollouts


class HFEngine(InferenceEngine):
    """``RewardScorer.teacher_rollouts`` (HF ``generate``) and ``student_scores`` under ``no_grad``.

    The engine runs the training model itself, so ``sync_weights`` has nothing to copy.
    """

    name = "hf"

    def __init__(self, scorer: RewardScorer):
        if not isinstance(scorer, RewardScorer):
            raise TypeError(f"scorer must be a RewardScorer, got {type(scorer).__name__}")
        self.scorer = scorer

    def teacher_rollouts(self, images, prompts, dimension, num_samples, max_new_tokens, temperature=1.0, *,
                         min_new_tokens=0) -> Rollouts:
        return self.scorer.teacher_rollouts(images, prompts, dimension, num_samples, max_new_tokens, temperature,
                                            min_new_tokens=min_new_tokens)

    @torch.no_grad()  # not inference_mode: the fused ops cache tensors that training uses later
    def student_scores(self, images: torch.Tensor, prompts: Sequence[str],
                       dimensions: Sequence[str] = DIMENSIONS) -> ScoreDist:
        return self.scorer.student_scores(images, prompts, dimensions)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: generation runs on the training model's own parameters."""
