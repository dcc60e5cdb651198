"""Shared image encoding and shared prompt prefix (zreward.scoring.shared_prefix) against every prompt run on its own.

The reference is plain transformers: one ``model(...)`` call per (image, dimension) row, without padding, full
logits at the last position, ``zr_kernels.reference.score_distribution``. Scores and pixel gradients must agree
to fp32 rounding, on Qwen3.5 (linear-attention + full-attention layers, prefixes shorter and longer than a
gated-delta chunk) and on Qwen3-VL (deepstack features).
"""
import pytest
import torch

from zr_kernels import reference
from zreward.experiments.tiny_models import tiny_qwen3_vl, tiny_qwen35
from zreward.scoring.image_processing import preprocess_images
from zreward.scoring.rubric import DIMENSIONS, chat_prompt
from zreward.scoring.scorer import RewardScorer
from zreward.scoring.shared_prefix import shared_prefix_hidden, split_rows
from zreward.scoring.vocab import ScoreVocab

PROMPTS = ["a cat", "two red apples on a wooden table"]
# Three gated-delta-net layers and one attention layer, grouped values, patch 8: 128 px images give 64
# placeholders, so the shared prefix (72 tokens) spans two gated-delta chunks of 64.
LONG_PREFIX = dict(vision_config={"patch_size": 8}, num_hidden_layers=4, linear_num_value_heads=4,
                   layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])


def _scorer(build, **kwargs):
    model, processor = build(seed=0, **kwargs)
    return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))


@pytest.fixture(scope="module", params=["qwen3.5", "qwen3.5 long prefix", "qwen3-vl"])
def case(request):
    if request.param == "qwen3.5":
        return _scorer(tiny_qwen35), 64
    if request.param == "qwen3.5 long prefix":
        return _scorer(tiny_qwen35, **LONG_PREFIX), 128
    return _scorer(tiny_qwen3_vl), 64


def _images(batch, size, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _one_by_one(scorer, images, prompts, dimensions):
    """``[B, D, K]`` probabilities, each row alone through ``model(...)`` (the unshared route)."""
    tok = scorer.tokenizer
    rows = []
    for b, prompt in enumerate(prompts):
        pixel_values, grid = preprocess_images(images[b:b + 1], scorer.image_processor)
        tokens = int(grid.prod()) // scorer.image_processor.merge_size ** 2
        for dimension in dimensions:
            text = chat_prompt(tok, prompt, dimension).replace(scorer.image_token, scorer.image_token * tokens)
            batch = tok([text], return_tensors="pt", add_special_tokens=False)
            batch["mm_token_type_ids"] = (batch["input_ids"] == scorer.image_token_id).int()
            logits = scorer.model(**batch, pixel_values=pixel_values, image_grid_thw=grid).logits[:, -1]
            rows.append(reference.score_distribution(logits, scorer.vocab.token_ids, scorer.vocab.values).probs[0])
    return torch.stack(rows).view(len(prompts), len(dimensions), -1)


def test_scores_and_pixel_gradients_equal_unshared(case):
    scorer, size = case
    images = _images(2, size).requires_grad_()
    weights = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(1))
    shared = scorer.student_scores(images, PROMPTS).probs
    (grad,) = torch.autograd.grad((shared * weights).sum(), images)

    alone = _one_by_one(scorer, images, PROMPTS, DIMENSIONS)
    (grad_alone,) = torch.autograd.grad((alone * weights).sum(), images)
    torch.testing.assert_close(shared, alone, rtol=1e-4, atol=1e-6)
    assert grad_alone.abs().max() > 0
    torch.testing.assert_close(grad, grad_alone, rtol=1e-3, atol=1e-6 * grad_alone.abs().max().item())


def _relative_error(got, want):
    return ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()


