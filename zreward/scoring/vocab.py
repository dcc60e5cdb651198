"""Score vocabulary: K single tokens of a tokenizer <-> the K score-bin values (paper Sec. 2, Eq. 2).

Qwen tokenizers split numbers into single digits and ``"1.5"`` into three tokens, so the default score
texts are the nine digits ``"1"`` .. ``"9"`` of a 1-9 scale, mapped to the nine half-point bins
1.0, 1.5, ..., 5.0 of the annotation scale (digit ``n`` <-> value ``(n + 1) / 2``). The rubric prompt
states that mapping (see ``zreward.scoring.rubric``). A leading space makes a different token (``" 4"`` is two
tokens in Qwen vocabularies), which is why the answer prefix ends with the space itself.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

DEFAULT_SCORE_TEXTS = tuple(str(digit) for digit in range(1, 10))
DEFAULT_VALUES = tuple(1.0 + 0.5 * i for i in range(9))


@dataclass
class ScoreVocab:
    """``texts[k]`` is token ``token_ids[k]`` of the tokenizer and stands for score ``values[k]`` (fp32 ``[K]``)."""

    texts: list[str]
    token_ids: list[int]
    values: torch.Tensor
    _ids_by_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, texts: Sequence[str] = DEFAULT_SCORE_TEXTS,
                       values: Sequence[float] = DEFAULT_VALUES) -> "ScoreVocab":
        """Look up each text in ``tokenizer``; each must encode to exactly one token, all distinct."""
        texts, values = list(texts), [float(v) for v in values]
        if len(texts) != len(values) or not texts:
            raise ValueError(f"texts and values must be non-empty and of equal length, got {len(texts)} and {len(values)}")
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"values must be strictly increasing, got {values}")
        token_ids = []
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"score text {text!r} must be a single token of the tokenizer, got ids {ids}")
            token_ids.append(ids[0])
        if len(set(token_ids)) != len(token_ids):
            raise ValueError(f"score texts {texts} must map to distinct tokens, got ids {token_ids}")
        return cls(texts, token_ids, torch.tensor(values, dtype=torch.float32))

    def token_ids_on(self, device: torch.device) -> torch.Tensor:
        """``token_ids`` as an int64 tensor on ``device``, copied there once (a copy per call would be a host-to-device
        transfer on every training step)."""
        device = torch.device(device)
        if device not in self._ids_by_device:
            self._ids_by_device[device] = torch.tensor(self.token_ids, dtype=torch.int64, device=device)
        return self._ids_by_device[device]

    @property
    def num_bins(self) -> int:
        return len(self.texts)

    @property
    def score_min(self) -> float:
        return float(self.values[0])

    @property
    def score_max(self) -> float:
        return float(self.values[-1])

    def bin_index(self, score: float) -> int:
        """Index of the bin nearest to ``score`` (the lower one on a tie); ``score`` must lie in the value range."""
        score = float(score)
        if not self.score_min <= score <= self.score_max:
            raise ValueError(f"score must lie in [{self.score_min}, {self.score_max}], got {score}")
        return int((self.values - score).abs().argmin())

    def bin_indices(self, scores: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """``bin_index`` of each score as an int64 tensor of the same shape (targets for ``score_distribution``)."""
        scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
        return torch.tensor([self.bin_index(s) for s in scores.reshape(-1).tolist()], dtype=torch.int64).view(scores.shape)


def check_prompt_tokens(tokenizer, vocab: ScoreVocab, image_token_id: int) -> None:
    """``ValueError`` unless ``tokenizer`` renders the rubric prompts and the score tokens follow them as trained.

    For each dimension: the chat template renders the student and the teacher prompt with exactly one image
    placeholder (``image_token_id``, from the model's config); the student prompt's tokens end with the answer
    prefix's; and each score text written after it adds exactly its one token (a tokenizer that merged the
    prefix's last space with a digit would put a token there the model is never asked for). Messages name the text.
    """
    from zreward.scoring.rubric import ANSWER_PREFIX, DIMENSIONS, chat_prompt

    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: the rubric prompts are chat messages")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prefix = encode(ANSWER_PREFIX)
    for dimension in DIMENSIONS:
        for role, reasoning in (("student", False), ("teacher", True)):
            images = encode(chat_prompt(tokenizer, "a red cube", dimension, reasoning=reasoning)).count(image_token_id)
            if images != 1:
                raise ValueError(f"the chat template renders {images} image placeholders (token {image_token_id}) "
                                 f"in the {role} prompt for {dimension!r}, expected 1")
        prompt = chat_prompt(tokenizer, "a red cube", dimension)
        student = encode(prompt)
        if student[-len(prefix):] != prefix:
            raise ValueError(f"the student prompt for {dimension!r} does not end with the answer prefix "
                             f"{ANSWER_PREFIX!r}'s tokens {prefix}, got {student[-len(prefix):]}")
        for text, token_id in zip(vocab.texts, vocab.token_ids):
            scored = encode(prompt + text)
            if scored != student + [token_id]:
                raise ValueError(f"score text {text!r} after the answer prefix {ANSWER_PREFIX!r} tokenizes as "
                                 f"{scored[len(student) - len(prefix):]}, not the prefix {prefix} followed by "
                                 f"the score token {token_id}")
