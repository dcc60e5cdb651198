"""Group-wise Direct Score Optimization (paper Sec. 3.1, Algorithm 1, Eq. 3-14).

Loss pieces work on plain tensors, so they drop into any trainer:

* :func:`token_logprobs` - per-token log-probs from hidden states x LM head, chunked over positions with
  recomputation in backward: at most ``chunk_size x V`` logits exist at any time.
* :func:`grpo_surrogate` - the clipped GRPO surrogate with the k3 KL to a reference (Eq. 4 as implemented by
  TRL / Liger: ``-min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A) + beta k3``), aggregated over tokens as
  ``GDSOConfig.aggregation`` says (see :data:`AGGREGATIONS`).
* :func:`gdso_loss` - Eq. 14: the surrogate on Eq. 13 rewards + ``alpha_pt`` x Eq. 8 + ``alpha_pw`` x Eq. 11.
* :func:`parsed_scores` - the score a rollout would write as its answer, for rewards from parsed text (Fig. 4).

The paper's baselines are settings of the same trainer: GRPO is ``alpha_pt = alpha_pw = 0`` (optionally with
``reward_source="parsed"``), SFT on the score token is ``policy_weight = alpha_pw = 0``.

:class:`GDSOTrainer` runs Algorithm 1 on a :class:`~zreward.scoring.scorer.RewardScorer` teacher.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

import zr_kernels
from zreward.engines import make_engine
from zreward.training.base import TrainerBase
from zreward.training.distributed import DistContext, all_reduce_mean, unwrap_model

# How the per-token terms of Eq. 4 become the policy term (``GDSOConfig.aggregation``), for N outputs o_i:
# * "sequence" (GRPO as TRL and Liger's "grpo" implement it): mean over each output's tokens, then over outputs.
# * "token" (DAPO, Liger's "bnpo"): sum over all tokens of the batch / their number; long outputs weigh more.
# * "sum" (Eq. 4 as written): sum over each output's tokens, then mean over outputs.
# The direct losses alpha_pt * Eq. 8 and alpha_pw * Eq. 11 are one term per output whatever its length, while
# "sum" grows with the reasoning length |o|: against them, "sum" weighs the policy term about |o| times more than
# "sequence" or "token" do (about 4x in the demo's 4-token reasoning, about 750x at the paper's ~750 tokens), and
# its gradient norm grows with |o| too, so max_grad_norm clips more often. Lowering policy_weight (or lr) by ~1/|o|
# brings "sum" back to the balance of "sequence".
AGGREGATIONS = ("sequence", "token", "sum")
REWARD_SOURCES = ("expectation", "parsed")


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 256,
                   temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T / temperature).gather(-1, targets)`` in fp32 (fp64 for fp64 inputs),
    ``[..., T]``: the log-probs of a sampler that drew ``targets`` at ``temperature``.

    ``hidden [..., T, D]`` (final-norm hidden states at the positions that predict ``targets [..., T]``),
    ``weight [V, D]`` (the LM head). Positions are processed ``chunk_size`` at a time under activation
    checkpointing, so neither forward nor backward ever holds more than one ``chunk_size x V`` logit block.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without D), "
                         f"got {tuple(targets.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    chunks = []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        h = flat_hidden[start:start + chunk_size]
        t = flat_targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            chunks.append(checkpoint(_chunk_logprobs, h, weight, t, temperature, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(h, weight, t, temperature))
    if not chunks:
        return hidden.new_zeros(targets.shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
    return torch.cat(chunks).view(targets.shape)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # fp64 stays fp64
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) on samples of pi: ``exp(d) - d - 1`` with ``d = ref - logp``."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


class SurrogateStats(NamedTuple):
    """Token-weighted diagnostics of one surrogate evaluation (detached scalars)."""

    kl: torch.Tensor
    clip_fraction: torch.Tensor


def grpo_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, *, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
                   eps_low: float = 0.2, eps_high: float = 0.2,
                   aggregation: str = "sequence") -> tuple[torch.Tensor, SurrogateStats]:
    """Clipped GRPO surrogate with k3 KL, ``[N, T]`` per-token inputs, ``advantages [N]``, ``mask [N, T]``.

    ``aggregation="sequence"``: mean over each sequence's tokens, then over sequences (GRPO);
    ``"token"``: sum over all tokens / number of tokens in the batch (DAPO, Liger's ``bnpo``);
    ``"sum"``: sum over each sequence's tokens, then mean over sequences (Eq. 4 as written). See
    :data:`AGGREGATIONS` for how the choice weighs the policy term against the direct losses.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    adv = advantages.unsqueeze(-1).to(logprobs.dtype)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(logprobs)
    if beta > 0:
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1.0)
    if aggregation == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif aggregation == "sum":
        loss = (per_token * mask).sum(-1).mean()
    else:
        loss = (per_token * mask).sum() / tokens
    with torch.no_grad():
        was_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        stats = SurrogateStats((kl * mask).sum() / tokens, (was_clipped.to(mask.dtype) * mask).sum() / tokens)
    return loss, stats


