"""GDSO: chunked token log-probs, the clipped GRPO surrogate (vs Liger), Eq. 7-14, and the Algorithm 1 trainer."""
import types

import pytest
import torch

import zr_kernels
from zreward.training.gdso import (GDSOConfig, GDSOTrainer, completion_layout, dimension_batches, gdso_loss,
                                   gdso_rewards_and_advantages, grpo_surrogate, k3_kl, parsed_scores, policy_loss,
                                   token_logprobs)


def _full_logprobs(hidden, weight, targets, temperature=1.0):
    logits = (hidden @ weight.T).float() / temperature
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_token_logprobs_match_full_logits(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    targets = torch.randint(0, 37, (3, 7))
    got = token_logprobs(hidden, weight, targets, chunk_size=chunk_size, temperature=0.7)
    want = _full_logprobs(hidden, weight, targets, 0.7)
    torch.testing.assert_close(got, want)
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad(got, (hidden, weight), upstream)
    want_grads = torch.autograd.grad(want, (hidden, weight), upstream)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_token_logprobs_never_keep_more_than_one_chunk_of_logits():
    vocab, chunk = 101, 4
    hidden = torch.randn(2, 9, 3, requires_grad=True)
    weight = torch.randn(vocab, 3, requires_grad=True)  # smaller than one chunk of logits
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = token_logprobs(hidden, weight, torch.randint(0, vocab, (2, 9)), chunk_size=chunk)
    out.sum().backward()
    assert max(saved) < 2 * chunk * vocab, "no saved tensor may hold logits for more than one chunk"
    assert hidden.grad is not None and weight.grad is not None


def test_surrogate_formula_and_aggregations():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -2.5], [-0.5, -1.0, 0.0]])
    ref = torch.tensor([[-1.0, -2.2, -3.0], [-0.6, -1.5, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    ratio = (logp - old).exp()
    per_token = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.3) * adv[:, None]) + 0.1 * k3_kl(logp, ref)
    seq, _ = grpo_surrogate(logp, old, adv, mask, ref_logprobs=ref, beta=0.1, eps_low=0.2, eps_high=0.3)
    tok, stats = grpo_surrogate(logp, old, adv, mask, ref_logprobs=ref, beta=0.1, eps_low=0.2, eps_high=0.3,
                                aggregation="token")
    summed, _ = grpo_surrogate(logp, old, adv, mask, ref_logprobs=ref, beta=0.1, eps_low=0.2, eps_high=0.3,
                               aggregation="sum")
    torch.testing.assert_close(seq, ((per_token * mask).sum(1) / mask.sum(1)).mean())
    torch.testing.assert_close(tok, (per_token * mask).sum() / mask.sum())
    torch.testing.assert_close(summed, (per_token * mask).sum(1).mean())  # Eq. 4 as written
    # token (0, 2): ratio e^-0.5 < 0.8 with A > 0 is not clipped; (1, 1): ratio e^-0.5 with A < 0 is clipped
    assert stats.clip_fraction == pytest.approx(1 / 5)
    assert k3_kl(logp, logp).abs().max() == 0


def test_clipped_tokens_get_no_policy_gradient():
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)  # ratios e^0.5 (clipped) and 1
    loss, _ = grpo_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), eps_high=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0


@pytest.mark.parametrize("aggregation", ["sequence", "token", "sum"])
def test_chunked_policy_loss_matches_liger(aggregation):
    pytest.importorskip("liger_kernel.chunked_loss")
    torch.manual_seed(1)
    n, t, d, v = 6, 5, 8, 50
    hidden = (0.3 * torch.randn(n, t, d)).requires_grad_()
    weight = (0.3 * torch.randn(v, d)).requires_grad_()
    targets = torch.randint(0, v, (n, t))
    mask = torch.ones(n, t)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    base = _full_logprobs(hidden, weight, targets).detach()
    old, ref = base + 0.2 * torch.randn(n, t), base + 0.2 * torch.randn(n, t)
    adv = torch.randn(n)
    results = []
    for backend in ("chunked", "liger"):
        loss, stats = policy_loss(hidden, weight, targets, mask, adv, old, ref, beta=0.1, eps_low=0.2,
                                  eps_high=0.28, aggregation=aggregation, chunk_size=7, backend=backend)
        results.append((loss, torch.autograd.grad(loss, (hidden, weight)), stats))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats_a.kl, stats_b.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_a.clip_fraction, stats_b.clip_fraction)


