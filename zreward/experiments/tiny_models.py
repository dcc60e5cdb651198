"""Tiny random-weight models built offline from configs (tests, demo, benchmarks, ``tiny = true`` runs): Qwen-VL
reward models and a Z-Image pipeline.

The tokenizer is a byte-level BPE trained here, in milliseconds, on the rubric prompts, with the Qwen
pre-tokenizer (digits split one by one, so the score digits are single tokens as in real Qwen
vocabularies), the Qwen special tokens and a Qwen-style chat template. Nothing is downloaded.
"""
from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast, Qwen3_5Config, Qwen3_5ForConditionalGeneration

from zreward.scoring.image_processing import qwen_image_processor
from zreward.scoring.rubric import ANSWER_PREFIX, DIMENSIONS, instruction
from zreward.scoring.scorer import RewardScorer, ScoringProcessor
from zreward.scoring.vocab import ScoreVocab

# The Qwen2/3/3.5 pre-tokenization pattern: digits (\p{N}) are always split into single characters.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The demo's teacher is a bit bigger than its student; both full-attention-only so that CPU runs avoid the slow
# reference path of the gated-delta (linear-attention) layers.
# Both draw their weights with std 0.1 rather than transformers' 0.02 and see the image in 8-pixel patches (a 64 px
# image is 16 visual tokens). With std 0.02 the image moves the score position's hidden state by about 0.3 % of its
# norm, and a training run on the demo's data sat at the uniform-guess loss for 1500 steps, learning only the
# brightest cue; with std 0.1 every cue was learned within 400 steps. Patches of 16 pixels learned more slowly.
DEMO_VISION_CONFIG = {"patch_size": 8, "initializer_range": 0.1}
TEACHER_CONFIG = {"hidden_size": 48, "intermediate_size": 96, "layer_types": ["full_attention"] * 2,
                  "initializer_range": 0.1, "vision_config": DEMO_VISION_CONFIG}
STUDENT_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "layer_types": ["full_attention"] * 2,
                  "initializer_range": 0.1, "vision_config": DEMO_VISION_CONFIG}

# Tiny configs vLLM's CPU backend runs (``zreward.engines.vllm.cpu_backend_problems``): attention head_dim 32 (its
# smallest), gated-delta-net head dims 64, rotary sections resized to match; the Qwen3.5 one runs in bfloat16 there.
ENGINE_QWEN35_CONFIG = {
    "head_dim": 32, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                        "mrope_interleaved": True, "partial_rotary_factor": 0.5},
}
ENGINE_QWEN3_VL_CONFIG = {
    "head_dim": 32,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4],
                        "mrope_interleaved": True},
}

# The demo's teacher as vLLM runs it (``--engine vllm``): vLLM treats Qwen3.5 as hybrid (one linear-attention
# layer needed), and its CPU backend needs the engine-test head sizes and bf16 for that layer.
VLLM_TEACHER_CONFIG = {**TEACHER_CONFIG, **ENGINE_QWEN35_CONFIG, "layer_types": ["linear_attention", "full_attention"]}


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")

# Qwen3.5's template reduced to what the scorer uses: content lists with images, thinking on or off.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A Qwen-style byte-level BPE tokenizer trained on the rubric prompts (deterministic, offline)."""
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [instruction("a red cube on a blue sphere", d, reasoning=r) for d in DIMENSIONS for r in (False, True)]
    corpus.append(f"user assistant the image shows {ANSWER_PREFIX}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_processor(patch_size: int = 16, merge_size: int = 2) -> ScoringProcessor:
    """Tokenizer + Qwen-VL image processor (Qwen3.5 normalisation), small resize bounds for tiny images."""
    image_processor = qwen_image_processor(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
    )
    return ScoringProcessor(tiny_tokenizer(), image_processor)


def _special_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
            for name in ("endoftext", "im_end", "image_pad", "video_pad", "vision_start", "vision_end")}


