"""Builds what a ReFL run needs from its config: the generator adapter and the frozen student reward."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from zreward.experiments.tiny_models import tiny_zimage_pipeline
from zreward.refl.adapters import ADAPTERS, FlowMatchAdapter
from zreward.refl.config import ReFLConfig


def student_reward_fn(scorer, dimensions: Sequence[str]):
    """``reward_fn(images, prompts) -> [B, len(dimensions)]``: the student's expected scores mu_phi (Eq. 16),
    every dimension in one batched forward pass (``RewardScorer.student_scores``), differentiable w.r.t. images."""
    dimensions = tuple(dimensions)

    def reward_fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return scorer.student_scores(images, prompts, dimensions).mean

    return reward_fn


def resolve_device(config: ReFLConfig) -> torch.device:
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_adapter(config: ReFLConfig) -> FlowMatchAdapter:
    dtype, device = getattr(torch, config.dtype), resolve_device(config)
    adapter_cls = ADAPTERS[config.pipeline]
    kwargs = dict(guidance_scale=config.guidance_scale, max_sequence_length=config.max_sequence_length)
    if config.tiny:
        pipe = tiny_zimage_pipeline(seed=config.seed).to(device)
        return adapter_cls(pipe if dtype == torch.float32 else pipe.to(dtype=dtype), **kwargs)
    return adapter_cls.from_pretrained(config.model_path, torch_dtype=dtype, device=device, **kwargs)


def frozen_scorer(config: ReFLConfig):
    """The frozen student ``RewardScorer``: the model folder at ``scorer_path`` (its score vocabulary and rubric
    checked when it has ``zreward_model.json``), or tiny random weights with ``tiny = true`` and no
    ``scorer_path``."""
    from zreward.deploy.model_folder import load_model_folder
    from zreward.scoring.scorer import RewardScorer
    from zreward.scoring.vocab import ScoreVocab

    dtype, device = getattr(torch, config.dtype), resolve_device(config)
    if config.scorer_path:
        return load_model_folder(config.scorer_path, device=device, dtype=config.dtype, require_metadata=False)
    from zreward.experiments.tiny_models import tiny_qwen35

    model, processor = tiny_qwen35(seed=config.seed + 1)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))