def test_rewards_and_advantages_follow_eq_7_10_13_3():
    torch.manual_seed(2)
    mu_w, mu_l = 1 + 4 * torch.rand(3, 4), 1 + 4 * torch.rand(3, 4)
    s_w, s_l = torch.tensor([4.5, 3.0, 5.0]), torch.tensor([2.0, 2.5, 1.0])
    config = GDSOConfig(lambda_pt=0.3, lambda_pw=0.7)
    rewards, advantages = gdso_rewards_and_advantages(mu_w, mu_l, s_w, s_l, 1.0, 5.0, config)
    gap = (s_w - s_l)[:, None, None]
    r_pw_w = 1 - ((mu_w[:, :, None] - mu_l[:, None, :]) - gap).abs().mean(-1) / 4
    r_pw_l = 1 - ((mu_l[:, :, None] - mu_w[:, None, :]) + gap).abs().mean(-1) / 4
    r_w = 0.3 * (1 - (mu_w - s_w[:, None]).abs() / 4) + 0.7 * r_pw_w
    r_l = 0.3 * (1 - (mu_l - s_l[:, None]).abs() / 4) + 0.7 * r_pw_l
    torch.testing.assert_close(rewards, torch.stack([r_w, r_l], 1))
    want_adv = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(advantages, want_adv, rtol=1e-4, atol=1e-5)
    # Eq. 3's epsilon is config.advantage_eps
    _, damped = gdso_rewards_and_advantages(mu_w, mu_l, s_w, s_l, 1.0, 5.0, GDSOConfig(lambda_pt=0.3, lambda_pw=0.7,
                                                                                       advantage_eps=0.5))
    want_damped = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 0.5)
    torch.testing.assert_close(damped, want_damped, rtol=1e-4, atol=1e-5)


def test_gdso_loss_combines_eq_8_11_14():
    torch.manual_seed(3)
    mu = (1 + 4 * torch.rand(2, 2, 3)).requires_grad_()
    nll = torch.rand(2, 2, 3, requires_grad=True)
    s_w, s_l = torch.tensor([4.0, 3.5]), torch.tensor([2.0, 3.0])
    policy = torch.tensor(0.25, requires_grad=True)
    stats = types.SimpleNamespace(kl=torch.tensor(0.1), clip_fraction=torch.tensor(0.0))
    config = GDSOConfig(alpha_pt=0.5, alpha_pw=2.0)
    out = gdso_loss(policy, stats, mu, nll, s_w, s_l, 4.0, config)
    gap = (s_w - s_l)[:, None, None]
    pair = ((mu[:, 0, :, None] - mu[:, 1, None, :] - gap).abs().sum((1, 2)) * 2) / (2 * 3 * 3 * 4)
    torch.testing.assert_close(out.pairwise, pair.mean().detach())
    torch.testing.assert_close(out.ce, nll.mean().detach())
    torch.testing.assert_close(out.loss, policy + 0.5 * nll.mean() + 2.0 * pair.mean())
    out.loss.backward()
    assert mu.grad.abs().sum() > 0 and policy.grad == 1
    weighted = gdso_loss(policy, stats, mu, nll, s_w, s_l, 4.0, GDSOConfig(alpha_pt=0.5, alpha_pw=2.0, policy_weight=0.25))
    torch.testing.assert_close(weighted.loss, 0.25 * policy + 0.5 * nll.mean() + 2.0 * pair.mean())


def test_parsed_scores_are_bins_drawn_from_the_distribution():
    values = torch.linspace(1.0, 5.0, 9)
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 8], [3, 5]]), 9).float()
    assert parsed_scores(one_hot, values).tolist() == [[1.0, 5.0], [2.5, 3.5]]
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(9), -1)
    draws = parsed_scores(probs.expand(20000, 9), values)
    assert set(draws.unique().tolist()) <= set(values.tolist())
    # unbiased for the expectation (Eq. 6), but quantised to the bins
    assert float(draws.mean()) == pytest.approx(float(probs @ values), abs=0.03)


def test_completion_layout_compacts_reasoning_tokens():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 1, 2, 3, 4]])
    completion = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]])
    positions, targets, mask = completion_layout(types.SimpleNamespace(input_ids=ids, completion_mask=completion))
    assert positions.tolist() == [[2, 3, 1], [2, 3, 4]]
    assert targets[mask.bool()].tolist() == [7, 8, 1, 2, 3]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_completion_layout_trains_the_token_that_ended_the_reasoning():
    """Rows: prompt (2 tokens) + reasoning + a 2-token answer prefix [40, 41] + padding 0. Row 0 stopped on stop
    token 99 (not in input_ids: the prefix took its place), row 1 ran to the token limit, row 2 stopped at once
    (no reasoning), row 3 wrote the answer prefix itself (its first token is the end token)."""
    ids = torch.tensor([[5, 6, 7, 8, 40, 41, 0], [5, 6, 1, 2, 3, 40, 41], [5, 6, 40, 41, 0, 0, 0],
                        [5, 6, 9, 40, 41, 0, 0]])
    completion = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0], [0] * 7, [0, 0, 1, 0, 0, 0, 0]])
    rollouts = types.SimpleNamespace(input_ids=ids, completion_mask=completion,
                                     score_positions=torch.tensor([5, 6, 3, 4]),
                                     end_tokens=torch.tensor([99, -1, 99, 40]))
    positions, targets, mask = completion_layout(rollouts, answer_length=2)
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert positions[mask.bool()].tolist() == [2, 3, 4, 2, 3, 4, 2, 2, 3]  # each predicted from position - 1
    assert targets[mask.bool()].tolist() == [7, 8, 99, 1, 2, 3, 99, 9, 40]
    # without the answer length: the reasoning tokens alone, as before
    _, targets, mask = completion_layout(rollouts)
    assert targets[mask.bool()].tolist() == [7, 8, 1, 2, 3, 9]


