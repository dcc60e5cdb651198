"""``zreward train teacher|student --dry-run``: the config and data checked, the model built on the meta device
(no weights read) with LoRA applied, and its memory per rank estimated by :mod:`zreward.training.memory` for the
configured batch and sequence length."""
from __future__ import annotations

from PIL import Image

from zreward.scoring.image_processing import num_image_tokens, target_size
from zreward.scoring.rubric import ANSWER_PREFIX, DIMENSIONS, chat_prompt
from zreward.train.config import TeacherConfig
from zreward.train.data import load_run_data
from zreward.train.models import build_model, checked_vocab


def per_rank_shape(config, processor, data) -> tuple[int, int, int]:
    """``(sequences, tokens, image_tokens)`` of one rank's training forward pass.

    Teacher: ``pairs_per_batch x 2 x group_size`` sequences of the longest reasoning prompt (image tokens + text)
    plus ``max_new_tokens`` sampled tokens and the answer prefix. Student: ``batch_size x len(dimensions)``
    sequences of the longest direct prompt (an upper bound: an image's dimensions share their prefix).
    """
    height, width = config.image_size or _first_image_size(data)
    grid_h, grid_w = target_size(height, width, processor.image_processor)
    patch = processor.image_processor.patch_size
    image_tokens = num_image_tokens(_grid(grid_h // patch, grid_w // patch), processor.image_processor.merge_size)[0]
    teacher = isinstance(config, TeacherConfig)
    prompt = max((r.prompt for r in data.train), key=len)
    text_tokens = max(len(processor.tokenizer.encode(chat_prompt(processor.tokenizer, prompt, d, reasoning=teacher),
                                                     add_special_tokens=False)) for d in DIMENSIONS)
    tokens = text_tokens - 1 + image_tokens  # the one placeholder becomes the image's tokens
    if teacher:
        prefix = len(processor.tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False))
        return config.pairs_per_batch * 2 * config.group_size, tokens + config.max_new_tokens + prefix, image_tokens
    return config.batch_size * len(config.dimensions), tokens, image_tokens


def dry_run(config, world_size: int, device_memory: int | None = None, log=print):
    """Check ``config`` and its data, estimate the memory of one rank of ``world_size`` and print it; returns the
    :class:`~zreward.training.memory.MemoryEstimate`."""
    from zreward.train.run import setup_errors
    from zreward.training.memory import estimate_memory

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with setup_errors():
        processor, vocab = checked_vocab(config.base_model, config.score_texts, config.score_values)
        data = load_run_data(config.data, config.image_size, (vocab.score_min, vocab.score_max))
    model = build_model(config, meta=True)
    sequences, tokens, image_tokens = per_rank_shape(config, processor, data)
    engine_share = config.engine_memory_fraction if config.engine == "vllm" else 0.0
    teacher = isinstance(config, TeacherConfig)
    estimate = estimate_memory(model, world_size=world_size, strategy=config.strategy, batch_size=sequences,
                               seq_len=tokens, gradient_checkpointing=config.gradient_checkpointing,
                               engine_memory_fraction=engine_share, device_memory=device_memory,
                               image_tokens=image_tokens, logprob_chunk=config.logprob_chunk if teacher else 0)
    log(f"{config.base_model}: {len(data.items)} train images, {len(data.val)} val records; per rank "
        f"{sequences} sequences x {tokens} tokens ({image_tokens} of them image tokens), {config.strategy} over "
        f"{world_size} rank(s)")
    log(estimate.table())
    return estimate


def _first_image_size(data) -> tuple[int, int]:
    with Image.open(data.items.items[0].image) as image:
        return image.height, image.width


def _grid(grid_h: int, grid_w: int):
    import torch

    return torch.tensor([[1, grid_h, grid_w]])
