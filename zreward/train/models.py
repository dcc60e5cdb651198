"""The model side of a ``zreward train`` run: the base model folder checked and loaded, LoRA applied, and the final
model folder written from a checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from zreward.scoring.scorer import RewardScorer, ScoringProcessor
from zreward.scoring.vocab import ScoreVocab, check_prompt_tokens
from zreward.train.config import RunConfig


def resolve_device(config: RunConfig) -> torch.device:
    """``config.device``, or CUDA when available; a bare ``"cuda"`` is this rank's ``cuda:<LOCAL_RANK>``."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def model_config(folder):
    """The transformers config of the model folder ``folder``; ``ValueError`` naming the folder when there is none."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"base model folder {folder} has no config.json (a local transformers folder is needed: "
                         "weights, config, tokenizer and image processor)")
    return AutoConfig.from_pretrained(folder)


def checked_vocab(folder, score_texts, score_values) -> tuple[ScoringProcessor, ScoreVocab]:
    """The folder's tokenizer and image processor, and the score vocabulary checked against them (each score text
    one token, the rubric prompts rendered and followed by the score token as trained): every problem a
    ``ValueError`` naming the folder, before any weight is read."""
    config = model_config(folder)
    try:
        processor = ScoringProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{folder}: cannot load its tokenizer and image processor ({error})") from None
    try:
        vocab = ScoreVocab.from_tokenizer(processor.tokenizer, score_texts, score_values)
        check_prompt_tokens(processor.tokenizer, vocab, config.image_token_id)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from None
    return processor, vocab


def lora_config(config: RunConfig):
    """The peft ``LoraConfig`` of the run: ``lora_target_modules`` of the language model only (a regex, so the
    vision tower's projections of the same names stay untouched)."""
    from peft import LoraConfig

    names = "|".join(sorted(set(config.lora_target_modules)))
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=rf".*\.language_model\..*\.({names})")


def build_model(config: RunConfig, device: torch.device | str = "cpu", *, meta: bool = False,
                trainable: bool = True):
    """The model of ``config.base_model`` in ``config.dtype`` on ``device`` with LoRA (``lora_rank`` > 0, fresh
    adapters seeded by ``config.seed``) or every weight trainable; gradient checkpointing as configured.
    ``meta``: built on the meta device from the config alone (no weights read), for ``--dry-run``;
    ``trainable=False``: the same structure, frozen (for loading a checkpoint into)."""
    from transformers import AutoModelForImageTextToText

    dtype = getattr(torch, config.dtype)
    if meta:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(model_config(config.base_model), dtype=dtype)
    else:
        model_config(config.base_model)
        model = AutoModelForImageTextToText.from_pretrained(config.base_model, dtype=dtype,
                                                            attn_implementation=config.attn_implementation)
    if config.gradient_checkpointing and trainable:
        # transformers 5.25 renamed gradient_checkpointing_enable; older versions have only that name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    model.requires_grad_(config.lora_rank == 0 and trainable)
    if config.lora_rank > 0:
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = get_peft_model(model, lora_config(config))
        if not trainable:
            model.requires_grad_(False)
    return model if meta else model.to(device)


def build_scorer(config: RunConfig, processor: ScoringProcessor, vocab: ScoreVocab, device, **options) -> RewardScorer:
    """A :class:`RewardScorer` on :func:`build_model` (``options`` go there)."""
    model = build_model(config, device, **options)
    return RewardScorer(model, processor, vocab, attn_implementation=config.attn_implementation)


def export_model_folder(config: RunConfig, checkpoint, path, role: str) -> Path:
    """The model folder (``zreward_model.json``, loadable by ``zreward score / serve / evaluate``) of the weights
    in ``checkpoint`` (a ``step-<N>`` or ``best`` folder of this run), LoRA merged into the base weights.

    Builds the model on the CPU from ``base_model`` in the run's dtype, loads the checkpoint's full state dict
    into it, merges and saves: it needs host memory for one copy of the model, and no GPU.
    """
    from zreward.deploy.model_folder import save_model_folder
    from zreward.training.checkpoint import load_checkpoint

    processor, vocab = checked_vocab(config.base_model, config.score_texts, config.score_values)
    scorer = build_scorer(config, processor, vocab, "cpu", trainable=False)
    load_checkpoint(checkpoint, scorer.model, restore_rng=False)
    if config.lora_rank > 0:
        scorer.model = scorer.model.merge_and_unload()
    return save_model_folder(scorer, path, role=role)
