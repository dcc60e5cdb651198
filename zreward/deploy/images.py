"""Image conversions at the deploy boundary: what trainers hand over, what travels over HTTP, what the scorer takes.

Trainers hold images as float ``[N, 3, H, W]`` in ``[0, 1]`` (torch) or uint8 ``[N, H, W, 3]`` (numpy / torch),
or as PIL images. The scorer takes float ``[3, H, W]`` tensors; HTTP carries base64 PNG (lossless) or JPEG.
The convention that settles the layout: floating-point arrays are channels-first, uint8 arrays channels-last.
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG")


class ImageTooLarge(ValueError):
    """An image above the pixel limit (the service answers 413)."""


def split_images(images, name: str = "images") -> list:
    """The images of a batch (a 4-D tensor / array, or a list / tuple of single images), one item each."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim != 4:
            raise ValueError(f"{name} must be a 4-D batch (float NCHW or uint8 NHWC), got shape {tuple(images.shape)}")
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    raise TypeError(f"{name} must be a tensor, an array or a list of images, got {type(images).__name__}")


def to_uint8_hwc(image, name: str = "image") -> np.ndarray:
    """One image as uint8 ``[H, W, 3]``: float ``[3, H, W]`` in [0, 1] is rounded, uint8 ``[H, W, 3]`` kept."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.float().numpy() if image.is_floating_point() else image.numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a PIL image, a tensor or an array, got {type(image).__name__}")
    if np.issubdtype(image.dtype, np.floating) and image.ndim == 3 and image.shape[0] == 3:
        return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"{name} must be float [3, H, W] in [0, 1] or uint8 [H, W, 3], got {image.dtype} "
                     f"{tuple(image.shape)}")


def to_float_chw(image, name: str = "image") -> torch.Tensor:
    """One image as the scorer's float32 ``[3, H, W]`` in [0, 1]; float tensors pass through without a copy."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{name} must be float [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        return image.detach().float()
    array = to_uint8_hwc(image, name)
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def encode_image(image, name: str = "image") -> str:
    """One image as base64 PNG text (what ``/score`` takes)."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8_hwc(image, name)).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str, max_pixels: int, name: str = "image") -> np.ndarray:
    """uint8 ``[H, W, 3]`` from base64 PNG / JPEG text (a ``data:image/...;base64,`` prefix is allowed).

    The size is read from the header and checked against ``max_pixels`` before any pixel is decoded, so a
    small file claiming a huge image costs nothing. Raises ``ValueError`` naming ``name`` (``ImageTooLarge``
    for the size).
    """
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise ValueError(f"{name} must be PNG or JPEG, got {image.format}")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{name} is {width}x{height} = {width * height} pixels, above the limit of "
                                 f"{max_pixels}")
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not a PNG or JPEG image") from None
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} is not a readable PNG or JPEG image ({error})") from None
