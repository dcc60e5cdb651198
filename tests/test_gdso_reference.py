"""One GDSO update against an independent float64 reference written from the paper (Sec. 3.1, Eq. 3-14).

The trainer's loss and gradient for given rollouts (``GDSOTrainer.prepare_batch`` + ``loss_from_rollouts``) are
compared with :func:`reference_loss`, which uses only the HF model's own forward (full-vocabulary logits) and plain
torch, never the trainer's helpers or zr_kernels. The model runs in float64; pi_ref, pi_old and pi_theta are three
different weight sets, so the ratio, its clipping and the KL are all exercised.

Conventions the paper leaves open, taken as the trainer takes them:

* Eq. 3: the group std is the unbiased one (Bessel's correction, as ``torch.std`` and TRL). The trainer computes
  and keeps the advantages in float32 (``zr_kernels.group_advantages``), so they agree with the float64 ones only
  to float32 rounding relative to the rewards' spread; the test checks them to that bound, then hands the
  reference's advantages, rounded to float32 as the trainer stores them, to both sides for Eq. 4.
* Eq. 4: the log-prob term is PPO's clipped ratio ``min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)`` with
  ``ratio = pi_theta / pi_old`` per token (equal in value and gradient to ``A log pi_theta`` when
  pi_old = pi_theta), the KL is the k3 estimate per sampled token, and both are summed over each output's tokens
  ("sum", the equation as written) or averaged per output ("sequence") or per token of the batch ("token");
  the expectation over outputs is the mean over the 2 x P x G outputs of the batch. The tokens are the sampled
  reasoning and the token that ended it; log-probs are those of the sampler, at the sampling temperature.
* Eq. 8 and Eq. 11 are written for one pair: averaged over the P pairs of the batch.
* The score distribution q (Eq. 2) is the softmax over the K score tokens' logits at the score position (T = 1);
  the rewards (Eq. 7, 10, 13) use pi_old's expected scores, i.e. those reported with the rollouts.
"""
import copy
import dataclasses

import pytest
import torch

from zreward.training.gdso import GDSOConfig, GDSOTrainer


def _logits(model, rollouts) -> torch.Tensor:
    return model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                 mm_token_type_ids=rollouts.mm_token_type_ids, pixel_values=rollouts.pixel_values,
                 image_grid_thw=rollouts.image_grid_thw).logits


def _score_probs(logits, rollouts, vocab) -> torch.Tensor:
    """Eq. 2's q: the softmax over the K score tokens' logits at each row's score position."""
    rows = torch.arange(logits.shape[0])
    return logits[rows, rollouts.score_positions][:, torch.tensor(vocab.token_ids)].softmax(-1)


def _expected_scores(logits, rollouts, vocab, num_pairs: int) -> torch.Tensor:
    """Eq. 6, ``[P, 2, G]``."""
    mu = (_score_probs(logits, rollouts, vocab) * vocab.values.double()).sum(-1)
    return mu.view(num_pairs, 2, rollouts.num_samples)


def reference_rewards(old_model, rollouts, s_w, s_l, vocab, cfg: GDSOConfig):
    """Eq. 13 rewards (with Eq. 7 and 10) from pi_old's expected scores and Eq. 3 advantages, ``[P, 2, G]``."""
    num_pairs, group = len(s_w), rollouts.num_samples
    score_range = vocab.score_max - vocab.score_min
    annotated = torch.stack([s_w, s_l], 1).double()  # [P, 2]: side 0 = winner
    with torch.no_grad():
        mu_old = _expected_scores(_logits(old_model, rollouts), rollouts, vocab, num_pairs)
    rewards = torch.empty(num_pairs, 2, group, dtype=torch.float64)
    for p in range(num_pairs):
        for j in range(2):
            other, gap = 1 - j, annotated[p, j] - annotated[p, 1 - j]
            for i in range(group):
                r_pt = 1 - abs(mu_old[p, j, i] - annotated[p, j]) / score_range
                r_pw = 1 - sum(abs((mu_old[p, j, i] - mu_old[p, other, k]) - gap) for k in range(group)) \
                    / (group * score_range)
                rewards[p, j, i] = cfg.lambda_pt * r_pt + cfg.lambda_pw * r_pw
    advantages = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + cfg.advantage_eps)
    return rewards, advantages