POLICY_BACKENDS = ("auto", "liger", "chunked")


def policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                advantages: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, *,
                beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2, aggregation: str = "sequence",
                temperature: float = 1.0, chunk_size: int = 256,
                backend: str = "auto") -> tuple[torch.Tensor, SurrogateStats]:
    """:func:`grpo_surrogate` straight from hidden states ``[N, T, D]`` and the LM head ``weight [V, D]``.

    ``backend="liger"``: Liger's ``LigerFusedLinearGRPOLoss`` (chunked fused linear + loss, compiled on
    CUDA); ``"chunked"``: :func:`token_logprobs` + :func:`grpo_surrogate`; ``"auto"``: Liger for CUDA
    tensors when it is installed, chunked otherwise. Both agree to rounding (tests/test_gdso.py). Either divides
    the logits by ``temperature``: pass the sampling temperature, so the ratio's log-probs are the sampler's.
    """
    if backend not in POLICY_BACKENDS:
        raise ValueError(f"backend must be one of {POLICY_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "liger" if hidden.is_cuda and _liger_grpo() is not None else "chunked"
    if backend == "chunked":
        logprobs = token_logprobs(hidden, weight, targets, chunk_size=chunk_size, temperature=temperature)
        return grpo_surrogate(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, beta=beta,
                              eps_low=eps_low, eps_high=eps_high, aggregation=aggregation)
    loss_class = _liger_grpo()
    if loss_class is None:
        raise ValueError("backend='liger' needs liger-kernel (pip install liger-kernel)")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    # Liger's "dr_grpo" divides the token sum by N x max_completion_length: with a length of 1 that is "sum".
    loss_type = {"sequence": "grpo", "token": "bnpo", "sum": "dr_grpo"}[aggregation]
    fused = loss_class(beta=beta, compiled=hidden.is_cuda, use_ref_model=beta > 0, epsilon_low=eps_low,
                       epsilon_high=eps_high, temperature=temperature, loss_type=loss_type,
                       max_completion_length=1 if aggregation == "sum" else None)
    loss, metrics = fused(hidden, weight, targets, mask, advantages, ref_per_token_logps=ref_logprobs,
                          old_per_token_logps=old_logprobs)
    kl = metrics[0].detach() if beta > 0 else loss.new_zeros(())
    return loss, SurrogateStats(kl, metrics[-1].detach())


def _liger_grpo():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    return LigerFusedLinearGRPOLoss


class GDSOLoss(NamedTuple):
    """Eq. 14 (``loss``, differentiable) and its parts (detached), for logging."""

    loss: torch.Tensor
    policy: torch.Tensor
    ce: torch.Tensor
    pairwise: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor


@dataclass
class GDSOConfig:
    """Algorithm 1 and Eq. 13-14 hyperparameters (JSON-serialisable; stored in checkpoints)."""

    group_size: int = 4            # G sampled reasoning outputs per candidate
    pairs_per_batch: int = 4       # P (per rank)
    iterations: int = 1            # N: the reference policy is refreshed at the start of each
    steps_per_iteration: int = 10  # M batches per iteration
    updates_per_batch: int = 1     # K_gdso optimizer updates on each batch of rollouts (pi_old fixed)
    max_new_tokens: int = 16       # reasoning tokens sampled per output at most
    sample_temperature: float = 1.0  # temperature of the rollout sampling; the ratio's and the KL's log-probs use it
    lambda_pt: float = 0.5         # weight of the pointwise reward (Eq. 7) in Eq. 13
    lambda_pw: float = 0.5         # weight of the pairwise reward (Eq. 10) in Eq. 13
    alpha_pt: float = 1.0          # weight of the pointwise cross-entropy (Eq. 8) in Eq. 14
    alpha_pw: float = 1.0          # weight of the pairwise gap loss (Eq. 11) in Eq. 14
    beta: float = 0.04             # weight of the k3 KL to the reference policy (Eq. 4); 0: no reference
    eps_low: float = 0.2           # lower clip range of the probability ratio
    eps_high: float = 0.2          # upper clip range of the probability ratio
    aggregation: str = "sequence"  # the surrogate over tokens: "sequence" (GRPO), "token" (DAPO), "sum" (Eq. 4)
    advantage_scale: str = "group"  # Eq. 3's divisor: "group" std, "batch" std or "none" (Dr. GRPO)
    advantage_eps: float = 1e-6    # Eq. 3's epsilon, added to the reward std
    policy_weight: float = 1.0     # weight of L_GRPO in Eq. 14 (0: the direct losses alone, no rollout rewards)
    reward_source: str = "expectation"  # Eq. 7/10 on the expected score (Eq. 6), or "parsed": on parsed_scores
    lr: float = 1e-5               # AdamW learning rate
    weight_decay: float = 0.0      # AdamW weight decay
    max_grad_norm: float = 1.0     # gradients clipped to this global norm
    logprob_chunk: int = 256       # completion positions whose full-vocabulary logits are formed at once
    policy_backend: str = "auto"   # the surrogate's kernel: "liger" (fused, CUDA), "chunked" or "auto"
    seed: int = 0                  # data order and batches (and the run's LoRA init and evaluation sampling)


def gdso_rewards_and_advantages(mu_w: torch.Tensor, mu_l: torch.Tensor, s_w: torch.Tensor, s_l: torch.Tensor,
                                score_min: float, score_max: float, config: GDSOConfig,
                                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13 rewards and Eq. 3 advantages from the sampling policy's expected scores ``mu_w, mu_l [P, G]``.

    Returns ``rewards, advantages`` as ``[P, 2, G]`` (side 0 = winner), detached; each (pair, side) is one
    GRPO group of G outputs sampled for the same input ``x_j``.
    """
    r_w, r_l = zr_kernels.gdso_rewards(mu_w.detach(), mu_l.detach(), s_w, s_l, score_min, score_max,
                                       config.lambda_pt, config.lambda_pw, backend=backend)
    rewards = torch.stack([r_w, r_l], dim=1)
    group_size = mu_w.shape[1]
    advantages = zr_kernels.group_advantages(rewards.reshape(-1), group_size, scale=config.advantage_scale,
                                             eps=config.advantage_eps, backend=backend)
    return rewards, advantages.view_as(rewards)


def parsed_scores(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The score each rollout writes after the answer prefix, as parsing its text would read it: one score token
    drawn from its distribution ``probs [..., K]`` at the score position, returned as its value ``[...]``.

    The draw is constrained to the K score tokens, as the answer prefix before it is already forced, so every
    answer parses. Unlike the expectation (Eq. 6) it is quantised to a bin and random: 3.8 and 4.2 both read 4.
    """
    draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]).float(), 1)
    return values.to(probs.device)[draws].view(probs.shape[:-1])


