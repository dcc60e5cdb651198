"""Reasoning-Internalized Score Distillation (paper Sec. 3.2, Algorithm 2, Eq. 15-16).

The teacher is frozen, so its reasoning and score distributions ``q_T(s | p, I, d, rho_T)`` are computed once
per (image, dimension) and cached on disk (:class:`TeacherCache`: safetensors for the distributions, a JSON
index for the prompts, dimensions and reasoning texts). The student then learns ``q_phi(s | p, I, d)`` from the
prompt alone with ``zr_kernels.slice_kl`` (KL(q_T || q_phi), Eq. 15) over the score tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import zr_kernels
from zreward.engines import make_engine
from zreward.scoring.rubric import DIMENSIONS
from zreward.training.base import TrainerBase
from zreward.training.checkpoint import save_tensors_atomic, write_json_atomic
from zreward.training.distributed import DistContext, all_reduce_mean

CACHE_TENSORS = "teacher_cache.safetensors"
CACHE_INDEX = "teacher_cache.json"


@dataclass
class RISDConfig:
    """Algorithm 2 hyperparameters (JSON-serialisable; stored in checkpoints)."""

    steps: int = 100             # M_dist: optimisation steps
    batch_size: int = 8          # images per rank per step; each is scored on every cached dimension
    lr: float = 1e-4             # AdamW learning rate
    weight_decay: float = 0.0    # AdamW weight decay
    max_grad_norm: float = 1.0   # gradients clipped to this global norm
    teacher_samples: int = 1     # reasoning rollouts per (image, dimension); their q_T are averaged
    teacher_max_new_tokens: int = 16  # teacher reasoning tokens per rollout at most
    teacher_temperature: float = 1.0  # temperature of the teacher's rollout sampling
    seed: int = 0                # data order (and the run's LoRA init and evaluation sampling)


class TeacherCache:
    """``probs [N, D, K]``: the frozen teacher's score distribution for item n and dimension d, with the
    prompts and sampled reasoning texts it was decoded from."""

    def __init__(self, probs: torch.Tensor, dimensions, prompts, reasoning, values: torch.Tensor):
        if probs.dim() != 3 or probs.shape[1] != len(dimensions) or probs.shape[0] != len(prompts):
            raise ValueError(f"probs must have shape [N={len(prompts)}, D={len(dimensions)}, K], "
                             f"got {tuple(probs.shape)}")
        self.probs, self.dimensions, self.prompts = probs, tuple(dimensions), list(prompts)
        self.reasoning, self.values = reasoning, values

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, data, dimensions=DIMENSIONS, num_samples: int = 1, max_new_tokens: int = 16,
              temperature: float = 1.0, batch_size: int = 16, engine="hf") -> "TeacherCache":
        """Algorithm 2 line 6 for every item of ``data`` (``len``, ``images(indices)``, ``prompts(indices)``):
        ``num_samples`` reasoning rollouts of the ``teacher`` scorer per (item, dimension), q_T averaged.

        ``engine`` samples them (``zreward.engines``): ``"hf"`` (default), ``"vllm"`` (an engine started for
        this build and shut down after it) or an :class:`~zreward.engines.InferenceEngine` (left running)."""
        teacher.model.eval()
        device = next(teacher.model.parameters()).device
        sampler = make_engine(engine, teacher)
        per_dimension, reasoning = [], {}
        try:
            for dimension in dimensions:
                probs, texts = [], []
                for start in range(0, len(data), batch_size):
                    indices = list(range(start, min(start + batch_size, len(data))))
                    rollouts = sampler.teacher_rollouts(data.images(indices).to(device), data.prompts(indices),
                                                        dimension, num_samples, max_new_tokens, temperature)
                    probs.append(rollouts.scores.probs.mean(1).float().cpu())
                    texts.extend(rollouts.completions[i * num_samples:(i + 1) * num_samples]
                                 for i in range(len(indices)))
                per_dimension.append(torch.cat(probs))
                reasoning[dimension] = texts
        finally:
            if sampler is not engine:  # started here: its memory is the student's next
                sampler.close()
        return cls(torch.stack(per_dimension, 1), dimensions, data.prompts(range(len(data))), reasoning,
                   teacher.vocab.values.clone())

    @classmethod
    def from_human_scores(cls, data, vocab, dimensions=DIMENSIONS) -> "TeacherCache":
        """One-hot targets at the annotated bins of ``data`` (``scores(indices, dimension)`` as in
        :class:`~zreward.experiments.synthetic.SyntheticPreferences`) instead of a teacher's distributions.

        KL(one-hot || q_phi) is ``-log q_phi(annotated bin)``, so :class:`RISDTrainer` on this cache is SFT of the
        student on the human scores alone: the paper's no-teacher baseline (Table 3), on the same code path.
        """
        indices = range(len(data))
        bins = torch.stack([vocab.bin_indices(data.scores(indices, d)) for d in dimensions], 1)
        probs = torch.nn.functional.one_hot(bins, vocab.num_bins).float()
        return cls(probs, dimensions, data.prompts(indices), {d: [[] for _ in indices] for d in dimensions},
                   vocab.values.clone())

    def save(self, directory) -> Path:
        """``<directory>/teacher_cache.safetensors`` + ``teacher_cache.json``, each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic({"probs": self.probs, "values": self.values}, directory / CACHE_TENSORS)
        write_json_atomic({"dimensions": list(self.dimensions), "prompts": self.prompts, "reasoning": self.reasoning,
                           "num_items": len(self.prompts), "num_bins": int(self.probs.shape[-1])},
                          directory / CACHE_INDEX)
        return directory

    @classmethod
    def load(cls, directory) -> "TeacherCache":
        from safetensors.torch import load_file

        directory = Path(directory)
        index = json.loads((directory / CACHE_INDEX).read_text())
        tensors = load_file(directory / CACHE_TENSORS)
        return cls(tensors["probs"], index["dimensions"], index["prompts"], index["reasoning"], tensors["values"])

    @classmethod
    def load_or_build(cls, directory, teacher, data, **build_kwargs) -> "TeacherCache":
        """The cache in ``directory`` when it covers ``data`` (same prompts), else a fresh build saved there."""
        directory = Path(directory)
        if (directory / CACHE_INDEX).exists():
            cache = cls.load(directory)
            if cache.prompts == data.prompts(range(len(data))):
                return cache
        cache = cls.build(teacher, data, **build_kwargs)
        cache.save(directory)
        return cache


