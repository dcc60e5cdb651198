"""Adapters from a diffusers flow-matching pipeline to the six operations ReFL needs.

The sampler in :mod:`zreward.refl.sampling` only talks to :class:`FlowMatchAdapter`, so supporting another
pipeline (SD3, Flux) means writing one class with these methods and adding it to :data:`ADAPTERS`. The
schedule is handled as plain tensors (``sigmas``) rather than through the stateful ``scheduler.step``:
gradient checkpointing re-runs a step during backward, which must not advance a scheduler's step counter.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

MIN_DIFFUSERS = "0.36"


class FlowMatchAdapter(Protocol):
    generator: nn.Module  # the module ReFL trains (the denoising transformer)
    frozen: tuple[nn.Module, ...]  # everything else with weights (VAE, text encoder)
    lora_target_modules: tuple[str, ...]  # names of the attention projections for peft

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Prompt conditioning, computed without gradient."""

    def initial_latents(self, batch_size: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Pure noise at sigma = 1, float32."""

    def sigmas(self, num_inference_steps: int, latents: torch.Tensor) -> torch.Tensor:
        """The noise levels ``[N + 1]`` (float32, decreasing, last one 0) the sampler steps through."""

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """The flow ``d latents / d sigma`` predicted at noise level ``sigma`` (0-d tensor), float32."""

    def step(self, latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
             sigma_next: torch.Tensor) -> torch.Tensor:
        """One scheduler step from ``sigma`` to ``sigma_next``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1], float32, differentiable w.r.t. ``latents``."""

    def save_lora(self, directory) -> None:
        """Write the generator's LoRA weights in the pipeline's own format (``pipe.load_lora_weights`` reads it)."""


def require_diffusers(attribute: str):
    """The ``diffusers`` module, imported lazily; a clear ImportError when it is missing or too old."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(f"zreward.refl needs diffusers>={MIN_DIFFUSERS} (pip install 'diffusers>={MIN_DIFFUSERS}')"
                          ) from error
    if not hasattr(diffusers, attribute):
        raise ImportError(f"diffusers {diffusers.__version__} has no {attribute}; "
                          f"zreward.refl needs diffusers>={MIN_DIFFUSERS}")
    return diffusers


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """``FlowMatchEulerDiscreteScheduler.step`` without its state: ``x + (sigma_next - sigma) * v``."""
    return latents + (sigma_next - sigma) * velocity


class ZImageAdapter:
    """Z-Image (``diffusers.ZImagePipeline``): Qwen3 text encoder, single-stream DiT, flow-matching Euler.

    Mirrors ``ZImagePipeline.__call__`` step by step (same latents, schedule, transformer call, CFG and VAE
    scaling), so a sample drawn here without gradient equals the pipeline's own output.
    """

    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe, guidance_scale: float = 0.0, max_sequence_length: int = 512):
        self.pipe = pipe
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self.generator = pipe.transformer
        self.frozen = (pipe.vae, pipe.text_encoder)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype = torch.bfloat16, device: str | None = None,
                        **kwargs) -> "ZImageAdapter":
        pipe = require_diffusers("ZImagePipeline").ZImagePipeline.from_pretrained(path, torch_dtype=torch_dtype)
        return cls(pipe.to(device) if device else pipe, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            positive, negative = self.pipe.encode_prompt(
                list(prompts), device=self.device, do_classifier_free_guidance=self.guidance_scale > 0,
                max_sequence_length=self.max_sequence_length)
        dtype = self.pipe.transformer.dtype
        return [e.to(dtype) for e in positive], [e.to(dtype) for e in negative]

    def initial_latents(self, batch_size: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        multiple = self.pipe.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        return self.pipe.prepare_latents(batch_size, self.pipe.transformer.in_channels, height, width,
                                         torch.float32, self.device, generator)

    def sigmas(self, num_inference_steps: int, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        scheduler = self.pipe.scheduler
        mu = calculate_shift((latents.shape[2] // 2) * (latents.shape[3] // 2),
                             scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_inference_steps), device=latents.device, mu=mu)
        return scheduler.sigmas.to(device=latents.device, dtype=torch.float32)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        positive, negative = cond
        transformer = self.pipe.transformer
        cfg = self.guidance_scale > 0
        # The transformer's time input runs from 0 (noise) to 1 (clean): (1000 - 1000 sigma) / 1000, as the pipeline.
        t = ((1000 - sigma * 1000) / 1000).expand(latents.shape[0])
        x = latents.to(transformer.dtype).unsqueeze(2)
        if cfg:
            x, t, caps = torch.cat([x, x]), t.repeat(2), positive + negative
        else:
            caps = positive
        out = transformer(list(x.unbind(0)), t, caps, return_dict=False)[0]
        out = torch.stack([o.float() for o in out]).squeeze(2)
        if cfg:
            pos, neg = out.chunk(2)
            out = pos + self.guidance_scale * (pos - neg)
        return -out  # Z-Image predicts clean-minus-noise; the scheduler steps along noise-minus-clean

    step = staticmethod(euler_step)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def save_lora(self, directory) -> None:
        from peft.utils import get_peft_model_state_dict

        type(self.pipe).save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(self.generator))


ADAPTERS = {"z-image": ZImageAdapter}