def gdso_loss(policy: torch.Tensor, policy_stats: SurrogateStats, mu: torch.Tensor, nll: torch.Tensor,
              s_w: torch.Tensor, s_l: torch.Tensor, score_range: float, config: GDSOConfig,
              backend: str | None = None) -> GDSOLoss:
    """Eq. 14 for P pairs x 2 sides x G samples.

    ``policy``, ``policy_stats``: the surrogate from :func:`grpo_surrogate` (log-probs) or :func:`policy_loss`
    (hidden states) with the Eq. 3 advantages of :func:`gdso_rewards_and_advantages`; ``mu, nll [P, 2, G]``:
    expected score and ``-log q(annotated bin)`` of each sampled output under the current policy (``mean`` and
    ``nll`` of ``zr_kernels.score_distribution``); ``s_w, s_l [P]``: annotated scores; ``score_range`` =
    ``S_max - S_min``. ``config.policy_weight`` scales the surrogate (1 in Eq. 14).
    """
    ce = nll.mean()  # Eq. 8: 1/(2G) sum over both sides and all G samples, averaged over pairs
    gap = zr_kernels.pairwise_gap(mu[:, 0], mu[:, 1], (s_w - s_l).float(), score_range, backend=backend)
    pairwise = gap.loss.mean()
    loss = config.policy_weight * policy + config.alpha_pt * ce + config.alpha_pw * pairwise
    return GDSOLoss(loss, policy.detach(), ce.detach(), pairwise.detach(), policy_stats.kl,
                    policy_stats.clip_fraction)


