"""RewardDance-style SFT on written rationale + score: the loss against hand-computed values, the rationales of the
synthetic task, the written layout against the scorer's sampled one, and the trainer on a tiny model."""
import pytest
import torch

from zreward.experiments.rationales import DEFECT_WORDS, SEVERITIES, label_rationales, rationale
from zreward.training.rationale_sft import RationaleSFTConfig, RationaleSFTTrainer, rationale_sft_loss, written_batch


def test_loss_on_hand_computed_rows():
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-1.0, -1.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2: one rationale token + the stop token
    score_nll = torch.tensor([0.3, 0.6])
    loss = rationale_sft_loss(logprobs, mask, score_nll)
    # by hand: row 1 (0.5 + 1.0 + 2.0 + 0.3) / 4 = 0.95, row 2 (1.0 + 1.0 + 0.6) / 3; the padding slot not at all
    assert loss.item() == pytest.approx((0.95 + 2.6 / 3) / 2)
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-1 / 8] * 3)
    assert logprobs.grad[1].tolist() == pytest.approx([-1 / 6, -1 / 6, 0.0])


def test_loss_names_the_bad_argument():
    with pytest.raises(ValueError, match="score_nll"):
        rationale_sft_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3))


def test_rationales_give_the_coarse_severity_of_the_label():
    assert rationale("alignment", 5.0) == rationale("alignment", 4.0) == " slight colour"
    assert rationale("realism", 3.5) == rationale("realism", 2.5) == " salient image"
    assert rationale("plausibility", 2.0) == rationale("plausibility", 1.0) == " wrong object"
    assert {rationale(d, s / 2) for d in DEFECT_WORDS for s in range(2, 11)} == \
        {sev + word for sev in SEVERITIES for word in DEFECT_WORDS.values()}
    for bad in (0.5, 3.25, 5.5):
        with pytest.raises(ValueError, match="score"):
            rationale("realism", bad)
    with pytest.raises(ValueError, match="dimension"):
        rationale("colour", 3.0)


@pytest.fixture(scope="module")
def tiny():
    from zreward.experiments.synthetic import SyntheticPreferences
    from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer

    return (lambda: tiny_scorer(0, STUDENT_CONFIG)), SyntheticPreferences(2, 3, 32, seed=0, spread=1)


def test_written_rows_are_laid_out_as_sampled_rollouts(tiny):
    build, data = tiny
    scorer = build()
    tokenizer = scorer.tokenizer
    torch.manual_seed(0)
    sampled = scorer.teacher_rollouts(data.images([0, 1]), data.prompts([0, 1]), "aesthetics", 1, 3)
    texts = [" slight lighting", " salient lighting"]
    written = written_batch(scorer, data.images([0, 1]), data.prompts([0, 1]), "aesthetics", texts)
    for n, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        start = int(sampled.completion_mask[n].argmax())  # the prompt is the same tokens as the sampled rollout's
        row = written.batch["input_ids"][n][:written.batch["attention_mask"][n].sum()].tolist()
        assert row == sampled.input_ids[n][:start].tolist() + ids + scorer.prefix_ids
        assert int(written.score_positions[n]) == len(row) - 1
        # the rationale's tokens then the end-of-turn token, each predicted from the position before it
        count = len(ids) + 1
        assert written.targets[n, :count].tolist() == ids + [tokenizer.eos_token_id]
        assert written.positions[n, :count].tolist() == list(range(start - 1, start + len(ids)))
        assert written.mask[n].tolist() == [1.0] * count + [0.0] * (written.mask.shape[1] - count)
    torch.testing.assert_close(written.pixel_values, sampled.pixel_values)
    with pytest.raises(ValueError, match="rationales"):
        written_batch(scorer, data.images([0, 1]), data.prompts([0, 1]), "aesthetics", texts[:1])


def test_trainer_fits_the_rationales_and_scores(tiny):
    build, data = tiny
    scorer = build()
    config = RationaleSFTConfig(pairs_per_batch=2, updates_per_batch=1, lr=3e-3)
    torch.manual_seed(0)
    trainer = RationaleSFTTrainer(scorer, data, data.pairs(["realism"]), label_rationales(data), config)
    history = trainer.train(12)
    assert [m["step"] for m in history] == list(range(1, 13))
    # the written tokens of one rationale + the stop token: 3 or 4
    assert all(3 <= m["written_tokens"] <= 4 for m in history)
    first, last = history[0], history[-1]
    assert last["rationale_nll"] < first["rationale_nll"] - 1.0  # nats per written token
    with pytest.raises(TypeError, match="rationale"):
        RationaleSFTTrainer(scorer, data, data.pairs(), " slight image", config)


def test_reasoning_probe_counts_format_and_matches():
    import types

    from zreward.experiments.rationales import reasoning_probe
    from zreward.experiments.synthetic import SyntheticPreferences

    data = SyntheticPreferences(1, 2, 32, seed=0)
    right = {d: [rationale(d, item.scores[d]) for item in data.items] for d in DEFECT_WORDS}

    class Writer:
        """Writes image 0's own rationale, a rationale of another severity for image 1 (2 and 3 tokens)."""

        def teacher_rollouts(self, images, prompts, dimension, samples, max_new_tokens):
            other = next(s for s in SEVERITIES if not right[dimension][1].startswith(s)) + DEFECT_WORDS[dimension]
            return types.SimpleNamespace(completions=[right[dimension][0], other],
                                         completion_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))

    probe = reasoning_probe(Writer(), data, "cpu", 3)
    assert probe == {"tokens_per_score": 2.5 + 1, "rationale_format": 1.0, "rationale_match": 0.5}