def _pairs(counts: dict[str, int]):
    return [types.SimpleNamespace(dimension=d, winner=2 * i, loser=2 * i + 1)
            for d, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("counts, per_batch, world_size", [
    ({"alignment": 61, "realism": 62, "aesthetics": 63, "plausibility": 63}, 4, 1),  # 249 pairs, as the demo
    ({"alignment": 61, "realism": 62, "aesthetics": 63, "plausibility": 63}, 4, 3),
    ({"alignment": 9, "realism": 2}, 4, 4),
    ({"alignment": 5}, 8, 2),
])
def test_dimension_batches_hold_every_pair_once(counts, per_batch, world_size):
    pairs = _pairs(counts)
    batches = dimension_batches(pairs, per_batch, seed=3, world_size=world_size)
    seen = sorted(id(pair) for batch in batches for pair in batch)
    assert seen == sorted(id(pair) for pair in pairs), "every pair exactly once per epoch"
    assert len(batches) % world_size == 0  # whole rounds of one batch per rank: the epoch drops none
    for batch in batches:
        assert 1 <= len(batch) <= per_batch and len({pair.dimension for pair in batch}) == 1
    for dimension, n in counts.items():  # the fewest batches unless more ranks need more
        sizes = [len(b) for b in batches if b[0].dimension == dimension]
        assert max(sizes) - min(sizes) <= 1
        if world_size == 1:
            assert len(sizes) == -(-n // per_batch)


def test_dimension_batches_repeat_batches_only_when_they_cannot_be_split():
    pairs = _pairs({"alignment": 9})
    batches = dimension_batches(pairs, 1, seed=0, world_size=4)  # 9 one-pair batches for 4 ranks: 3 repeated
    assert len(batches) == 12
    assert {id(b[0]) for b in batches} == {id(p) for p in pairs}
    assert batches[9:] == batches[:3]
    with pytest.raises(ValueError, match="world_size"):
        dimension_batches(pairs, 1, seed=0, world_size=0)


@pytest.fixture(scope="module")
def tiny_teacher():
    from zreward.experiments.synthetic import SyntheticPreferences
    from zreward.experiments.tiny_models import tiny_qwen35
    from zreward.scoring.scorer import RewardScorer
    from zreward.scoring.vocab import ScoreVocab

    def build():
        model, processor = tiny_qwen35(seed=0, layer_types=["full_attention"] * 2)
        return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))

    return build, SyntheticPreferences(3, 2, 32, seed=0)


def _config(**kw):
    base = dict(group_size=2, pairs_per_batch=1, steps_per_iteration=2, max_new_tokens=3, lr=1e-3, beta=0.05,
                updates_per_batch=2)
    base.update(kw)
    return GDSOConfig(**base)


