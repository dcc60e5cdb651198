"""Held-out evaluation of the miniature's models, shared by ``zreward demo`` and ``zreward ablate``'s arms: PLCC,
SRCC and HPA (pooled over the four dimensions, and HPA per dimension) of a teacher's expected scores over sampled
reasoning or a student's one-token scores, on ``SyntheticPreferences``."""
from __future__ import annotations

import torch

from zreward.engines import make_engine
from zreward.experiments.synthetic import SyntheticPreferences
from zreward.metrics import reward_metrics
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import RewardScorer
from zreward.training.gdso import teacher_expected_scores


def teacher_engine(name: str, teacher: RewardScorer, seed: int):
    """The engine ``name`` for the tiny teacher; vLLM sampling from ``seed``, with a context for the tiny prompts
    (not the config's 256k, whose KV cache would not fit) and eager execution (compiling graphs takes longer
    than these models run)."""
    options = {"seed": seed, "max_model_len": 2048, "enforce_eager": True} if name == "vllm" else {}
    return make_engine(name, teacher, **options)


@torch.no_grad()
def teacher_metrics(teacher: RewardScorer, data: SyntheticPreferences, device: torch.device, samples: int,
                    max_new_tokens: int, engine="hf") -> dict:
    """``held_out_metrics`` of the teacher's expected scores over ``samples`` reasoning rollouts per row, sampled
    by ``engine`` (``zreward.engines``)."""
    everything = range(len(data))
    scores = teacher_expected_scores(teacher, data.images(everything).to(device), data.prompts(everything),
                                     DIMENSIONS, samples, max_new_tokens, engine=engine)
    return held_out_metrics(scores.cpu(), data)


@torch.no_grad()
def student_metrics(student: RewardScorer, data: SyntheticPreferences, device: torch.device) -> dict:
    """``held_out_metrics`` of the student's one-token expected scores (16 images per call)."""
    chunks = [list(range(i, min(i + 16, len(data)))) for i in range(0, len(data), 16)]
    scores = torch.cat([student.student_scores(data.images(c).to(device), data.prompts(c)).mean for c in chunks])
    return held_out_metrics(scores.cpu(), data)


def held_out_metrics(scores: torch.Tensor, data: SyntheticPreferences) -> dict:
    """Pooled over (image, dimension): PLCC/SRCC of scores, HPA over same-prompt same-dimension pairs;
    plus HPA per dimension."""
    preds, targets, groups = [], [], []
    per_dimension = {}
    for d, dimension in enumerate(DIMENSIONS):
        truth = data.scores(range(len(data)), dimension)
        group = [(item.group, dimension) for item in data.items]
        per_dimension[dimension] = reward_metrics(scores[:, d].tolist(), truth.tolist(), group)["hpa"]
        preds += scores[:, d].tolist()
        targets += truth.tolist()
        groups += group
    metrics = reward_metrics(preds, targets, groups)
    metrics["hpa_per_dimension"] = per_dimension
    return metrics
