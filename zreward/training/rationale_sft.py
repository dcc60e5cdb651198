"""SFT on written reasoning + score: the RewardDance-style baseline of Table 2.

The paper's reading of RewardDance is supervision with post-hoc pseudo reasoning: a rationale is written after
the fact for the known label, and the model is fine-tuned on rationale + score. Here a rationale is laid out
exactly where a teacher rollout's sampled reasoning goes (prompt, reasoning, forced answer prefix, score token),
so the trained model is evaluated, and samples its own reasoning, like every other teacher:

* :func:`written_batch` - the rows ``prompt + rationale + answer prefix`` with the positions and targets of the
  written tokens: the rationale, then the stop token that ends a sampled reasoning;
* :func:`rationale_sft_loss` - the sequence SFT loss over those tokens and the score token (Eq. 8's term);
* :class:`RationaleSFTTrainer` - GDSO's batches (P same-dimension pairs, ``updates_per_batch`` updates on each)
  with the written rationales in place of sampled reasoning and no rollout rewards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from zreward.scoring.image_processing import preprocess_images
from zreward.scoring.rubric import chat_prompt
from zreward.training.base import TrainerBase
from zreward.training.distributed import DistContext, all_reduce_mean
from zreward.training.gdso import dimension_batches, token_logprobs


class WrittenBatch(NamedTuple):
    """``N`` rows ``prompt + rationale + answer prefix``, right-padded (``batch``: ``input_ids``,
    ``attention_mask``, ``mm_token_type_ids``), their vision inputs, and the written tokens: ``targets [N, T]``
    predicted at ``positions [N, T]`` (``mask [N, T]``), and ``score_positions [N]`` (last answer-prefix position)."""

    batch: dict
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    score_positions: torch.Tensor


def written_batch(scorer, images: torch.Tensor, prompts, dimension: str, rationales) -> WrittenBatch:
    """The scorer's teacher layout with ``rationales`` (one text per image) as the reasoning.

    The targets of row n are the rationale's tokens and then the tokenizer's end-of-turn token: a sampled
    reasoning ends at it (``RewardScorer.teacher_rollouts`` cuts it off before appending the answer prefix), so a
    model trained on these targets writes the rationale and stops, and its reasoning then reads as in training.
    """
    if isinstance(rationales, str) or len(rationales) != len(prompts):
        raise ValueError(f"rationales must hold one text per prompt ({len(prompts)}), got {rationales!r}")
    tokenizer = scorer.tokenizer
    pixel_values, grid = preprocess_images(images, scorer.image_processor)
    texts = [chat_prompt(tokenizer, p, dimension, reasoning=True) for p in prompts]
    # the scorer's own placeholder expansion and padding, so rows match its sampled rollouts token for token
    prompt_rows = [tokenizer.encode(t, add_special_tokens=False) for t in scorer.expand_image_tokens(texts, grid, 1)]
    written = [tokenizer.encode(r, add_special_tokens=False) for r in rationales]
    batch = scorer.pad_right([p + w + scorer.prefix_ids for p, w in zip(prompt_rows, written)])
    width = max(len(w) for w in written) + 1
    positions = torch.ones(len(written), width, dtype=torch.int64)  # padding slots point at position 1, masked
    targets = torch.full((len(written), width), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(len(written), width)
    for n, (p, w) in enumerate(zip(prompt_rows, written)):
        positions[n, :len(w) + 1] = torch.arange(len(p) - 1, len(p) + len(w))  # token t is predicted at t - 1
        targets[n, :len(w) + 1] = torch.tensor(w + [tokenizer.eos_token_id])
        mask[n, :len(w) + 1] = 1.0
    device = batch["input_ids"].device
    return WrittenBatch(batch, pixel_values, grid, positions.to(device), targets.to(device), mask.to(device),
                        batch["attention_mask"].sum(1) - 1)


def rationale_sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, score_nll: torch.Tensor) -> torch.Tensor:
    """``mean_n [ (sum_t -log pi(y_{n,t} | y_{n,<t}, x_n) - log q(s_n | x_n, y_n)) / (T_n + 1) ]``.

    SFT on the written response: each row's ``T_n = mask[n].sum()`` written tokens (``logprobs [N, T]``) and its
    score token, whose ``-log q(annotated bin)`` over the K score tokens is ``score_nll [N]`` (the per-row term of
    Eq. 8), count once each.
    """
    if logprobs.dim() != 2 or mask.shape != logprobs.shape or score_nll.shape != logprobs.shape[:1]:
        raise ValueError(f"logprobs and mask must be [N, T] and score_nll [N], got {tuple(logprobs.shape)}, "
                         f"{tuple(mask.shape)} and {tuple(score_nll.shape)}")
    mask = mask.to(logprobs.dtype)
    total = -(logprobs * mask).sum(-1) + score_nll.to(logprobs.dtype)
    return (total / (mask.sum(-1) + 1.0)).mean()


@dataclass
class RationaleSFTConfig:
    """Batching and optimizer settings, named as in :class:`~zreward.training.gdso.GDSOConfig` (JSON-serialisable;
    stored in checkpoints)."""

    pairs_per_batch: int = 4
    steps: int = 10
    updates_per_batch: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logprob_chunk: int = 256
    seed: int = 0


class RationaleSFTTrainer(TrainerBase):
    """SFT of a teacher :class:`~zreward.scoring.scorer.RewardScorer` on written rationale + score.

    ``pairs``, ``data``: as for :class:`~zreward.training.gdso.GDSOTrainer`, whose batches it uses (P pairs of one
    dimension: the 2P images, each once); ``rationale(index, dimension)`` writes the reasoning for item ``index``
    of ``data`` (post-hoc: it may read the item's label). Each batch gets ``updates_per_batch`` optimizer updates.
    """

    def __init__(self, scorer, data, pairs, rationale: Callable[[int, str], str],
                 config: RationaleSFTConfig | None = None, ctx: DistContext | None = None):
        config = config or RationaleSFTConfig()
        if not callable(rationale):
            raise TypeError(f"rationale must be a callable (index, dimension) -> text, got {type(rationale).__name__}")
        super().__init__(scorer.model, config, ctx)
        self.scorer, self.data, self.rationale = scorer, data, rationale
        self.batches = dimension_batches(pairs, config.pairs_per_batch, config.seed, self.ctx.world_size)

    def default_steps(self) -> int:
        return self.config.steps

    def step(self) -> dict[str, float]:
        cfg = self.config
        batch = self.batches[self._next_indices(len(self.batches), 1)[0]]
        dimension = batch[0].dimension
        order = [index for pair in batch for index in (pair.winner, pair.loser)]
        device = self.ctx.device
        written = written_batch(self.scorer, self.data.images(order).to(device), self.data.prompts(order), dimension,
                                [self.rationale(i, dimension) for i in order])
        scores = torch.tensor([s for pair in batch for s in (pair.score_w, pair.score_l)])
        bins = self.scorer.vocab.bin_indices(scores).to(device)
        self.model.train()
        for _ in range(cfg.updates_per_batch):
            hidden = self.scorer.hidden_states(written.batch, written.pixel_values, written.image_grid_thw)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            logprobs = token_logprobs(hidden[rows.unsqueeze(-1), written.positions], self.scorer.lm_head_weight(),
                                      written.targets, chunk_size=cfg.logprob_chunk)
            score_nll = self.scorer.score_distribution(hidden[rows, written.score_positions], target=bins).nll
            loss = rationale_sft_loss(logprobs, written.mask, score_nll)
            grad_norm = self._apply(loss)
        self.model.eval()
        self.state["step"] += 1
        tokens = written.mask.sum()
        metrics = {"step": self.state["step"], "loss": float(all_reduce_mean(loss.detach())),
                   "ce": float(all_reduce_mean(score_nll.detach().mean())),
                   "rationale_nll": float(all_reduce_mean(-(logprobs.detach() * written.mask).sum() / tokens)),
                   "grad_norm": grad_norm, "written_tokens": float(tokens / len(order))}
        self.history.append(metrics)
        return metrics
