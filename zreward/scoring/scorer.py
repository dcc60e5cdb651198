"""Score-distribution reward model on a Qwen-VL checkpoint (Qwen3.5, Qwen3-VL, Qwen2.5-VL via transformers).

Student mode (Eq. 16): ``B x len(dimensions)`` chat prompts that end with the answer prefix, with each image
encoded once and each image's common prompt prefix run once (``zreward.scoring.shared_prefix``); only the last
position's hidden state is used, and the K score logits come from the LM-head rows of the score tokens through
``zr_kernels.linear_score`` (no full-vocabulary logits anywhere).
Teacher mode (Eq. 5-6): ``G`` sampled reasoning outputs per image, the answer prefix appended after each, the
distribution decoded at the score position; the returned ``Rollouts`` let a trainer recompute completion
log-probs and score distributions under any model with the same vocabulary (``rollout_forward``).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import zr_kernels
from zr_kernels import ScoreDist
from zr_kernels.checks import check_choice, check_float_tensor, check_positive_float
from zreward.scoring.image_processing import num_image_tokens, preprocess_images
from zreward.scoring.rubric import ANSWER_PREFIX, DIMENSIONS, chat_prompt, check_dimension, check_prompts
from zreward.scoring.shared_prefix import check_supported, shared_prefix_hidden, split_rows
from zreward.scoring.vocab import ScoreVocab

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class ScoringProcessor:
    """The two parts of a Qwen-VL processor the scorer uses: ``tokenizer`` and ``image_processor``.

    A full HF processor (``Qwen3VLProcessor`` ...) works wherever this does; this one also loads where the
    video processor cannot (it needs torchvision).
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path) -> "ScoringProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))


