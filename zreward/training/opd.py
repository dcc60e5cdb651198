"""On-policy distillation (OPD, paper Sec. 4.3, Eq. 18-19): the baseline RISD is compared with in Table 3.

The student samples its own reasoning-and-score trajectory ``y = (y_1, ..., y_T)`` for ``x = (p, I, d)``, the
frozen teacher scores only the student's visited prefixes, and the per-token reverse-KL term is the advantage:

* :func:`opd_advantages` - Eq. 18, ``A_t = log pi_T(y_t | y_<t, x) - log pi_old(y_t | y_<t, x)``, detached;
* :func:`opd_loss` - Eq. 19, ``-(1/T) sum_t sg(A_t) log pi_phi(y_t | y_<t, x)``, averaged over trajectories;
* :func:`trajectory_logprobs` - ``log pi(y_t | y_<t, x)`` of every action of a trajectory under one scorer.

A trajectory's actions are its sampled reasoning tokens and its score token. The answer prefix between them is
forced (as in every teacher rollout here), so it is not an action; the score token is drawn from the K score
tokens at the score position, and its log-prob under either model is the close-set log-softmax over those K
(the same convention as :func:`~zreward.training.gdso.parsed_scores`). Each trajectory therefore writes
``T = reasoning tokens + 1`` output tokens per score.

:class:`OPDTrainer` samples with the current student and takes one optimizer step per batch, so ``pi_old`` is
``pi_phi`` at the time of the step (Eq. 19 as written, on-policy; no ratio or clipping is needed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zreward.scoring.rubric import DIMENSIONS
from zreward.training.base import TrainerBase
from zreward.training.distributed import DistContext, all_reduce_mean
from zreward.training.gdso import completion_layout, token_logprobs


def opd_advantages(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 18: ``A_t = log pi_T(y_t | y_<t, x) - log pi_old(y_t | y_<t, x)``, ``[N, T]``, no gradient.

    ``teacher_logprobs``, ``old_logprobs [N, T]``: log-probs of the student's sampled tokens under the teacher and
    under the sampling student; ``mask [N, T]``: 1 on real tokens (padding gets advantage 0).
    """
    if teacher_logprobs.shape != old_logprobs.shape or mask.shape != old_logprobs.shape:
        raise ValueError(f"teacher_logprobs, old_logprobs and mask must have one shape [N, T], got "
                         f"{tuple(teacher_logprobs.shape)}, {tuple(old_logprobs.shape)} and {tuple(mask.shape)}")
    return ((teacher_logprobs - old_logprobs) * mask.to(old_logprobs.dtype)).detach()


