"""What ``zreward score`` and ``zreward serve`` share: scoring a list of images (one student forward per image
size) and turning the score distributions into result records.

A result record, one per image (the JSON of a ``zreward score`` line and of a ``/score`` result)::

    {"dimensions": {"realism": {"probs": [p_1, ..., p_K], "mean": mu, "std": sigma}, ...},
     "reward": A(mu_1, ..., mu_D), "aggregation": "weighted_mean"}

``mean`` is the expected score (Eq. 16) over the score bins, ``std`` the spread of the distribution, and
``reward`` the aggregation A of Eq. 20 over the requested dimensions (``zreward.refl.aggregation``).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from zr_kernels import ScoreDist
from zreward.deploy.model_folder import DTYPES, load_folder_processor, load_model_folder
from zreward.engines import ENGINES
from zreward.refl.aggregation import get_aggregator
from zreward.scoring.image_processing import target_size
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import RewardScorer
from zreward.training.distributed import unwrap_model


def open_scorer(model_dir, engine: str = "hf", device: str = "cpu", dtype: str = "float32",
                attn_implementation: str = "sdpa"):
    """The scorer behind ``--engine``: ``hf`` runs the transformers model in this process (a ``RewardScorer``);
    ``vllm`` a :class:`~zreward.engines.vllm.VLLMEngine` on the folder's weights (student scoring only; vLLM
    picks the device itself, ``attn_implementation`` is HF's and not used). Both check the folder's metadata."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "hf":
        return load_model_folder(model_dir, device, dtype, attn_implementation)
    from zreward.engines.vllm import VLLMEngine

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    processor, vocab = load_folder_processor(model_dir)
    return VLLMEngine(Path(model_dir), processor.tokenizer, processor.image_processor, vocab, dtype=dtype)


def context_length(scorer) -> int:
    """The most tokens the language model of ``scorer`` (what :func:`open_scorer` returns) reads in one sequence:
    ``max_position_embeddings`` of its text config."""
    if isinstance(scorer, RewardScorer):
        config = unwrap_model(scorer.model).config
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(scorer.model_path)
    return int(config.get_text_config().max_position_embeddings)


@dataclass(frozen=True)
class Scoring:
    """Which dimensions to score and how to aggregate them into ``reward`` (checked on construction)."""

    dimensions: tuple[str, ...] = DIMENSIONS
    aggregation: str = "weighted_mean"
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        dims = tuple(self.dimensions)
        unknown = [d for d in dims if d not in DIMENSIONS]
        if not dims or unknown or len(set(dims)) != len(dims):
            raise ValueError(f"dimensions must be distinct names from {DIMENSIONS}, got {list(dims)}")
        object.__setattr__(self, "dimensions", dims)
        get_aggregator(self.aggregation)
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if len(weights) != len(dims) or any(w < 0 for w in weights) or not sum(weights) > 0:
                raise ValueError(f"weights must be {len(dims)} non-negative numbers (one per dimension) with a "
                                 f"positive sum, got {list(weights)}")
            object.__setattr__(self, "weights", weights)

    def records(self, dist: ScoreDist, columns: Sequence[int] | None = None) -> list[dict]:
        """One result record per row of ``dist`` (``[B, D', K]``); ``columns`` pick this scoring's dimensions
        out of D' (default: ``dist`` holds exactly them, in order)."""
        columns = list(range(len(self.dimensions))) if columns is None else list(columns)
        probs, mean, std = (t[:, columns].float().cpu() for t in (dist.probs, dist.mean, dist.std))
        reward = get_aggregator(self.aggregation)(mean, self.weights).tolist()
        probs, mean, std = probs.tolist(), mean.tolist(), std.tolist()
        return [{"dimensions": {d: {"probs": probs[b][j], "mean": mean[b][j], "std": std[b][j]}
                                for j, d in enumerate(self.dimensions)},
                 "reward": reward[b], "aggregation": self.aggregation} for b in range(len(reward))]



def check_image(image: torch.Tensor, scorer, name: str = "image") -> torch.Tensor:
    """``image`` if it is a float ``[3, H, W]`` tensor the scorer's processor can resize, else a ValueError.

    Checked per image before batching, so one bad image fails alone instead of failing its whole batch.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.dim() != 3 \
            or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a float [3, H, W] tensor in [0, 1], got {shape}")
    target_size(image.shape[1], image.shape[2], scorer.image_processor)  # raises on extreme aspect ratios
    return image


@torch.no_grad()  # not inference_mode: tensors the ops cache while scoring must stay usable by training later
def score_images(scorer, images: Sequence[torch.Tensor], prompts: Sequence[str],
                 dimensions: Sequence[str]) -> ScoreDist:
    """Score distributions ``[B, len(dimensions), K]`` of float ``[3, H, W]`` images, in input order.

    ``scorer``: what :func:`open_scorer` returns. It takes one image size per call (``preprocess_images``), so
    the images are grouped by size and each group is one forward pass (one batch of requests for vLLM).
    """
    if len(images) != len(prompts) or not images:
        raise ValueError(f"images and prompts must be non-empty and of equal length, got {len(images)} and "
                         f"{len(prompts)}")
    groups = defaultdict(list)
    for index, image in enumerate(images):
        groups[tuple(image.shape)].append(index)
    # The HF model takes the images on its device in its dtype; vLLM takes them as they are (it gets 8-bit images).
    hf = isinstance(scorer, RewardScorer)
    parts = {}
    for indices in groups.values():
        pixels = torch.stack([images[i] for i in indices])
        if hf:
            pixels = pixels.to(device=scorer.lm_head_weight().device, dtype=scorer.lm_head_weight().dtype)
        dist = scorer.student_scores(pixels, [prompts[i] for i in indices], dimensions)
        parts.update({i: (dist.probs[n], dist.mean[n], dist.std[n]) for n, i in enumerate(indices)})
    probs, mean, std = (torch.stack([parts[i][k] for i in range(len(images))]) for k in range(3))
    return ScoreDist(probs, mean, std, None)