def test_recomputed_logprobs_are_the_samplers_at_its_temperature(tiny_teacher):
    """pi_old's and pi_ref's log-probs of the sampled tokens (and the end tokens) are those of the sampling
    distribution, softmax(logits / T), here recomputed independently from the full logits."""
    build, data = tiny_teacher
    torch.manual_seed(0)
    pairs = [p for p in data.pairs() if p.dimension == "alignment"][:1]
    trainer = GDSOTrainer(build(), data, pairs, _config(sample_temperature=0.5, max_new_tokens=4))
    trainer.refresh_reference()
    order = [pairs[0].winner, pairs[0].loser]
    rollouts = trainer.scorer.teacher_rollouts(data.images(order), data.prompts(order), "alignment", 2, 4, 0.5)
    batch = trainer.prepare_batch(rollouts, torch.tensor([pairs[0].score_w]), torch.tensor([pairs[0].score_l]))
    with torch.no_grad():
        logits = trainer.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                               mm_token_type_ids=rollouts.mm_token_type_ids, pixel_values=rollouts.pixel_values,
                               image_grid_thw=rollouts.image_grid_thw).logits
    rows = torch.arange(logits.shape[0]).unsqueeze(-1)
    sampler = torch.log_softmax(logits[rows, batch.positions - 1] / 0.5, -1)
    want = sampler.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    mask = batch.mask.bool()
    torch.testing.assert_close(batch.old_logprobs[mask], want[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.ref_logprobs[mask], want[mask], rtol=1e-5, atol=1e-5)  # pi_ref = pi_old here


def test_trainer_steps_refresh_reference_and_resume_exactly(tiny_teacher, tmp_path):
    build, data = tiny_teacher
    pairs = data.pairs()

    torch.manual_seed(0)
    straight = GDSOTrainer(build(), data, pairs, _config())
    initial = {k: v.clone() for k, v in straight.model.state_dict().items()}
    history = straight.train(3)
    assert [m["step"] for m in history] == [1, 2, 3]
    for metrics in history:
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    changed = any(not torch.equal(v, initial[k]) for k, v in straight.model.state_dict().items())
    assert changed, "GDSO steps must move the policy"
    # step 3 started iteration 2: the reference is the policy after step 2, not the initial weights
    assert not torch.equal(straight.reference.lm_head.weight, initial["lm_head.weight"])

    torch.manual_seed(0)
    first = GDSOTrainer(build(), data, pairs, _config())
    first.train(2)
    first.save(tmp_path / "ckpt")
    torch.manual_seed(99)
    resumed = GDSOTrainer(build(), data, pairs, _config())
    resumed.load(tmp_path / "ckpt")
    resumed.train(3)
    assert resumed.history == history
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, straight.model.state_dict()[name]), name


def test_parsed_reward_source_quantises_the_rewards(tiny_teacher):
    """With Eq. 7 alone, a parsed score on the 0.5 grid gives rewards on a 1/8 grid (range 4); the expected score
    (reward_source="expectation") does not."""
    build, data = tiny_teacher
    rewards = {}
    for source in ("parsed", "expectation"):
        torch.manual_seed(0)
        trainer = GDSOTrainer(build(), data, data.pairs(), _config(reward_source=source, lambda_pt=1.0, lambda_pw=0.0))
        rewards[source] = [m["reward"] * 4 * 8 for m in trainer.train(2)]  # mean of 2 sides x G=2 rewards, x 8
    assert rewards["parsed"] == pytest.approx([round(r) for r in rewards["parsed"]], abs=1e-4)
    assert rewards["expectation"] != pytest.approx([round(r) for r in rewards["expectation"]], abs=1e-4)


def test_policy_weight_zero_trains_the_direct_losses_alone(tiny_teacher):
    """policy_weight=0 with alpha_pw=0 is SFT on the score token: the loss is alpha_pt x Eq. 8, yet the model moves."""
    build, data = tiny_teacher
    torch.manual_seed(0)
    trainer = GDSOTrainer(build(), data, data.pairs(), _config(policy_weight=0.0, alpha_pt=0.5, alpha_pw=0.0))
    initial = trainer.model.lm_head.weight.clone()
    metrics = trainer.step()
    assert metrics["policy"] == 0.0 and metrics["loss"] == pytest.approx(0.5 * metrics["ce"])
    assert not torch.equal(trainer.model.lm_head.weight, initial)


def test_trainer_rejects_bad_config(tiny_teacher):
    build, data = tiny_teacher
    with pytest.raises(ValueError, match="aggregation"):
        GDSOTrainer(build(), data, data.pairs(), _config(aggregation="tokens"))
    with pytest.raises(ValueError, match="reward_source"):
        GDSOTrainer(build(), data, data.pairs(), _config(reward_source="text"))
    with pytest.raises(ValueError, match="policy_weight"):
        GDSOTrainer(build(), data, data.pairs(), _config(policy_weight=-1.0))
    with pytest.raises(ValueError, match="pairs_per_batch"):
        GDSOTrainer(build(), data, data.pairs(), _config(pairs_per_batch=0))
    with pytest.raises(ValueError, match="pairs"):
        GDSOTrainer(build(), data, [], _config())
    with pytest.raises(ValueError, match="advantage_eps"):
        GDSOTrainer(build(), data, data.pairs(), _config(advantage_eps=-1e-3))
    with pytest.raises(ValueError, match="sample_temperature"):
        GDSOTrainer(build(), data, data.pairs(), _config(sample_temperature=0.0))


def test_kernels_are_the_ones_called(tiny_teacher):
    """The trainer goes through the zr_kernels ops (fused on GPU, reference here)."""
    build, data = tiny_teacher
    trainer = GDSOTrainer(build(), data, data.pairs(), _config(updates_per_batch=1))
    with zr_kernels.trace_backends() as ran:
        trainer.step()
    ops = {op for op, _ in ran}
    # The score distribution and Eq. 8's cross-entropy come from linear_score (with a target), not from logits
    # formed by hand and passed to score_distribution.
    assert {"group_advantages", "pairwise_gap", "gdso_rewards", "linear_score"} <= ops
    assert "score_distribution" not in ops
