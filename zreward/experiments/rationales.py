"""Post-hoc pseudo reasoning for the synthetic task (the ``rewarddance`` arm of ``zreward ablate``).

A rationale is written after the fact from an image's known label on one dimension, in the words of the tiny
tokenizer: a coarse severity and the dimension's defect (``zreward.experiments.synthetic``), e.g. " salient
colour" for an alignment score of 3.5. The severity has three steps for the nine score bins, so the rationale
gives the coarse direction of the label and the score token still has to place it on the half-point grid. Every
rationale is at most three tokens, so with its stop token it fits the ablation's four sampled reasoning tokens.
"""
from __future__ import annotations

import torch

from zreward.experiments.synthetic import MAX_LEVEL, SyntheticPreferences
from zreward.scoring.rubric import DIMENSIONS, check_dimension

# Defect levels 0-2, 3-5 and 6-8 (scores 5.0-4.0, 3.5-2.5, 2.0-1.0); words the rubric prompts use.
SEVERITIES = (" slight", " salient", " wrong")
# What each dimension's synthetic defect changes: the objects' colour (and count), pixel noise over the whole
# image, washed-out contrast, blocks punched out of the objects.
DEFECT_WORDS = {"alignment": " colour", "realism": " image", "aesthetics": " lighting", "plausibility": " object"}


def rationale(dimension: str, score: float) -> str:
    """The rationale for an annotated ``score`` (1.0..5.0 on the half-point grid) on ``dimension``."""
    level = round((5.0 - float(score)) * 2)
    if not 0 <= level <= MAX_LEVEL or abs(level - (5.0 - float(score)) * 2) > 1e-6:
        raise ValueError(f"score must be on the half-point grid 1.0..5.0, got {score!r}")
    return SEVERITIES[level * len(SEVERITIES) // (MAX_LEVEL + 1)] + DEFECT_WORDS[check_dimension(dimension)]


def label_rationales(data: SyntheticPreferences):
    """``(index, dimension) -> rationale`` from the labels of ``data``, for
    :class:`~zreward.training.rationale_sft.RationaleSFTTrainer`."""
    return lambda index, dimension: rationale(dimension, data.items[index].scores[dimension])


@torch.no_grad()
def reasoning_probe(scorer, data: SyntheticPreferences, device, max_new_tokens: int, batch_size: int = 16) -> dict:
    """One sampled reasoning per (image, dimension) of ``data``: ``tokens_per_score``, the mean output tokens per
    score (reasoning + the score token); ``rationale_format``, the fraction of reasoning texts that are one of the
    dimension's rationales; ``rationale_match``, the fraction that are the rationale of the image's own label.
    Reasoning that reads the image has ``rationale_match`` near ``rationale_format``; reasoning that has only
    learned the format has about a third of it (three severities)."""
    tokens, formatted, matches, count = 0.0, 0, 0, 0
    for dimension in DIMENSIONS:
        written = {severity + DEFECT_WORDS[dimension] for severity in SEVERITIES}
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            rollouts = scorer.teacher_rollouts(data.images(indices).to(device), data.prompts(indices), dimension, 1,
                                               max_new_tokens)
            tokens += float(rollouts.completion_mask.sum())
            formatted += sum(text in written for text in rollouts.completions)
            matches += sum(text == rationale(dimension, data.items[i].scores[dimension])
                           for i, text in zip(indices, rollouts.completions))
            count += len(indices)
    return {"tokens_per_score": tokens / count + 1, "rationale_format": formatted / count,
            "rationale_match": matches / count}