class RISDTrainer(TrainerBase):
    """Algorithm 2: the student :class:`~zreward.scoring.scorer.RewardScorer` regresses the cached teacher distributions.

    Each step scores ``batch_size`` images of this rank's shard on every cached dimension in one forward pass
    (``student_scores``) and minimises the batch-mean KL(q_T || q_phi) of Eq. 15 with ``zr_kernels.slice_kl``.
    """

    def __init__(self, student, data, cache: TeacherCache, config: RISDConfig | None = None,
                 ctx: DistContext | None = None):
        config = config or RISDConfig()
        super().__init__(student.model, config, ctx)
        if len(cache.prompts) != len(data):
            raise ValueError(f"cache covers {len(cache.prompts)} items but data has {len(data)}")
        self.student, self.data, self.cache = student, data, cache

    def default_steps(self) -> int:
        return self.config.steps

    def step(self) -> dict[str, float]:
        indices = self._next_indices(len(self.data), self.config.batch_size)
        device = self.ctx.device
        images = self.data.images(indices).to(device)
        self.model.train()
        hidden = self.student.student_hidden(images, self.data.prompts(indices), self.cache.dimensions)
        # Eq. 15 on the student's K score logits (row b * D + d): slice_kl's softmax is the only one, straight from
        # the logits (no probabilities logged back, no clamp).
        student_logits = self.student.score_logits(hidden)
        num_bins = student_logits.shape[-1]
        teacher = self.cache.probs[indices].to(device).reshape(-1, num_bins)
        loss = zr_kernels.slice_kl(student_logits, teacher, list(range(num_bins)))
        grad_norm = self._apply(loss)
        self.model.eval()
        self.state["step"] += 1
        values = self.cache.values.to(device)
        student_mean = student_logits.detach().float().softmax(-1) @ values
        metrics = {"step": self.state["step"], "loss": float(all_reduce_mean(loss.detach())), "grad_norm": grad_norm,
                   "mean_abs_gap": float((student_mean - teacher @ values).abs().mean())}
        self.history.append(metrics)
        return metrics
