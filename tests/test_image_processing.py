"""The differentiable image path against the HF Qwen-VL image processor on the same uint8 images."""
import numpy as np
import pytest
import torch
from PIL import Image

from zreward.scoring.image_processing import num_image_tokens, preprocess_images, qwen_image_processor, target_size


def _processor(**overrides):
    kwargs = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                  size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128})
    kwargs.update(overrides)
    return qwen_image_processor(**kwargs)


def _both_ways(processor, height, width, seed=0):
    """The processor's output on a uint8 image and this module's output on the same image as floats / 255."""
    rng = np.random.default_rng(seed)
    # Smooth content (a blurred random field) so resampling differences stay at the uint8 rounding level.
    coarse = rng.random((height // 8 + 2, width // 8 + 2, 3))
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
    expected = processor(images=[Image.fromarray(field)], return_tensors="pt")
    floats = torch.from_numpy(field.copy()).permute(2, 0, 1)[None].float() / 255
    return expected, preprocess_images(floats, processor)


@pytest.mark.parametrize("size", [(64, 64), (32, 96)])
def test_equal_to_processor_without_resize(size):
    processor = _processor()
    expected, (pixel_values, grid) = _both_ways(processor, *size)
    assert torch.equal(grid, expected["image_grid_thw"])
    torch.testing.assert_close(pixel_values, expected["pixel_values"].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size, processor_kwargs", [
    ((50, 70), {}),  # upsampled to 64x64
    ((150, 120), {}),  # downsampled to 128x96
    ((56, 56), dict(patch_size=14, image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711])),  # Qwen2.5-VL normalisation, patch 14
])
def test_close_to_processor_with_resize(size, processor_kwargs):
    """Resizing: PIL works in 8-bit fixed point and rounds to uint8, the twin stays in float; with std 0.5 one
    uint8 step is 2/255 after normalising, the bound allows a few steps at the worst pixel and far less on average."""
    processor = _processor(**processor_kwargs)
    expected, (pixel_values, grid) = _both_ways(processor, *size)
    assert torch.equal(grid, expected["image_grid_thw"])
    assert tuple(grid[0, 1:] * processor.patch_size) == target_size(*size, processor)
    step = 1 / 255 / min(processor.image_std)
    diff = (pixel_values - expected["pixel_values"].float()).abs()
    assert diff.max() <= 4 * step, diff.max()
    assert diff.mean() <= 0.5 * step, diff.mean()


def test_batch_grid_and_token_count():
    processor = _processor()
    images = torch.rand(3, 3, 64, 96)
    pixel_values, grid = preprocess_images(images, processor)
    assert grid.tolist() == [[1, 4, 6]] * 3
    assert pixel_values.shape == (3 * 24, 3 * 2 * 16 * 16)
    assert num_image_tokens(grid, processor.merge_size) == [6, 6, 6]
    # Each image's rows are its own patches: the batch is the concatenation of single-image results.
    single = torch.cat([preprocess_images(images[i:i + 1], processor)[0] for i in range(3)])
    assert torch.equal(pixel_values, single)


@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_gradient_reaches_pixels(size):
    processor = _processor()
    images = torch.rand(2, 3, *size, dtype=torch.float64) * 0.8 + 0.1
    images.requires_grad_()
    pixel_values, _ = preprocess_images(images, processor)
    weights = torch.randn_like(pixel_values)
    (pixel_values * weights).sum().backward()
    assert images.grad.shape == images.shape and images.grad.abs().sum() > 0
    # Every pixel reaches some patch (interpolation kernels cover the whole image).
    assert bool((images.grad != 0).any(dim=1).all())
    small = images.detach()[:1, :, :size[0], :size[1]].clone().requires_grad_()
    torch.autograd.gradcheck(lambda x: preprocess_images(x, processor)[0].sum(0), (small,), fast_mode=True)


def test_bad_images():
    processor = _processor()
    with pytest.raises(ValueError, match="images must have 4"):
        preprocess_images(torch.rand(3, 64, 64), processor)
    with pytest.raises(ValueError, match="3 channels"):
        preprocess_images(torch.rand(1, 4, 64, 64), processor)
    with pytest.raises(TypeError, match="images must be float"):
        preprocess_images(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), processor)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_images(torch.rand(1, 3, 1, 300), processor)
