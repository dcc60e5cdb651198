"""Reward functions in the shapes RL trainers call, backed by a model in this process or by reward servers.

A *backend* has ``score(images, prompts) -> list[record]`` (records as in ``zreward.deploy.engine``):

* :class:`LocalReward` scores in this process from a model folder;
* :class:`~zreward.deploy.client.RewardClient` sends them over HTTP to one or several replicas of
  ``zreward serve`` or of vLLM's OpenAI-compatible server running the model folder (least outstanding requests
  first, a failed request retried on another replica, errors raised, never scored).

The adapters wrap either one:

* :func:`flow_grpo_reward` - ``fn(images, prompts, metadata) -> (scores, info)`` as Flow-GRPO's reward
  functions, ``images`` float NCHW in [0, 1] or uint8 NHWC;
* :func:`verl_compute_score` / :func:`verl_batch_compute_score` - verl's ``compute_score`` (per sample, and the
  batched form of its ``BatchRewardManager``), the image and prompt in ``extra_info``;
* :func:`trl_reward_func` - ``reward_func(prompts, completions, **kwargs) -> list[float]`` as TRL's GRPO
  trainer takes, the completions being the generated images.

A float image sent to the service is rounded to 8 bits on the way (PNG), so a client's scores equal the local
ones for uint8 images and differ by that rounding for float images.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from zreward.deploy.client import RewardClient, RewardError
from zreward.scoring.rubric import check_prompts
from zreward.deploy.engine import Scoring, open_scorer, score_images
from zreward.deploy.images import split_images, to_float_chw

__all__ = ["LocalReward", "RewardClient", "RewardError", "flow_grpo_reward", "trl_reward_func",
           "verl_batch_compute_score", "verl_compute_score"]


class LocalReward:
    """Scores in this process: ``model`` is a model folder path or a loaded ``RewardScorer``."""

    def __init__(self, model, scoring: Scoring = Scoring(), device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 16):
        self.scorer = open_scorer(model, "hf", device, dtype) if isinstance(model, (str, Path)) else model
        self.scoring = scoring
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    def score(self, images, prompts: Sequence[str]) -> list[dict]:
        images = [to_float_chw(image, f"images[{i}]") for i, image in enumerate(split_images(images))]
        prompts = check_prompts(prompts, len(images))
        records = []
        for start in range(0, len(images), self.batch_size):
            rows = slice(start, start + self.batch_size)
            records += self.scoring.records(score_images(self.scorer, images[rows], prompts[rows],
                                                         self.scoring.dimensions))
        return records


def flow_grpo_reward(backend):
    """``fn(images, prompts, metadata) -> (scores, info)``: ``scores`` float32 ``[N]`` (the aggregated reward),
    ``info["dimensions"][name]`` float32 ``[N]`` expected scores per dimension. ``metadata`` is not used."""
    def reward_fn(images, prompts, metadata=None):
        records = backend.score(images, prompts)
        scores = np.array([r["reward"] for r in records], dtype=np.float32)
        names = records[0]["dimensions"] if records else ()
        info = {"dimensions": {d: np.array([r["dimensions"][d]["mean"] for r in records], dtype=np.float32)
                               for d in names}}
        return scores, info

    return reward_fn


def _sample_image(extra_info, index: int):
    if not isinstance(extra_info, dict) or "image" not in extra_info or not isinstance(extra_info.get("prompt"), str):
        raise ValueError(f"extra_infos[{index}] must be a dict with the generated 'image' (path, PIL image or array) "
                         "and its 'prompt'")
    image = extra_info["image"]
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image


def verl_batch_compute_score(backend):
    """verl's batched ``compute_score(data_sources, solution_strs, ground_truths, extra_infos) -> list[dict]``.

    Each ``extra_infos[i]`` holds the generated ``image`` and its ``prompt``; each result is
    ``{"score": reward, "<dimension>": expected score, ...}`` (verl logs the extra keys)."""
    def compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs):
        extra_infos = list(extra_infos)
        images = [_sample_image(info, i) for i, info in enumerate(extra_infos)]
        records = backend.score(images, [info["prompt"] for info in extra_infos])
        return [{"score": r["reward"], **{d: v["mean"] for d, v in r["dimensions"].items()}} for r in records]

    return compute_score


def verl_compute_score(backend):
    """verl's per-sample ``compute_score(data_source, solution_str, ground_truth, extra_info) -> dict``."""
    batched = verl_batch_compute_score(backend)

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        return batched([data_source], [solution_str], [ground_truth], [extra_info])[0]

    return compute_score


def _prompt_text(prompt, index: int) -> str:
    """A plain prompt, or the text of the last user turn of a conversational one (TRL's two prompt formats)."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"] if isinstance(prompt, list) else []
    if users:
        content = users[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(part["text"] for part in content if isinstance(part, dict) and part.get("type") == "text")
    raise ValueError(f"prompts[{index}] must be a string or a list of chat messages with a user turn")


def trl_reward_func(backend):
    """TRL's ``reward_func(prompts, completions, **kwargs) -> list[float]``, the completions being images."""
    def reward_func(prompts, completions, **kwargs):
        texts = [_prompt_text(p, i) for i, p in enumerate(prompts)]
        return [r["reward"] for r in backend.score(completions, texts)]

    reward_func.__name__ = "zreward"  # TRL logs each reward under its function's name
    return reward_func