def test_prefix_states_carry_over(case):
    """Suffixes of 2 to 5 tokens, where the prefix's recurrent and conv states and keys/values weigh most: the last
    hidden states and their pixel gradients equal each row's own forward (dropping the recurrent state of the
    gated delta nets alone moves them by ~5e-3 here, the conv state by ~1e-1)."""
    scorer, size = case
    images = _images(2, size, seed=5).requires_grad_()
    pixel_values, grid = preprocess_images(images, scorer.image_processor)
    texts = [chat_prompt(scorer.tokenizer, p, d) for p in PROMPTS for d in DIMENSIONS]
    rows = [scorer.tokenizer.encode(t, add_special_tokens=False) for t in scorer.expand_image_tokens(texts, grid, 4)]
    shared_length = split_rows(rows, 4, 0, scorer.image_token_id).prefix.shape[1]
    rows = [row[:shared_length + 2 + i % 4] for i, row in enumerate(rows)]
    hidden = shared_prefix_hidden(scorer.model, split_rows(rows, 4, 0, scorer.image_token_id), pixel_values, grid)

    per_image = pixel_values.view(2, -1, pixel_values.shape[-1])
    alone = []
    for i, row in enumerate(rows):
        ids = torch.tensor([row])
        alone.append(scorer.model.model(input_ids=ids, mm_token_type_ids=(ids == scorer.image_token_id).int(),
                                        pixel_values=per_image[i // 4], image_grid_thw=grid[i // 4:i // 4 + 1],
                                        ).last_hidden_state[0, -1])
    alone = torch.stack(alone)
    assert _relative_error(hidden, alone) < 1e-5
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((hidden * weights).sum(), images, retain_graph=True)  # preprocessing is shared
    (grad_alone,) = torch.autograd.grad((alone * weights).sum(), images)
    assert _relative_error(grad.flatten(1), grad_alone.flatten(1)) < 1e-4


def test_single_dimension_and_parameter_gradients(case):
    """One dimension: the prefix stops one token short of the whole prompt. Weight gradients agree too."""
    scorer, size = case
    images = _images(1, size, seed=3)
    visual = next(p for n, p in scorer.model.named_parameters() if "visual" in n and p.dim() == 2)
    shared = scorer.student_scores(images, PROMPTS[1:], ("plausibility",)).mean
    (grad,) = torch.autograd.grad(shared.sum(), visual)
    alone = _one_by_one(scorer, images, PROMPTS[1:], ("plausibility",)) @ scorer.vocab.values
    (grad_alone,) = torch.autograd.grad(alone.sum(), visual)
    torch.testing.assert_close(shared, alone, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, grad_alone, rtol=1e-3, atol=1e-6 * grad_alone.abs().max().item())


def test_gradient_checkpointing_is_honoured():
    """With activation checkpointing enabled (training mode) the decoder layers keep only their inputs."""
    scorer = _scorer(tiny_qwen35, **LONG_PREFIX)
    images = _images(2, 64, seed=7).requires_grad_()
    results = []
    for enabled in (False, True):
        if enabled:  # the method's name from transformers 5.2x; 5.17 has only the older one
            model = scorer.model
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        scorer.model.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            mean = scorer.student_scores(images, PROMPTS).mean
        results.append((mean, torch.autograd.grad(mean.sum(), images)[0], sum(saved)))
    (mean, grad, saved), (mean_ckpt, grad_ckpt, saved_ckpt) = results
    torch.testing.assert_close(mean_ckpt, mean)
    torch.testing.assert_close(grad_ckpt, grad)
    assert saved_ckpt < saved / 2


def test_split_rows():
    image, pad = 7, 0
    rows = [[1, image, image, 2, 3, 4], [1, image, image, 2, 5],  # image 0: shares 4 tokens
            [1, image, image, 9, 3], [1, image, image, 9, 3]]      # image 1: shares 5, but one prefix length for all
    split = split_rows(rows, 2, pad, image)
    assert split.prefix.tolist() == [[1, image, image, 2], [1, image, image, 9]]
    # Grouped by position within the image (dimension), one row per image, padded within the group only.
    assert [t.tolist() for t in split.suffixes] == [[[3, 4], [3, pad]], [[5], [3]]]
    assert [t.tolist() for t in split.lasts] == [[1, 0], [0, 0]]
    # Identical rows still leave one suffix token (the position the score is read at).
    assert split_rows([[1, image, 2], [1, image, 2]], 2, pad, image).prefix.tolist() == [[1, image]]


@pytest.mark.parametrize("rows, per_image, match", [
    ([[1, 7, 2], [1, 3, 7]], 2, "image placeholders after"),
    ([[1, 7, 2], [1, 7, 3], [1, 7, 4]], 2, "multiple of rows_per_image"),
    ([[1, 7, 2]], 0, "multiple of rows_per_image"),
])
def test_split_rows_rejects(rows, per_image, match):
    with pytest.raises(ValueError, match=match):
        split_rows(rows, per_image, 0, 7)
