"""A tiny random-weight Z-Image pipeline built from configs (nothing downloaded), for tests, the CLI's
``tiny = true`` mode and the CPU benchmark smoke run.

Same classes as the released model (``ZImageTransformer2DModel``, ``AutoencoderKL`` with a shift factor, a Qwen3
text encoder with a chat-template tokenizer, ``FlowMatchEulerDiscreteScheduler``), a few thousand times smaller.
The tokenizer is the scorer tests' tiny Qwen-style BPE (byte-level, so any prompt encodes, with the chat template).
"""
from __future__ import annotations

import torch

from zreward.refl.adapters import require_diffusers


def tiny_zimage_pipeline(seed: int = 0, dim: int = 32, n_layers: int = 2, text_dim: int = 32, latent_channels: int = 4):
    """A ``ZImagePipeline`` with random weights: VAE downsampling 4x (images must be multiples of 8 pixels)."""
    diffusers = require_diffusers("ZImagePipeline")
    from transformers import Qwen3Config, Qwen3Model

    from zreward.tiny_models import tiny_tokenizer

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