def tiny_qwen35(seed: int = 0, vision_config: dict | None = None, **overrides):
    """``(model, processor)``: a random-weight ``Qwen3_5ForConditionalGeneration`` (hidden 32, one linear-attention
    and one full-attention layer, 1-block vision tower with patch 16) in fp32, in eval mode.

    ``overrides`` update the text config, ``vision_config`` the vision config.
    """
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=overrides.get("hidden_size", 32), num_position_embeddings=64)
    vision.update(vision_config or {})
    processor = tiny_processor(vision["patch_size"], vision["spatial_merge_size"])
    tokenizer = processor.tokenizer
    ids = _special_ids(tokenizer)
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=2, layer_types=["linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.5},
        pad_token_id=ids["endoftext"], eos_token_id=[ids["im_end"], ids["endoftext"]],
    )
    text_config.update(overrides)
    config = Qwen3_5Config(
        text_config=text_config, vision_config=vision, image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    return _seeded_model(Qwen3_5ForConditionalGeneration, config, seed, ids), processor


def tiny_qwen3_vl(seed: int = 0, **overrides):
    """``(model, processor)``: a random-weight ``Qwen3VLForConditionalGeneration`` (hidden 32, two full-attention
    layers, 2-block vision tower with one deepstack layer, patch 16) sharing the tiny tokenizer, in eval mode.

    ``overrides`` update the text config."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = tiny_processor(16, 2)
    ids = _special_ids(processor.tokenizer)
    text_config = dict(
        vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=ids["endoftext"],
        eos_token_id=ids["im_end"], bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
    )
    text_config.update(overrides)
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    return _seeded_model(Qwen3VLForConditionalGeneration, config, seed, ids), processor


def _seeded_model(model_class, config, seed: int, ids: dict):
    """``model_class(config)`` initialised from ``seed`` (without touching the global RNG), in eval mode, with
    the tiny tokenizer's pad and stop tokens in its generation config."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = ids["endoftext"]
    model.generation_config.eos_token_id = [ids["im_end"], ids["endoftext"]]
    return model.eval()


def tiny_scorer(seed: int, overrides: dict, device: torch.device | str = "cpu") -> RewardScorer:
    """A tiny random-init Qwen3.5 (``TEACHER_CONFIG``, ``STUDENT_CONFIG`` or other config overrides) as a scorer."""
    model, processor = tiny_qwen35(seed=seed, **overrides)
    return RewardScorer(model.to(device), processor, ScoreVocab.from_tokenizer(processor.tokenizer))


def tiny_teacher(seed: int, device: torch.device | str = "cpu", engine: str = "hf") -> RewardScorer:
    """The demo's teacher: ``TEACHER_CONFIG`` in fp32, or for ``engine="vllm"`` ``VLLM_TEACHER_CONFIG`` in bf16."""
    if engine != "vllm":
        return tiny_scorer(seed, TEACHER_CONFIG, device)
    scorer = tiny_scorer(seed, VLLM_TEACHER_CONFIG, device)
    scorer.model.to(torch.bfloat16)
    return scorer


def tiny_zimage_pipeline(seed: int = 0, dim: int = 32, n_layers: int = 2, text_dim: int = 32, latent_channels: int = 4):
    """A ``ZImagePipeline`` with random weights: VAE downsampling 4x (images must be multiples of 8 pixels).

    Same classes as the released model (``ZImageTransformer2DModel``, ``AutoencoderKL`` with a shift factor, a
    Qwen3 text encoder with the chat-template tokenizer below, ``FlowMatchEulerDiscreteScheduler``), a few
    thousand times smaller.
    """
    from transformers import Qwen3Config, Qwen3Model

    from zreward.refl.adapters import require_diffusers

    diffusers = require_diffusers("ZImagePipeline")
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512))
        head_dim, axis = dim // 2, 3 * dim // 16  # the rotary axes (frame, height, width) add up to the head dim
        transformer = diffusers.ZImageTransformer2DModel(
            in_channels=latent_channels, dim=dim, n_layers=n_layers, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
            cap_feat_dim=text_dim, axes_dims=[head_dim - 2 * axis, axis, axis],
            axes_lens=[512, 64, 64])
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
            latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                               use_dynamic_shifting=False)
    return diffusers.ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(),
                                    tokenizer=tokenizer, transformer=transformer)
