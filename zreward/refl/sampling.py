"""ReFL sampling: no-gradient denoising up to a step in the last-K window, then gradient to the image.

With ``N`` inference steps and ``K = grad_steps``, the gradient starts at step ``N - K`` (``random_start=False``,
DRaFT-K style) or at a step drawn uniformly from ``N - K .. N - 1`` (``random_start=True``, ReFL's random
stopping step extended to a K-step window, as in the paper's Sec. 5.1). With ``gradient_checkpointing`` each
denoising step and the VAE decode run under ``torch.utils.checkpoint``: only the latents between steps are kept
and one step's activations are rebuilt during backward, so memory does not grow with K.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from zreward.refl.adapters import FlowMatchAdapter


def check_grad_steps(grad_steps, num_inference_steps: int) -> int:
    if isinstance(grad_steps, bool) or not isinstance(grad_steps, int):
        raise TypeError(f"grad_steps must be an int, got {type(grad_steps).__name__}")
    if not 1 <= grad_steps <= num_inference_steps:
        raise ValueError(f"grad_steps must lie in [1, num_inference_steps={num_inference_steps}] "
                         f"(the gradient flows through the last grad_steps denoising steps), got {grad_steps}")
    return grad_steps


def pick_grad_start(num_inference_steps: int, grad_steps: int, random_start: bool,
                    generator: torch.Generator | None = None) -> int:
    """First denoising step run with gradient."""
    check_grad_steps(grad_steps, num_inference_steps)
    first = num_inference_steps - grad_steps
    if not random_start:
        return first
    return first + int(torch.randint(grad_steps, (1,), generator=generator))


def _maybe_checkpoint(fn, *args, enabled: bool):
    return checkpoint(fn, *args, use_reentrant=False) if enabled and torch.is_grad_enabled() else fn(*args)


def denoise(adapter: FlowMatchAdapter, cond, latents: torch.Tensor, sigmas: torch.Tensor, grad_start: int,
            gradient_checkpointing: bool = True) -> torch.Tensor:
    """Run every step ``i`` from ``sigmas[i]`` to ``sigmas[i + 1]``; steps ``i >= grad_start`` keep the graph."""
    def one_step(x: torch.Tensor, i: int) -> torch.Tensor:
        return adapter.step(x, adapter.velocity(x, sigmas[i], cond), sigmas[i], sigmas[i + 1])

    for i in range(len(sigmas) - 1):
        if i < grad_start:
            with torch.no_grad():
                latents = one_step(latents, i)
        else:
            latents = _maybe_checkpoint(one_step, latents, i, enabled=gradient_checkpointing)
    return latents


def sample_images(adapter: FlowMatchAdapter, prompts: Sequence[str], *, height: int, width: int,
                  num_inference_steps: int, grad_start: int, generator: torch.Generator | None = None,
                  gradient_checkpointing: bool = True) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] for ``prompts``, differentiable through steps ``grad_start ..`` and the VAE.

    ``grad_start = num_inference_steps`` samples entirely without gradient (validation).
    """
    if not 0 <= grad_start <= num_inference_steps:
        raise ValueError(f"grad_start must lie in [0, {num_inference_steps}], got {grad_start}")
    cond = adapter.encode_prompts(prompts)
    latents = adapter.initial_latents(len(prompts), height, width, generator)
    sigmas = adapter.sigmas(num_inference_steps, latents)
    latents = denoise(adapter, cond, latents, sigmas, grad_start, gradient_checkpointing)
    if grad_start == num_inference_steps:
        with torch.no_grad():
            return adapter.decode(latents)
    return _maybe_checkpoint(adapter.decode, latents, enabled=gradient_checkpointing)