class GDSOBatch(NamedTuple):
    """One batch of rollouts with all that Eq. 14 needs besides the current policy: fixed over the K updates.

    ``rollouts``: 2P groups of G (:class:`~zreward.scoring.scorer.Rollouts`, row ``(p * 2 + side) * G + i``,
    side 0 = winner); ``s_w, s_l [P]``: annotated scores; ``rewards, advantages [P, 2, G]``: Eq. 13 and Eq. 3;
    ``positions, targets, mask [N, T]``: the trained tokens (:func:`completion_layout`); ``bins [N]``: each
    row's annotated score bin (Eq. 8); ``old_logprobs``: pi_old's log-probs of ``targets`` (None: the policy's
    own, detached, as with one update per batch); ``ref_logprobs``: pi_ref's (None when ``beta`` is 0).
    """

    rollouts: object
    s_w: torch.Tensor
    s_l: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    bins: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None


class GDSOTrainer(TrainerBase):
    """Algorithm 1 on a teacher :class:`~zreward.scoring.scorer.RewardScorer`.

    ``pairs``: a sequence of :class:`~zreward.experiments.synthetic.PreferencePair`-like records (``winner``, ``loser``,
    ``dimension``, ``score_w``, ``score_l``) indexing ``data``, which provides ``images(indices)`` and
    ``prompts(indices)``. Each batch holds up to P pairs of one dimension (the rubric is part of the prompt;
    :func:`dimension_batches`); the reference policy is re-copied from the policy every ``steps_per_iteration``
    steps and frozen.

    The policy's actions are each rollout's sampled reasoning tokens and the token that ended them (the stop
    token, or the first token of an answer prefix the model wrote itself), so the decision to stop reasoning is
    trained too; the forced answer prefix is not an action. Their log-probs (ratio, pi_old, pi_ref) are taken at
    ``sample_temperature``, the sampler's.

    ``engine`` samples the rollouts (``zreward.engines``): ``"hf"`` (default) runs ``generate`` on the policy
    itself; ``"vllm"`` or a :class:`~zreward.engines.InferenceEngine` samples with an engine colocated in this
    process, whose weights are synced from the policy after every optimizer step (and after ``load``). Either
    way the log-probs and score distributions of the loss are recomputed by the policy. An engine started from a
    name lives as long as the trainer (``trainer.engine.close()`` frees it).

    ``step()`` is sampling + :meth:`prepare_batch` + K x (:meth:`loss_from_rollouts` + optimizer step); the last
    two also take rollouts from elsewhere (tests, offline rollouts).

    ``reference``: a model built and placed as the policy is (same parameter names), to hold pi_ref when ``beta``
    > 0; its weights are copied from the policy at every refresh. Default: a deep copy of the policy, which an
    FSDP2-sharded policy cannot make (give it a second sharded model).
    """

    def __init__(self, scorer, data, pairs, config: GDSOConfig | None = None, ctx: DistContext | None = None,
                 engine="hf", reference: torch.nn.Module | None = None):
        config = config or GDSOConfig()
        if config.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {config.aggregation!r}")
        if config.reward_source not in REWARD_SOURCES:
            raise ValueError(f"reward_source must be one of {REWARD_SOURCES}, got {config.reward_source!r}")
        if not config.policy_weight >= 0:
            raise ValueError(f"policy_weight must be >= 0, got {config.policy_weight!r}")
        if not config.advantage_eps >= 0:
            raise ValueError(f"advantage_eps must be >= 0, got {config.advantage_eps!r}")
        if not config.sample_temperature > 0:
            raise ValueError(f"sample_temperature must be > 0, got {config.sample_temperature!r}")
        super().__init__(scorer.model, config, ctx)
        self.scorer, self.data = scorer, data
        vocab = scorer.vocab
        self.score_min, self.score_max = vocab.score_min, vocab.score_max
        self.batches = dimension_batches(pairs, config.pairs_per_batch, config.seed, self.ctx.world_size)
        self.reference: torch.nn.Module | None = None
        if reference is not None and [n for n, _ in reference.named_parameters()] != \
                [n for n, _ in self.model.named_parameters()]:
            raise ValueError("reference must have the policy's parameters (same names, same order)")
        self.reference_model = reference
        self.engine = make_engine(engine, scorer)

    def default_steps(self) -> int:
        return self.config.iterations * self.config.steps_per_iteration

    def step(self) -> dict[str, float]:
        """One batch of Algorithm 1 (lines 5-19): sample G outputs per candidate with pi_old, compute Eq. 13
        rewards and Eq. 3 advantages, then ``updates_per_batch`` minimisations of Eq. 14."""
        cfg = self.config
        if self.reference is None or self.state["step"] % cfg.steps_per_iteration == 0:
            self.refresh_reference()
        batch = [self.batches[i] for i in self._next_indices(len(self.batches), 1)][0]
        dimension = batch[0].dimension
        order = [index for pair in batch for index in (pair.winner, pair.loser)]
        images = self.data.images(order).to(self.ctx.device)
        prompts = self.data.prompts(order)
        s_w = torch.tensor([p.score_w for p in batch], device=self.ctx.device)
        s_l = torch.tensor([p.score_l for p in batch], device=self.ctx.device)

        self.model.eval()
        rollouts = self.engine.teacher_rollouts(images, prompts, dimension, cfg.group_size, cfg.max_new_tokens,
                                                cfg.sample_temperature)
        prepared = self.prepare_batch(rollouts, s_w, s_l)
        self.model.train()
        for _ in range(cfg.updates_per_batch):
            out = self.loss_from_rollouts(prepared)
            grad_norm = self._apply(out.loss)
        self.model.eval()
        self.state["step"] += 1
        metrics = {"step": self.state["step"], "loss": float(all_reduce_mean(out.loss.detach())), "policy": float(out.policy),
                   "ce": float(out.ce), "pairwise": float(out.pairwise), "kl": float(out.kl),
                   "clip_fraction": float(out.clip_fraction),
                   "reward": float(all_reduce_mean(prepared.rewards.mean())), "grad_norm": grad_norm,
                   "completion_tokens": float(rollouts.completion_mask.sum(1).float().mean())}
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def prepare_batch(self, rollouts, s_w: torch.Tensor, s_l: torch.Tensor) -> GDSOBatch:
        """Algorithm 1 lines 13-14 on ``rollouts`` (2P groups of G: winner then loser of each pair) sampled by
        pi_old for pairs with annotated scores ``s_w, s_l [P]``: Eq. 13 rewards, Eq. 3 advantages, the trained
        tokens, and the pi_old / pi_ref log-probs the K updates share (computed here, under no grad)."""
        cfg = self.config
        num_pairs, group = s_w.shape[0], rollouts.num_samples
        if s_l.shape != s_w.shape or rollouts.input_ids.shape[0] != 2 * num_pairs * group:
            raise ValueError(f"rollouts must hold 2 x {num_pairs} groups of {group} (s_w, s_l: [P] scores), got "
                             f"{rollouts.input_ids.shape[0]} rows, s_w {tuple(s_w.shape)}, s_l {tuple(s_l.shape)}")
        if cfg.reward_source == "parsed":
            reward_scores = parsed_scores(rollouts.scores.probs, self.scorer.vocab.values)
        else:
            reward_scores = rollouts.scores.mean
        reward_scores = reward_scores.view(num_pairs, 2, group)
        rewards, advantages = gdso_rewards_and_advantages(reward_scores[:, 0], reward_scores[:, 1], s_w, s_l,
                                                          self.score_min, self.score_max, cfg)
        positions, targets, mask = completion_layout(rollouts, len(self.scorer.prefix_ids))
        bins = self.scorer.vocab.bin_indices(torch.stack([s_w, s_l], 1).cpu()).to(s_w.device)
        bins = bins.unsqueeze(-1).expand(num_pairs, 2, group).reshape(-1)
        use_policy = cfg.policy_weight > 0  # with weight 0 the surrogate and its extra forward passes are skipped
        old_logprobs = self._logprobs(self.model, rollouts, positions, targets) \
            if use_policy and cfg.updates_per_batch > 1 else None
        ref_logprobs = self._logprobs(self.reference, rollouts, positions, targets) \
            if use_policy and cfg.beta > 0 else None
        return GDSOBatch(rollouts, s_w, s_l, rewards, advantages, positions, targets, mask, bins, old_logprobs,
                         ref_logprobs)

    def loss_from_rollouts(self, batch: GDSOBatch) -> GDSOLoss:
        """Eq. 14 under the current policy for a :meth:`prepare_batch` result (one forward pass, differentiable;
        no sampling and no optimizer step)."""
        cfg = self.config
        rollouts = batch.rollouts
        hidden = self.scorer.hidden_states(_rollout_batch(rollouts), rollouts.pixel_values, rollouts.image_grid_thw,
                                           self.model)
        weight = self.scorer.lm_head_weight(self.model)
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(-1)
        if cfg.policy_weight > 0:
            token_hidden = hidden[rows, batch.positions - 1]  # token t is predicted at position t - 1
            old = batch.old_logprobs if batch.old_logprobs is not None else token_logprobs(
                token_hidden.detach(), weight.detach(), batch.targets, chunk_size=cfg.logprob_chunk,
                temperature=cfg.sample_temperature)
            policy, stats = policy_loss(
                token_hidden, weight, batch.targets, batch.mask, batch.advantages.reshape(-1), old,
                batch.ref_logprobs, beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                aggregation=cfg.aggregation, temperature=cfg.sample_temperature, chunk_size=cfg.logprob_chunk,
                backend=cfg.policy_backend)
        else:
            zero = hidden.new_zeros((), dtype=torch.float32)
            policy, stats = zero, SurrogateStats(zero, zero)
        # Eq. 2 and Eq. 8 in one fused pass over the K score rows of the LM head (linear_score with a target).
        dist = self.scorer.score_distribution(hidden[rows.squeeze(-1), rollouts.score_positions], target=batch.bins,
                                              model=self.model)
        lead = (batch.s_w.shape[0], 2, rollouts.num_samples)
        return gdso_loss(policy, stats, dist.mean.view(lead), dist.nll.view(lead), batch.s_w, batch.s_l,
                         self.score_max - self.score_min, cfg)

    def on_optimizer_step(self) -> None:
        """The next rollouts are sampled from the updated policy: push its weights to the engine (verified)."""
        self.engine.sync_weights(self.model)

    def refresh_reference(self) -> None:
        """Algorithm 1 line 3: pi_ref <- pi_theta (a frozen copy; skipped when ``beta`` is 0)."""
        if self.config.beta > 0:
            self.reference = self._policy_copy()
        else:
            self.reference = torch.nn.Identity()  # marks the iteration as started; never evaluated

    def _policy_copy(self) -> torch.nn.Module:
        """A frozen copy of the policy's current weights (in ``reference_model`` when one was given)."""
        if self.reference_model is None:
            return copy.deepcopy(unwrap_model(self.model)).eval().requires_grad_(False)
        with torch.no_grad():
            for target, source in zip(self.reference_model.parameters(), self.model.parameters()):
                target.copy_(source)
        return self.reference_model.eval().requires_grad_(False)

    def save(self, path):
        extras = {"reference": self.reference} if self.config.beta > 0 and self.reference is not None else None
        return super().save(path, extras)

    def load(self, path) -> None:
        if self.config.beta > 0:
            self.reference = self._policy_copy()
        super().load(path, {"reference": self.reference} if self.config.beta > 0 else None)
        if self.config.beta == 0:
            self.reference = torch.nn.Identity()
        self.engine.sync_weights(self.model)

    def _logprobs(self, model, rollouts, positions, targets) -> torch.Tensor:
        hidden = self.scorer.hidden_states(_rollout_batch(rollouts), rollouts.pixel_values, rollouts.image_grid_thw,
                                           model)
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(-1)
        weight = self.scorer.lm_head_weight(model)
        return token_logprobs(hidden[rows, positions - 1], weight, targets, chunk_size=self.config.logprob_chunk,
                              temperature=self.config.sample_temperature)


