"""Score vocabulary and rubric prompts on the tiny Qwen-style tokenizer."""
import os

import pytest
import torch

from zreward.scoring import rubric
from zreward.experiments.tiny_models import tiny_tokenizer
from zreward.scoring.vocab import DEFAULT_SCORE_TEXTS, DEFAULT_VALUES, ScoreVocab


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_default_vocab_is_nine_single_digit_tokens(tokenizer):
    vocab = ScoreVocab.from_tokenizer(tokenizer)
    assert vocab.texts == list(DEFAULT_SCORE_TEXTS) == [str(d) for d in range(1, 10)]
    assert vocab.values.dtype == torch.float32
    assert vocab.values.tolist() == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0] == list(DEFAULT_VALUES)
    assert [tokenizer.decode([i]) for i in vocab.token_ids] == vocab.texts
    assert vocab.num_bins == 9 and (vocab.score_min, vocab.score_max) == (1.0, 5.0)


@pytest.mark.parametrize("texts, values, match", [
    ([" 4", "5"], [1.0, 2.0], "single token"),
    (["1.5", "2"], [1.0, 2.0], "single token"),
    (["4", "4"], [1.0, 2.0], "distinct"),
    (["1", "2"], [2.0, 1.0], "increasing"),
    (["1", "2"], [1.0], "equal length"),
    ([], [], "non-empty"),
])
def test_bad_score_texts(tokenizer, texts, values, match):
    with pytest.raises(ValueError, match=match):
        ScoreVocab.from_tokenizer(tokenizer, texts, values)


def test_bin_index(tokenizer):
    vocab = ScoreVocab.from_tokenizer(tokenizer)
    assert [vocab.bin_index(s) for s in (1.0, 1.5, 3.0, 5.0)] == [0, 1, 4, 8]
    assert vocab.bin_index(3.2) == 4 and vocab.bin_index(3.25) == 4 and vocab.bin_index(3.3) == 5
    assert vocab.bin_indices(torch.tensor([[1.0, 5.0]])).tolist() == [[0, 8]]
    for bad in (0.5, 5.5):
        with pytest.raises(ValueError, match="score must lie in"):
            vocab.bin_index(bad)


@pytest.mark.parametrize("dimension", rubric.DIMENSIONS)
def test_score_token_follows_answer_prefix(tokenizer, dimension):
    """Tokenising prompt + digit gives the prompt's tokens + the digit's token: the score is the next token."""
    vocab = ScoreVocab.from_tokenizer(tokenizer)
    text = rubric.chat_prompt(tokenizer, "two cats, one black", dimension)
    assert text.endswith(rubric.ANSWER_PREFIX) and "<think>\n\n</think>" in text
    base = tokenizer.encode(text, add_special_tokens=False)
    for digit, token_id in zip(vocab.texts, vocab.token_ids):
        assert tokenizer.encode(text + digit, add_special_tokens=False) == base + [token_id]


def test_rubric_texts():
    assert rubric.DIMENSIONS == ("alignment", "realism", "aesthetics", "plausibility")
    for dimension in rubric.DIMENSIONS:
        assert len(rubric.RUBRICS[dimension]) == 5
        text = rubric.instruction("a fox", dimension)
        assert rubric.DIMENSION_NAMES[dimension] in text and "a fox" in text
        assert "9 means score 5" in text and "8 means 4.5" in text
        assert "Reason step by step" in rubric.instruction("a fox", dimension, reasoning=True)
    # An image's four prompts differ only from the rubric on: the prompt, scale and answer format are shared.
    shared = os.path.commonprefix([rubric.instruction("a fox", d) for d in rubric.DIMENSIONS])
    assert shared.endswith("Prompt: a fox\nRubric (") and "9 means score 5" in shared
    with pytest.raises(ValueError, match="dimension must be one of"):
        rubric.instruction("a fox", "sharpness")


def test_teacher_prompt_opens_thinking(tokenizer):
    text = rubric.chat_prompt(tokenizer, "a fox", "realism", reasoning=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert text.count("<|image_pad|>") == 1


def test_tokenizer_is_deterministic(tokenizer):
    assert tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


def _image_token_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_prompt_tokens_check_passes_the_digits(tokenizer):
    from zreward.scoring.vocab import check_prompt_tokens

    check_prompt_tokens(tokenizer, ScoreVocab.from_tokenizer(tokenizer), _image_token_id(tokenizer))


def test_prompt_tokens_check_names_a_score_text_that_merges_with_the_prefix(tokenizer):
    """A letter is one token on its own, but after the prefix's space the Qwen pre-tokenizer joins them: the model
    would be asked for a token it never sees there."""
    from zreward.scoring.vocab import check_prompt_tokens

    vocab = ScoreVocab.from_tokenizer(tokenizer, ["a", "b"], [1.0, 5.0])
    with pytest.raises(ValueError, match="score text 'a' after the answer prefix 'Score: ' tokenizes as"):
        check_prompt_tokens(tokenizer, vocab, _image_token_id(tokenizer))


def test_prompt_tokens_check_needs_a_chat_template_with_one_image(tokenizer):
    from zreward.scoring.vocab import check_prompt_tokens

    vocab = ScoreVocab.from_tokenizer(tokenizer)
    no_image = tiny_tokenizer()
    no_image.chat_template = tokenizer.chat_template.replace("<|image_pad|>", "")
    with pytest.raises(ValueError, match="renders 0 image placeholders .* in the student prompt"):
        check_prompt_tokens(no_image, vocab, _image_token_id(tokenizer))
    no_image.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        check_prompt_tokens(no_image, vocab, _image_token_id(tokenizer))