@dataclass
class Rollouts:
    """``N = B * num_samples`` teacher sequences (row ``b * num_samples + g``), right-padded to ``L``.

    ``input_ids [N, L]`` = prompt + sampled reasoning + answer prefix; ``completion_mask [N, L]`` marks the sampled
    reasoning tokens (the policy's actions); ``score_positions [N]`` is the last answer-prefix position, whose
    next-token distribution over the score tokens is ``scores`` (``[B, num_samples]`` leading shape, no grad).
    ``end_tokens [N]`` is the sampled token that ended each reasoning (a stop token, or the first answer-prefix
    token when the model wrote the prefix itself; -1 when the reasoning ran to ``max_new_tokens``): an action too,
    taken right after the reasoning, where the appended answer prefix starts in ``input_ids``.
    ``pixel_values`` / ``image_grid_thw`` / ``mm_token_type_ids`` are the per-row vision inputs.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    score_positions: torch.Tensor
    scores: ScoreDist
    completions: list[str]
    num_samples: int
    end_tokens: torch.Tensor


class RewardScorer:
    """Scores images under the four rubric dimensions with a Qwen-VL ``model`` (``...ForConditionalGeneration``).

    ``processor`` needs ``.tokenizer`` (with a chat template) and ``.image_processor``; ``vocab`` maps score tokens
    to values. ``attn_implementation`` is set on the model: ``"sdpa"`` (default), ``"eager"`` or
    ``"flash_attention_2"`` (needs the flash-attn package).
    """

    def __init__(self, model, processor, vocab: ScoreVocab, attn_implementation: str = "sdpa"):
        check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
        if attn_implementation == "flash_attention_2":
            from transformers.utils import is_flash_attn_2_available

            if not is_flash_attn_2_available():
                raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package installed")
        self.model = model
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.vocab = vocab
        _base(model).set_attn_implementation(attn_implementation)
        self.image_token_id = _base(model).config.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        vocab_rows = _base(model).get_output_embeddings().weight.shape[0]
        if max(vocab.token_ids) >= vocab_rows:
            raise ValueError(f"vocab.token_ids must lie below the LM head's {vocab_rows} rows, got {vocab.token_ids}")
        check_supported(_base(model))
        self.prefix_ids = self.tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
        self.stop_ids = _stop_ids(_base(model), self.tokenizer)
        # A sampled image/video placeholder would no longer match the image features when the rollout is re-encoded.
        config = _base(model).config
        self.vision_token_ids = sorted({getattr(config, name, None) for name in (
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")} - {None})

    # -- student ---------------------------------------------------------------------------------------------
    def student_scores(self, images: torch.Tensor, prompts: Sequence[str], dimensions: Sequence[str] = DIMENSIONS,
                       *, temperature: float = 1.0) -> ScoreDist:
        """Score distribution per image and dimension: ``probs [B, len(dimensions), K]``, ``mean``/``std [B, D]``.

        ``images``: float ``[B, 3, H, W]`` in ``[0, 1]``; ``prompts``: the B generation prompts. The vision tower
        runs once per image, the prompt prefix shared by an image's dimensions (everything before the rubric: chat
        header, image, generation prompt, instructions) once per image, and the dimension-specific suffixes in one
        batch per dimension from the prefix states;
        differentiable w.r.t. ``images`` and the model's parameters. Equal to running every prompt on its own.
        """
        temperature = check_positive_float("temperature", temperature)
        return reshape_scores(self.score_distribution(self.student_hidden(images, prompts, dimensions),
                                                temperature=temperature), (len(prompts), len(dimensions)))

    def student_hidden(self, images: torch.Tensor, prompts: Sequence[str],
                       dimensions: Sequence[str] = DIMENSIONS) -> torch.Tensor:
        """The final-norm hidden state at the score position, ``[B * len(dimensions), D]`` (row ``b * D + d``):
        what :meth:`student_scores` feeds the score head. Trainers that need the score logits themselves (RISD's
        KL) apply :meth:`score_logits` to it."""
        dimensions = [check_dimension(d) for d in dimensions]
        check_float_tensor("images", images, ndim=4)  # [B, 3, H, W]
        prompts = check_prompts(prompts, images.shape[0])
        pixel_values, grid = preprocess_images(images, self.image_processor)
        num_dims = len(dimensions)
        texts = [chat_prompt(self.tokenizer, p, d) for p in prompts for d in dimensions]
        rows = [self.tokenizer.encode(t, add_special_tokens=False) for t in self.expand_image_tokens(texts, grid, num_dims)]
        split = split_rows(rows, num_dims, self.tokenizer.pad_token_id, self.image_token_id)
        return shared_prefix_hidden(_base(self.model), split, pixel_values, grid)

    # -- teacher ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_rollouts(self, images: torch.Tensor, prompts: Sequence[str], dimension: str, num_samples: int,
                         max_new_tokens: int, temperature: float = 1.0, *, min_new_tokens: int = 0) -> Rollouts:
        """Sample ``num_samples`` reasoning outputs per image (pure temperature sampling), cut each at the first
        stop token or at the answer prefix the model wrote itself, append the answer prefix and decode the score
        distribution there. ``scores`` has ``[B, num_samples]`` leading shape. ``min_new_tokens`` holds the stop
        tokens back for that many steps (benchmarks use it for reasoning of a set length).
        """
        check_dimension(dimension)
        check_float_tensor("images", images, ndim=4)  # [B, 3, H, W]
        prompts = check_prompts(prompts, images.shape[0])
        temperature = check_positive_float("temperature", temperature)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) \
                or not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens], got {min_new_tokens!r}")
        pixel_values, grid = preprocess_images(images, self.image_processor)
        texts = [chat_prompt(self.tokenizer, p, dimension, reasoning=True) for p in prompts]
        prompt_rows = [self.tokenizer.encode(t, add_special_tokens=False) for t in self.expand_image_tokens(texts, grid, 1)]
        prompt_rows = [row for row in prompt_rows for _ in range(num_samples)]
        row_pixels, row_grid = _repeat_images(pixel_values, grid, num_samples)

        prompts_batch = self.pad_left(prompt_rows)
        generated = self.model.generate(
            **prompts_batch, pixel_values=row_pixels, image_grid_thw=row_grid, do_sample=True,
            temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids,
            suppress_tokens=self.vision_token_ids,
        )[:, prompts_batch["input_ids"].shape[1]:]
        completions, end_tokens = self.cut_completions(generated.tolist())

        rows = [p + c + self.prefix_ids for p, c in zip(prompt_rows, completions)]
        batch = self.pad_right(rows)
        completion_mask = torch.zeros_like(batch["attention_mask"])
        for i, (p, c) in enumerate(zip(prompt_rows, completions)):
            completion_mask[i, len(p):len(p) + len(c)] = 1
        score_positions = batch["attention_mask"].sum(1) - 1
        hidden = self.last_hidden(batch, row_pixels, row_grid, score_positions)
        scores = self.score_distribution(hidden)
        return Rollouts(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], completion_mask=completion_mask,
            mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=row_pixels, image_grid_thw=row_grid,
            score_positions=score_positions, scores=reshape_scores(scores, (len(prompts), num_samples)),
            completions=self.tokenizer.batch_decode(completions), num_samples=num_samples,
            end_tokens=torch.tensor(end_tokens, dtype=torch.int64, device=batch["input_ids"].device),
        )

    def rollout_forward(self, rollouts: Rollouts, model=None) -> tuple[torch.Tensor, ScoreDist]:
        """Recompute under ``model`` (default: the scorer's) in one forward pass, with gradients:
        ``token_logprobs [N, L]`` (log-prob of each completion token, 0 elsewhere) and the score distribution at
        the score positions (``[B, num_samples]`` leading shape). Full-vocabulary logits are formed only at the
        completion positions, where the policy gradient needs them.
        """
        model = self.model if model is None else model
        batch = {k: getattr(rollouts, k) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        hidden = self.hidden_states(batch, rollouts.pixel_values, rollouts.image_grid_thw, model)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        weight = self.lm_head_weight(model)
        scores = self.score_distribution(hidden[rows, rollouts.score_positions], model=model)
        # Token t is predicted from position t - 1.
        target_mask = rollouts.completion_mask[:, 1:].bool()
        logits = (hidden[:, :-1][target_mask] @ weight.T).float()
        picked = logits.log_softmax(-1).gather(-1, rollouts.input_ids[:, 1:][target_mask].unsqueeze(-1)).squeeze(-1)
        token_logprobs = hidden.new_zeros(rollouts.input_ids.shape, dtype=torch.float32)
        token_logprobs[:, 1:] = token_logprobs[:, 1:].masked_scatter(target_mask, picked)
        batch_size = hidden.shape[0] // rollouts.num_samples
        return token_logprobs, reshape_scores(scores, (batch_size, rollouts.num_samples))

    # -- shared pieces ---------------------------------------------------------------------------------------
    def lm_head_weight(self, model=None) -> torch.Tensor:
        """The LM head ``[V, D]`` of ``model`` (default: the scorer's; a PEFT wrapper or a frozen reference copy
        work too); the scorer reads only the K score rows of it."""
        return _base(self.model if model is None else model).get_output_embeddings().weight

    def score_distribution(self, hidden: torch.Tensor, target: torch.Tensor | None = None, *,
                           temperature: float = 1.0, model=None) -> ScoreDist:
        """The K-bin score distribution of final-norm hidden states ``hidden [N, D]`` through ``model``'s LM head
        (default: the scorer's), fused: ``zr_kernels.linear_score`` over the K score rows, never ``N x V``
        logits. ``target [N]`` (bin indices) adds ``nll``, the per-row term of Eq. 8."""
        return zr_kernels.linear_score(hidden, self.lm_head_weight(model), self.vocab.values,
                                       token_ids=self.vocab.token_ids, temperature=temperature, target=target)

    def score_logits(self, hidden: torch.Tensor, model=None) -> torch.Tensor:
        """The K score logits ``[N, K]`` of ``hidden [N, D]``: ``hidden @ W[score_ids].T``, gathering the K rows
        of the LM head rather than forming all V logits (for losses on the logits, e.g. RISD's slice KL)."""
        weight = self.lm_head_weight(model)
        return torch.nn.functional.linear(hidden, weight[self.vocab.token_ids_on(weight.device)])

    def last_hidden(self, batch: dict, pixel_values, image_grid_thw, positions: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden state ``[N, D]`` at ``positions[n]`` of each row (the LM head is not applied)."""
        hidden = self.hidden_states(batch, pixel_values, image_grid_thw)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]

    def hidden_states(self, batch: dict, pixel_values, image_grid_thw, model=None) -> torch.Tensor:
        """Final-norm hidden states ``[N, L, D]`` of ``model`` (default: the scorer's) on a padded ``batch``
        (``input_ids``, ``attention_mask``, ``mm_token_type_ids``) with its images; no LM head."""
        inner = _base(self.model if model is None else model).model
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
        if "mm_token_type_ids" in inspect.signature(inner.forward).parameters:
            kwargs["mm_token_type_ids"] = batch["mm_token_type_ids"]
        return inner(**kwargs).last_hidden_state

    def expand_image_tokens(self, texts: list[str], grid: torch.Tensor, rows_per_image: int) -> list[str]:
        """Replace each text's single image placeholder by one token per merged patch of its image."""
        counts = num_image_tokens(grid, self.image_processor.merge_size)
        expanded = []
        for i, text in enumerate(texts):
            if text.count(self.image_token) != 1:
                raise ValueError(f"prompt {i} must contain exactly one {self.image_token!r} after templating")
            expanded.append(text.replace(self.image_token, self.image_token * counts[i // rows_per_image]))
        return expanded

    def pad_right(self, rows: list[list[int]]) -> dict:
        return self._pad(rows, left=False)

    def pad_left(self, rows: list[list[int]]) -> dict:
        return self._pad(rows, left=True)

    def _pad(self, rows: list[list[int]], left: bool) -> dict:
        device = self.lm_head_weight().device
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if left else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.int64)
            attention_mask[i, span] = 1
        mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32)
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                "mm_token_type_ids": mm_token_type_ids.to(device)}

    def cut_completions(self, samples: list[list[int]]) -> tuple[list[list[int]], list[int]]:
        """Each sample's reasoning (:meth:`cut_completion`) and the token that ended it (-1: none)."""
        cut = [self.cut_completion(tokens) for tokens in samples]
        return [c for c, _ in cut], [end for _, end in cut]

    def cut_completion(self, tokens: list[int]) -> tuple[list[int], int]:
        """Tokens before the first stop token, or before the answer prefix when the model wrote it itself, and the
        token that ended them: that stop token, the prefix's first token, or -1 when neither occurs (the sample
        ran to the token limit)."""
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), len(tokens))
        stop = tokens[end] if end < len(tokens) else -1
        tokens, k = tokens[:end], len(self.prefix_ids)
        start = next((i for i in range(len(tokens) - k + 1) if tokens[i:i + k] == self.prefix_ids), None)
        if start is None:
            return tokens, stop
        return tokens[:start], self.prefix_ids[0]


def _base(model):
    """The transformers model under a peft wrapper (LoRA layers stay inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _stop_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted(set(eos) | {tokenizer.eos_token_id} - {None})


def _repeat_images(pixel_values: torch.Tensor, grid: torch.Tensor, times: int):
    """Per-row vision inputs: each image's patches (same count for all images) repeated ``times`` times."""
    batch = grid.shape[0]
    per_image = pixel_values.view(batch, -1, pixel_values.shape[-1])
    return per_image.repeat_interleave(times, 0).reshape(-1, pixel_values.shape[-1]), grid.repeat_interleave(times, 0)


def reshape_scores(dist: ScoreDist, lead: tuple[int, ...]) -> ScoreDist:
    """``dist`` with its rows viewed as ``lead`` (``[B * D]`` rows as ``[B, D]``: probs ``[B, D, K]``)."""
    return ScoreDist(dist.probs.view(*lead, -1), dist.mean.view(lead), dist.std.view(lead),
                     None if dist.nll is None else dist.nll.view(lead))
