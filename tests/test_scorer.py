"""RewardScorer on a tiny random-weight Qwen3.5: student scores, gradients, teacher rollouts."""
import pytest
import torch

from zr_kernels import reference
from zreward.experiments.tiny_models import tiny_qwen3_vl, tiny_qwen35
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import RewardScorer
from zreward.scoring.vocab import ScoreVocab

PROMPTS = ["a cat", "two red apples on a wooden table"]


@pytest.fixture(scope="module")
def scorer():
    model, processor = tiny_qwen35(seed=0)
    return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))


def _images(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _full_logits_reference(scorer, batch, pixel_values, grid, positions):
    """Full LM head over every position (what the scorer avoids), last real position, reference softmax."""
    logits = scorer.model(**batch, pixel_values=pixel_values, image_grid_thw=grid).logits
    last = logits[torch.arange(logits.shape[0]), positions]
    return reference.score_distribution(last, scorer.vocab.token_ids, scorer.vocab.values)


@pytest.fixture(scope="module")
def qwen3_vl_scorer():
    model, processor = tiny_qwen3_vl(seed=0)
    return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))


@pytest.mark.parametrize("which", ["scorer", "qwen3_vl_scorer"])
def test_student_scores_equal_full_logits_reference(which, request):
    from zreward.scoring.image_processing import preprocess_images
    from zreward.scoring.rubric import chat_prompt

    scorer = request.getfixturevalue(which)
    images = _images()
    dist = scorer.student_scores(images, PROMPTS)
    assert dist.probs.shape == (2, 4, 9) and dist.mean.shape == dist.std.shape == (2, 4)
    torch.testing.assert_close(dist.probs.sum(-1), torch.ones(2, 4))

    # The reference: each (image, dimension) sequence alone through the HF processor path, no padding.
    tok = scorer.tokenizer
    for b, prompt in enumerate(PROMPTS):
        pixel_values, grid = preprocess_images(images[b:b + 1], scorer.image_processor)
        for d, dimension in enumerate(DIMENSIONS):
            text = chat_prompt(tok, prompt, dimension).replace("<|image_pad|>", "<|image_pad|>" * 4)
            batch = tok([text], return_tensors="pt", add_special_tokens=False)
            batch["mm_token_type_ids"] = (batch["input_ids"] == scorer.image_token_id).int()
            ref = _full_logits_reference(scorer, dict(batch), pixel_values, grid,
                                         torch.tensor([batch["input_ids"].shape[1] - 1]))
            torch.testing.assert_close(dist.probs[b, d], ref.probs[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dist.mean[b, d], ref.mean[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dist.std[b, d], ref.std[0], rtol=1e-4, atol=1e-5)


def test_dimension_subset_and_rows_independent(scorer):
    images = _images(3, seed=1)
    prompts = PROMPTS + ["a very long prompt about a lighthouse on a cliff at dusk with seagulls"]
    full = scorer.student_scores(images, prompts)
    part = scorer.student_scores(images[1:2], prompts[1:2], ("aesthetics",))
    assert part.probs.shape == (1, 1, 9)
    torch.testing.assert_close(part.probs[0, 0], full.probs[1, 2], rtol=1e-4, atol=1e-5)


def test_gradients_reach_pixels_and_parameters(scorer):
    images = _images().requires_grad_()
    scorer.model.zero_grad()
    dist = scorer.student_scores(images, PROMPTS, ("realism", "plausibility"))
    (dist.mean.sum() + dist.std.sum()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    head = scorer.lm_head_weight().grad
    rows = torch.zeros(head.shape[0], dtype=torch.bool)
    rows[scorer.vocab.token_ids] = True
    # Only the K score rows of the LM head get a gradient: no full-vocabulary logits were formed.
    assert head[rows].abs().sum() > 0 and head[~rows].abs().sum() == 0
    visual = next(p for n, p in scorer.model.named_parameters() if "visual" in n and p.grad is not None)
    assert visual.grad.abs().sum() > 0
    scorer.model.zero_grad()


def test_student_scores_go_through_linear_score_not_the_lm_head(scorer):
    import zr_kernels

    calls = []
    handle = scorer.model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        with zr_kernels.trace_backends() as ran:
            scorer.student_scores(_images(1), PROMPTS[:1])
    finally:
        handle.remove()
    assert calls == []
    assert any(op == "linear_score" for op, _ in ran)


def test_attention_implementations_agree():
    model, processor = tiny_qwen35(seed=3)
    vocab = ScoreVocab.from_tokenizer(processor.tokenizer)
    images = _images(seed=2)
    sdpa = RewardScorer(model, processor, vocab).student_scores(images, PROMPTS, ("alignment",))
    eager = RewardScorer(model, processor, vocab, attn_implementation="eager").student_scores(
        images, PROMPTS, ("alignment",))
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa.probs, eager.probs, rtol=1e-4, atol=1e-5)


def test_teacher_rollouts(scorer):
    torch.manual_seed(0)
    images = _images()
    rollouts = scorer.teacher_rollouts(images, PROMPTS, "realism", num_samples=3, max_new_tokens=6)
    assert rollouts.scores.probs.shape == (2, 3, 9) and rollouts.scores.mean.shape == (2, 3)
    n = 6
    assert rollouts.input_ids.shape[0] == n and len(rollouts.completions) == n
    assert rollouts.image_grid_thw.shape == (n, 3) and rollouts.pixel_values.shape == (n * 16, 1536)
    lengths = rollouts.completion_mask.sum(1)
    assert bool((lengths <= 6).all())
    prefix = torch.tensor(scorer.prefix_ids)
    for i in range(n):
        end = int(rollouts.score_positions[i])
        assert int(rollouts.attention_mask[i].sum()) == end + 1
        assert torch.equal(rollouts.input_ids[i, end + 1 - len(prefix):end + 1], prefix)
        completion = rollouts.input_ids[i][rollouts.completion_mask[i].bool()]
        assert not set(completion.tolist()) & set(scorer.stop_ids)

    # Recomputed under the same model: same scores, and completion log-probs equal to the full-logits reference.
    token_logprobs, scores = scorer.rollout_forward(rollouts)
    torch.testing.assert_close(scores.probs, rollouts.scores.probs, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        logits = scorer.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                              mm_token_type_ids=rollouts.mm_token_type_ids, pixel_values=rollouts.pixel_values,
                              image_grid_thw=rollouts.image_grid_thw).logits
    expected = logits[:, :-1].log_softmax(-1).gather(-1, rollouts.input_ids[:, 1:, None])[..., 0]
    mask = rollouts.completion_mask[:, 1:].bool()
    torch.testing.assert_close(token_logprobs[:, 1:][mask], expected[mask], rtol=1e-4, atol=1e-5)
    assert bool((token_logprobs[:, 1:][~mask] == 0).all())
    (token_logprobs.sum() + scores.mean.sum()).backward()
    assert scorer.lm_head_weight().grad.abs().sum() > 0
    scorer.model.zero_grad()


def test_teacher_rollouts_never_sample_vision_placeholders():
    model, processor = tiny_qwen35(seed=3)
    scorer = RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))
    with torch.no_grad():  # make the image placeholder by far the likeliest next token
        weight = scorer.lm_head_weight()
        weight[scorer.image_token_id] = 50 * weight.abs().max()
    rollouts = scorer.teacher_rollouts(_images(), PROMPTS, "realism", num_samples=2, max_new_tokens=5)
    for i in range(rollouts.input_ids.shape[0]):
        completion = rollouts.input_ids[i][rollouts.completion_mask[i].bool()]
        assert not set(completion.tolist()) & set(scorer.vision_token_ids)
    scorer.rollout_forward(rollouts)  # re-encoding must still match the image features


