"""What the deploy tests share: a tiny random-weight student saved as a model folder, and random images."""
import numpy as np
import torch

from zreward.deploy.model_folder import save_model_folder
from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer


def save_tiny_student(directory, seed=5):
    """A tiny random-weight student written as the model folder ``<directory>/student``."""
    return save_model_folder(tiny_scorer(seed, STUDENT_CONFIG, torch.device("cpu")), directory / "student")


def uint8_images(count, height=32, width=32, seed=0):
    """``count`` random uint8 ``[H, W, 3]`` images as one ``[N, H, W, 3]`` array."""
    return (np.random.default_rng(seed).random((count, height, width, 3)) * 255).astype(np.uint8)