def reference_loss(ref_model, old_model, model, rollouts, s_w, s_l, advantages, vocab, answer_length: int,
                   cfg: GDSOConfig) -> torch.Tensor:
    """Eq. 14 for one batch with the given advantages ``[P, 2, G]``, from the equations, in float64
    (differentiable w.r.t. ``model``)."""
    with torch.no_grad():
        ref_logits, old_logits = _logits(ref_model, rollouts), _logits(old_model, rollouts)
    logits = _logits(model, rollouts)
    num_pairs, group, temperature = len(s_w), rollouts.num_samples, cfg.sample_temperature
    values = vocab.values.double()
    score_range = vocab.score_max - vocab.score_min
    annotated = torch.stack([s_w, s_l], 1).double()
    advantages = advantages.reshape(-1)

    # Eq. 4 with the clipped ratio and the k3 KL, over each output's actions.
    per_output, num_tokens = [], 0
    for n in range(rollouts.input_ids.shape[0]):
        actions = [(t, int(rollouts.input_ids[n, t])) for t in range(rollouts.input_ids.shape[1])
                   if rollouts.completion_mask[n, t]]
        if rollouts.end_tokens[n] >= 0:  # the end token was sampled where the answer prefix starts
            actions.append((int(rollouts.score_positions[n]) + 1 - answer_length, int(rollouts.end_tokens[n])))
        terms = []
        for position, token in actions:  # token at `position` was drawn from the distribution at position - 1
            logp, old, ref = (torch.log_softmax(x[n, position - 1] / temperature, -1)[token]
                              for x in (logits, old_logits, ref_logits))
            ratio = torch.exp(logp - old)
            clipped = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            terms.append(-torch.minimum(ratio * advantages[n], clipped * advantages[n]) + cfg.beta * kl)
        num_tokens += len(terms)
        total = torch.stack(terms).sum() if terms else logits.new_zeros(())
        per_output.append(total / max(len(terms), 1) if cfg.aggregation == "sequence" else total)
    if cfg.aggregation == "token":
        policy = torch.stack(per_output).sum() / num_tokens
    else:
        policy = torch.stack(per_output).mean()

    # Eq. 8: the cross-entropy of every sampled output's q at its candidate's annotated bin.
    probs = _score_probs(logits, rollouts, vocab).view(num_pairs, 2, group, -1)
    bins = [[int((values == annotated[p, j]).nonzero()) for j in range(2)] for p in range(num_pairs)]
    ce = torch.stack([-sum(torch.log(probs[p, j, i, bins[p][j]]) for j in range(2) for i in range(group))
                      / (2 * group) for p in range(num_pairs)]).mean()

    # Eq. 11: every cross-side pair of sampled outputs against the annotated gap, both directions.
    mu = _expected_scores(logits, rollouts, vocab, num_pairs)
    pairwise = torch.stack([
        sum(abs((mu[p, j, i] - mu[p, 1 - j, k]) - (annotated[p, j] - annotated[p, 1 - j]))
            for j in range(2) for i in range(group) for k in range(group)) / (2 * group ** 2 * score_range)
        for p in range(num_pairs)]).mean()
    return cfg.policy_weight * policy + cfg.alpha_pt * ce + cfg.alpha_pw * pairwise  # Eq. 14