def completion_layout(rollouts, answer_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact ``[N, T]`` view of each rollout's actions: their positions in ``rollouts.input_ids`` (token ``t``
    is predicted from position ``t - 1``), the token ids and a mask. Padding slots point at position 1 and are
    masked out.

    The actions are the sampled reasoning tokens (``completion_mask``) and, when ``answer_length`` (the length
    of the appended answer prefix) is given, the token that ended the reasoning (``rollouts.end_tokens``, where
    one was sampled): it was drawn at the position where the answer prefix now starts, so its slot has that
    position and the end token as target, not the prefix token written there.
    """
    completion = rollouts.completion_mask.bool()
    lengths = completion.sum(1)
    if answer_length is None:
        starts = completion.float().argmax(1)  # completions are contiguous, right after the prompt
        has_end = torch.zeros_like(lengths, dtype=torch.bool)
    else:
        starts = rollouts.score_positions + 1 - answer_length - lengths
        has_end = rollouts.end_tokens >= 0
    counts = lengths + has_end
    width = int(counts.max()) if counts.numel() else 0
    slots = torch.arange(width, device=completion.device)
    mask = slots.unsqueeze(0) < counts.unsqueeze(1)
    positions = torch.where(mask, starts.unsqueeze(1) + slots, torch.ones_like(slots))
    targets = rollouts.input_ids.gather(1, positions)
    if answer_length is not None:
        at_end = (slots.unsqueeze(0) == lengths.unsqueeze(1)) & has_end.unsqueeze(1)
        targets = torch.where(at_end, rollouts.end_tokens.unsqueeze(1), targets)
    return positions, targets, mask.float()


def teacher_expected_scores(scorer, images: torch.Tensor, prompts, dimensions, num_samples: int = 2,
                            max_new_tokens: int = 16, batch_size: int = 16, engine="hf") -> torch.Tensor:
    """Teacher score per image and dimension ``[B, D]``: the mean over ``num_samples`` reasoning rollouts of the
    expected score decoded after each (Eq. 6), sampled by ``engine`` (``zreward.engines``; one started here from a
    name is shut down before returning)."""
    sampler = make_engine(engine, scorer)
    columns = []
    try:
        for dimension in dimensions:
            parts = []
            for start in range(0, images.shape[0], batch_size):
                rollouts = sampler.teacher_rollouts(images[start:start + batch_size],
                                                    prompts[start:start + batch_size], dimension, num_samples,
                                                    max_new_tokens)
                parts.append(rollouts.scores.mean.mean(1))
            columns.append(torch.cat(parts))
    finally:
        if sampler is not engine:
            sampler.close()
    return torch.stack(columns, 1)


def _rollout_batch(rollouts) -> dict:
    return {"input_ids": rollouts.input_ids, "attention_mask": rollouts.attention_mask,
            "mm_token_type_ids": rollouts.mm_token_type_ids}


def dimension_batches(pairs, pairs_per_batch: int, seed: int, world_size: int = 1) -> list[list]:
    """Batches of same-dimension pairs that hold every pair once, drawn in a seeded order (the trainer shuffles
    the batch order every epoch and deals it out to ``world_size`` ranks, one batch per rank per step).

    Each dimension's pairs are split into the fewest batches of at most ``pairs_per_batch``, with sizes that differ
    by at most one (9 pairs at 4 per batch: 3 + 3 + 3; cutting full batches only would leave one pair unseen every
    epoch). An epoch deals out whole rounds of ``world_size`` batches, so the count is raised to a multiple of it
    by splitting batches further (the dimension with the largest batches first). Where the pairs are too few for
    that (e.g. one pair per batch), the first batches are repeated to complete the last round instead: then at most
    ``world_size - 1`` batches are seen twice per epoch, and none is left out.
    """
    if isinstance(pairs_per_batch, bool) or not isinstance(pairs_per_batch, int) or pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch must be a positive int, got {pairs_per_batch!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if len(pairs) == 0:
        raise ValueError("pairs must hold at least one preference pair")
    by_dimension: dict[str, list] = {}
    shuffled = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    for pair in (pairs[i] for i in shuffled):
        by_dimension.setdefault(pair.dimension, []).append(pair)
    members = list(by_dimension.values())
    counts = [-(-len(m) // pairs_per_batch) for m in members]  # ceil: the fewest batches of <= pairs_per_batch
    rounds = -(-sum(counts) // world_size) * world_size
    if rounds <= len(pairs):
        while sum(counts) < rounds:
            largest = max((d for d in range(len(members)) if counts[d] < len(members[d])),
                          key=lambda d: -(-len(members[d]) // counts[d]))
            counts[largest] += 1
    batches = []
    for group, count in zip(members, counts):
        size, extra = divmod(len(group), count)
        bounds = [i * size + min(i, extra) for i in range(count + 1)]
        batches.extend(group[start:end] for start, end in zip(bounds, bounds[1:]))
    missing = -len(batches) % world_size
    return batches + batches[:missing]
