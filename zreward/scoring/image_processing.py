"""Differentiable twin of the Qwen-VL image processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5).

``preprocess_images`` turns float images ``[B, 3, H, W]`` in ``[0, 1]`` into the ``pixel_values`` /
``image_grid_thw`` pair the HF processor builds from the same images as uint8, with every step a torch op
so the gradient reaches the pixels:

1. resize to ``smart_resize(H, W)`` (sides multiples of ``patch_size * merge_size``, pixel count within the
   processor's ``size`` bounds) with antialiased bicubic interpolation, then clamp to ``[0, 1]``;
2. normalise with the processor's ``image_mean`` / ``image_std`` (its 1/255 rescale is the ``[0, 1]`` range);
3. patchify in the processor's order: one row per patch, merge-window-major, ``C * temporal_patch_size *
   patch_size**2`` columns, the single frame repeated ``temporal_patch_size`` times.

When no resize is needed the result equals the processor's up to fp32 rounding. With a resize it differs by
interpolation details: PIL (the ``Pil`` processor) resizes in 8-bit fixed point and rounds to uint8,
torchvision rounds its uint8 output too, this twin stays in float (the tests bound the gap). The clamp
mirrors the uint8 saturation of the processors; it passes no gradient to overshooting interpolated values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zr_kernels.checks import check_float_tensor
def qwen_image_processor(**kwargs):
    """The Qwen-VL image processor: the torchvision one when torchvision is installed, else the PIL one."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    except ImportError:  # torchvision missing: that module imports it at the top
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as Qwen2VLImageProcessor,
        )
    return Qwen2VLImageProcessor(**kwargs)


def _size_bounds(image_processor) -> tuple[int, int]:
    size = image_processor.size
    low, high = size["shortest_edge"], size["longest_edge"]
    if not low or not high:
        raise ValueError(f"image_processor.size must hold shortest_edge and longest_edge, got {size}")
    return int(low), int(high)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen-VL target size: sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"images must have an aspect ratio below 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(height: int, width: int, image_processor) -> tuple[int, int]:
    """Size the processor resizes a ``height x width`` image to."""
    factor = image_processor.patch_size * image_processor.merge_size
    return smart_resize(height, width, factor, *_size_bounds(image_processor))


def num_image_tokens(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """Placeholder tokens per image: patches divided by the ``merge_size**2`` patches merged into one token."""
    return [int(t * h * w) // merge_size**2 for t, h, w in image_grid_thw.tolist()]


def preprocess_images(images: torch.Tensor, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [B * grid_h * grid_w, C * T * p * p], image_grid_thw [B, 3])``, differentiable w.r.t. ``images``.

    ``images``: float ``[B, 3, H, W]`` in ``[0, 1]`` (one size for the batch). ``image_processor``: a Qwen-VL
    image processor; its ``patch_size``, ``merge_size``, ``temporal_patch_size``, ``size``, ``image_mean`` and
    ``image_std`` are used. ``pixel_values`` has the dtype of ``images``.
    """
    check_float_tensor("images", images, ndim=4)
    batch, channels, height, width = images.shape
    if channels != 3:
        raise ValueError(f"images must have 3 channels (RGB), got shape {tuple(images.shape)}")
    patch, merge = image_processor.patch_size, image_processor.merge_size
    temporal = image_processor.temporal_patch_size
    new_h, new_w = target_size(height, width, image_processor)
    x = images
    if (new_h, new_w) != (height, width):
        # Antialiased bicubic (a = -0.5, PIL's resample=BICUBIC); half inputs go through fp32, which has CPU kernels.
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x = F.interpolate(wide, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0).to(images.dtype)
    mean = torch.tensor(image_processor.image_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    grid_h, grid_w = new_h // patch, new_w // patch
    x = x.reshape(batch, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, gh/m, gw/m, m, m, C, p, p]
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)
    pixel_values = x.reshape(batch * grid_h * grid_w, channels * temporal * patch * patch)
    grid = torch.tensor([[1, grid_h, grid_w]] * batch, dtype=torch.int64, device=images.device)
    return pixel_values, grid