def opd_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 19: ``mean_n [ -(1/T_n) sum_t sg(A_{n,t}) log pi_phi(y_{n,t} | y_{n,<t}, x_n) ]``.

    ``logprobs [N, T]`` (differentiable), ``advantages [N, T]`` (Eq. 18; used detached), ``mask [N, T]`` with
    ``T_n = mask[n].sum()`` tokens in trajectory n. The gradient is ``-A_t / (N T_n)`` per log-prob.
    """
    if advantages.shape != logprobs.shape or mask.shape != logprobs.shape or logprobs.dim() != 2:
        raise ValueError(f"logprobs, advantages and mask must have one shape [N, T], got {tuple(logprobs.shape)}, "
                         f"{tuple(advantages.shape)} and {tuple(mask.shape)}")
    mask = mask.to(logprobs.dtype)
    per_token = -advantages.detach().to(logprobs.dtype) * logprobs * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def trajectory_logprobs(scorer, rollouts, score_bins: torch.Tensor, model=None, chunk_size: int = 256):
    """``log pi(y_t | y_<t, x)`` of each trajectory's actions under ``scorer`` (its own model, or ``model``):
    ``[N, T_r + 1]`` (the sampled reasoning tokens of ``rollouts``, right-padded, then the score token at bin
    ``score_bins [N]``) and the mask ``[N, T_r + 1]``.

    ``rollouts`` may come from another scorer with the same tokenizer and score vocabulary: that is how the teacher
    scores the student's prefixes.
    """
    positions, targets, mask = completion_layout(rollouts)
    batch = {k: getattr(rollouts, k) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    hidden = scorer.hidden_states(batch, rollouts.pixel_values, rollouts.image_grid_thw, model)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    # token t is predicted at position t - 1
    reasoning = token_logprobs(hidden[rows.unsqueeze(-1), positions - 1], scorer.lm_head_weight(model), targets,
                               chunk_size=chunk_size)
    score_logits = scorer.score_logits(hidden[rows, rollouts.score_positions], model).float()
    score = score_logits.log_softmax(-1).gather(-1, score_bins.view(-1, 1))
    return torch.cat([reasoning, score], 1), torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)


@dataclass
class OPDConfig:
    """OPD hyperparameters (JSON-serialisable; stored in checkpoints)."""

    steps: int = 100
    batch_size: int = 8          # images per rank per step; each is rolled out once on every dimension
    max_new_tokens: int = 16     # reasoning tokens the student may sample before the forced answer prefix
    temperature: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logprob_chunk: int = 256
    seed: int = 0


class OPDTrainer(TrainerBase):
    """Eq. 18-19: the ``student`` :class:`~zreward.scoring.scorer.RewardScorer` samples reasoning and a score for
    ``batch_size`` images of ``data`` on every dimension, the frozen ``teacher`` scorer gives the log-probs of
    those tokens on the student's prefixes, and one optimizer step minimises Eq. 19.

    Teacher and student must share the tokenizer and the score tokens (the teacher reads the student's token ids).
    Each step logs the loss, ``reverse_kl`` (``-mean A_t``), ``output_tokens`` (mean T) and ``score_token_share``
    (the score token's part of ``sum |A_t|``).
    """

    def __init__(self, student, teacher, data, config: OPDConfig | None = None, dimensions=DIMENSIONS,
                 ctx: DistContext | None = None):
        config = config or OPDConfig()
        if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
            raise ValueError("teacher must use the student's tokenizer: it scores the student's token ids")
        if list(teacher.vocab.token_ids) != list(student.vocab.token_ids):
            raise ValueError(f"teacher score tokens {list(teacher.vocab.token_ids)} differ from the student's "
                             f"{list(student.vocab.token_ids)}")
        super().__init__(student.model, config, ctx)
        self.student, self.teacher, self.data, self.dimensions = student, teacher, data, tuple(dimensions)
        teacher.model.eval()  # frozen: only scored under no_grad

    def default_steps(self) -> int:
        return self.config.steps

    def step(self) -> dict[str, float]:
        cfg = self.config
        indices = self._next_indices(len(self.data), cfg.batch_size)
        images = self.data.images(indices).to(self.ctx.device)
        prompts = self.data.prompts(indices)
        losses, advantages, lengths, score_shares = [], [], [], []
        for dimension in self.dimensions:
            self.model.eval()  # sampling as at inference (no dropout)
            rollouts = self.student.teacher_rollouts(images, prompts, dimension, 1, cfg.max_new_tokens,
                                                     cfg.temperature)
            self.model.train()
            # the score token, drawn from the student's K score tokens after the forced answer prefix
            bins = torch.multinomial(rollouts.scores.probs.reshape(len(indices), -1).float(), 1).squeeze(-1)
            logprobs, mask = trajectory_logprobs(self.student, rollouts, bins, chunk_size=cfg.logprob_chunk)
            with torch.no_grad():
                teacher_logprobs, _ = trajectory_logprobs(self.teacher, rollouts, bins, chunk_size=cfg.logprob_chunk)
            # one optimizer step per batch of samples: pi_old is the current student
            advantage = opd_advantages(teacher_logprobs, logprobs.detach(), mask)
            losses.append(opd_loss(logprobs, advantage, mask))
            advantages.append((advantage.sum() / mask.sum()).detach())
            # how much of the teacher's signal sits on the score token (the last column) rather than the reasoning
            score_shares.append(advantage[:, -1].abs().sum() / advantage.abs().sum().clamp(min=1e-12))
            lengths.append(mask.sum(-1).mean())
        loss = torch.stack(losses).mean()
        grad_norm = self._apply(loss)
        self.model.eval()
        self.state["step"] += 1
        # -mean A_t is the sampled per-token reverse KL(pi_old || pi_T) on the student's own tokens
        metrics = {"step": self.state["step"], "loss": float(all_reduce_mean(loss.detach())), "grad_norm": grad_norm,
                   "reverse_kl": float(all_reduce_mean(-torch.stack(advantages).mean())),
                   "output_tokens": float(torch.stack(lengths).mean()),
                   "score_token_share": float(all_reduce_mean(torch.stack(score_shares).mean()))}
        self.history.append(metrics)
        return metrics