def test_teacher_rollouts_of_a_set_length():
    model, processor = tiny_qwen35(seed=3)
    scorer = RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))
    with torch.no_grad():  # make a stop token by far the likeliest next token: only min_new_tokens holds it back
        weight = scorer.lm_head_weight()
        weight[scorer.stop_ids[0]] = 50 * weight.abs().max()
    torch.manual_seed(0)
    rollouts = scorer.teacher_rollouts(_images(), PROMPTS, "realism", num_samples=2, max_new_tokens=5,
                                       min_new_tokens=5)
    assert rollouts.completion_mask.sum(1).tolist() == [5] * 4
    assert rollouts.end_tokens.tolist() == [-1] * 4  # ran to max_new_tokens: no end token was sampled
    stopped = scorer.teacher_rollouts(_images(), PROMPTS, "realism", num_samples=2, max_new_tokens=5,
                                      min_new_tokens=2)
    assert stopped.end_tokens.tolist() == [scorer.stop_ids[0]] * 4  # every row stopped before the limit
    assert all(2 <= n < 5 for n in stopped.completion_mask.sum(1).tolist())


def test_cut_completion_at_written_answer_prefix(scorer):
    """The reasoning and the token that ended it: the written prefix's first token, the stop token, or none."""
    prefix, stop = scorer.prefix_ids, scorer.stop_ids[0]
    assert scorer.cut_completion([5, 6, *prefix, 30, stop, 7]) == ([5, 6], prefix[0])
    assert scorer.cut_completion([5, 6, stop, *prefix]) == ([5, 6], stop)
    assert scorer.cut_completion([stop]) == ([], stop)
    assert scorer.cut_completion([5, 6]) == ([5, 6], -1)


@pytest.mark.parametrize("call, error, match", [
    (lambda s: s.student_scores(_images(), ["one prompt"]), ValueError, "one prompt per image"),
    (lambda s: s.student_scores(torch.rand(2, 3, 64), PROMPTS), ValueError, "images must have 4 dimension"),
    (lambda s: s.student_scores(_images(), "a cat"), TypeError, "sequence of strings"),
    (lambda s: s.student_scores(_images(), PROMPTS, ("sharpness",)), ValueError, "dimension must be one of"),
    (lambda s: s.student_scores(_images(), PROMPTS, temperature=0.0), ValueError, "temperature"),
    (lambda s: s.teacher_rollouts(_images(), PROMPTS, "realism", 0, 4), ValueError, "num_samples"),
    (lambda s: s.teacher_rollouts(_images(), PROMPTS, "realism", 2, 0), ValueError, "max_new_tokens"),
    (lambda s: s.teacher_rollouts(_images(), PROMPTS, "realism", 2, 4, min_new_tokens=5), ValueError,
     "min_new_tokens"),
])
def test_bad_arguments(scorer, call, error, match):
    with pytest.raises(error, match=match):
        call(scorer)


def test_bad_constructor_arguments():
    model, processor = tiny_qwen35()
    vocab = ScoreVocab.from_tokenizer(processor.tokenizer)
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        RewardScorer(model, processor, vocab, attn_implementation="flex")
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        with pytest.raises(ValueError, match="flash-attn"):
            RewardScorer(model, processor, vocab, attn_implementation="flash_attention_2")
    too_big = ScoreVocab(vocab.texts, [t + 10_000 for t in vocab.token_ids], vocab.values)
    with pytest.raises(ValueError, match="LM head"):
        RewardScorer(model, processor, too_big)