def _perturb(model, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.fixture(scope="module")
def one_batch():
    """pi_ref (the initial weights), pi_old (perturbed; samples the rollouts), pi_theta (perturbed again), and a
    prepared batch of G = 3 rollouts per candidate with reasoning of different lengths, some ended by a stop token."""
    from zreward.experiments.synthetic import SyntheticPreferences
    from zreward.experiments.tiny_models import tiny_qwen35
    from zreward.scoring.scorer import RewardScorer
    from zreward.scoring.vocab import ScoreVocab

    model, processor = tiny_qwen35(seed=0, layer_types=["full_attention"] * 2)
    scorer = RewardScorer(model.double(), processor, ScoreVocab.from_tokenizer(processor.tokenizer))
    data = SyntheticPreferences(3, 2, 32, seed=0)
    pairs = [p for p in data.pairs() if p.dimension == "alignment"][:2]
    config = GDSOConfig(group_size=3, pairs_per_batch=2, max_new_tokens=5, sample_temperature=0.7, beta=0.1,
                        eps_low=0.2, eps_high=0.25, updates_per_batch=2, lambda_pt=0.4, lambda_pw=0.6, alpha_pt=0.7,
                        alpha_pw=1.3, advantage_eps=1e-3)
    trainer = GDSOTrainer(scorer, data, pairs, config)
    trainer.refresh_reference()  # pi_ref: the initial weights
    _perturb(model, 0.2, seed=1)  # large enough that the expected scores differ between a group's rollouts
    _make_stop_likely(scorer, data, pairs[0].winner)
    order = [i for pair in pairs for i in (pair.winner, pair.loser)]
    torch.manual_seed(0)
    rollouts = scorer.teacher_rollouts(data.images(order).double(), data.prompts(order), "alignment", 3, 5, 0.7)
    s_w = torch.tensor([p.score_w for p in pairs])
    s_l = torch.tensor([p.score_l for p in pairs])
    batch = trainer.prepare_batch(rollouts, s_w, s_l)
    old_model = copy.deepcopy(model)
    _perturb(model, 0.02, seed=2)
    return trainer, old_model, rollouts, batch


def _make_stop_likely(scorer, data, index: int) -> None:
    """Point the stop token's LM-head row along the mean reasoning hidden state, so that some rollouts stop early
    (with random weights a stop is about 1 token in 500)."""
    torch.manual_seed(0)
    probe = scorer.teacher_rollouts(data.images([index]).double(), data.prompts([index]), "alignment", 2, 5, 0.7)
    with torch.no_grad():
        hidden = scorer.hidden_states({"input_ids": probe.input_ids, "attention_mask": probe.attention_mask,
                                       "mm_token_type_ids": probe.mm_token_type_ids}, probe.pixel_values,
                                      probe.image_grid_thw)
        mean = hidden[probe.completion_mask.bool()].mean(0)
        scorer.lm_head_weight()[scorer.stop_ids[0]] = 3.0 * mean / mean.norm() ** 2


def test_rewards_and_advantages_match_the_reference(one_batch):
    trainer, old_model, rollouts, batch = one_batch
    rewards, advantages = reference_rewards(old_model, rollouts, batch.s_w, batch.s_l, trainer.scorer.vocab,
                                            trainer.config)
    assert batch.rewards.dtype == torch.float64
    torch.testing.assert_close(batch.rewards, rewards, rtol=0, atol=1e-12)
    # Eq. 3 in float32: the rewards' rounding (half an ulp of their size), over the group's std + eps.
    spread = rewards.std(-1, keepdim=True) + trainer.config.advantage_eps
    bound = 4 * torch.finfo(torch.float32).eps * rewards.abs().amax(-1, keepdim=True) / spread
    assert bool(((batch.advantages.double() - advantages).abs() <= bound).all())
    assert float(advantages.abs().max()) > 0.5  # the groups' rewards do differ


@pytest.mark.parametrize("aggregation", ["sequence", "token", "sum"])
def test_one_update_matches_the_float64_reference(one_batch, aggregation):
    trainer, old_model, rollouts, batch = one_batch
    lengths = rollouts.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the rollouts must differ in length"
    ended = rollouts.end_tokens >= 0
    assert bool(ended.any()) and not bool(ended.all()), "some rollouts must end on a stop token, some not"
    _, advantages = reference_rewards(old_model, rollouts, batch.s_w, batch.s_l, trainer.scorer.vocab,
                                      trainer.config)
    advantages = advantages.float()  # stored in float32 by the trainer: both sides get the same values
    trainer.config = dataclasses.replace(trainer.config, aggregation=aggregation)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    out = trainer.loss_from_rollouts(batch._replace(advantages=advantages))
    out.loss.backward()
    assert 0 < float(out.clip_fraction) < 1, "the clipped branch must be exercised"

    reference_model = copy.deepcopy(model)
    reference_model.zero_grad(set_to_none=True)
    want = reference_loss(trainer.reference, old_model, reference_model, rollouts, batch.s_w, batch.s_l,
                          advantages.double(), trainer.scorer.vocab, len(trainer.scorer.prefix_ids), trainer.config)
    want.backward()
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-14)
    for (name, got), (_, expected) in zip(model.named_parameters(), reference_model.named_parameters()):
        assert got.grad is not None and expected.grad is not None, name
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-9, atol=1e-13, msg=name)
    model.zero_grad(set_to_none=True)
