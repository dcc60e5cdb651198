"""Argument checks for tensors and options, public so that code built on the ops checks its arguments the same way.

Each raises ``TypeError`` (wrong kind) or ``ValueError`` (wrong value) naming the argument, before any work.
Numbers may be Python or numpy scalars or one-element tensors; bools are refused where a number is expected.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def as_float(name: str, x) -> float:
    """``x`` as a Python float: a Python or numpy real number, or a 0-d (or one-element) real tensor.

    Bools are refused (``temperature=True`` is a mistake, not 1.0). A CUDA tensor is read back to the host,
    which waits for the GPU: pass plain numbers on a hot path.
    """
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got a tensor of "
                            f"shape {tuple(x.shape)} and dtype {x.dtype}")
        return float(x.item())
    if isinstance(x, bool) or not isinstance(x, numbers.Real):  # numpy floats and ints are Real, numpy bools not
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def as_int(name: str, x) -> int:
    """``x`` as a Python int: a Python or numpy integer, or a 0-d (or one-element) integer tensor; bools refused."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or a one-element integer tensor, got a tensor of "
                            f"shape {tuple(x.shape)} and dtype {x.dtype}")
        return int(x.item())
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):  # numpy ints are Integral, numpy bools not
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return operator.index(x)


def check_positive_float(name: str, x) -> float:
    x = as_float(name, x)
    if not (x > 0 and x < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {x}")
    return x


def check_float_in(name: str, x, low: float, high: float) -> float:
    x = as_float(name, x)
    if not (low <= x <= high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {x}")
    return x


def check_choice(name: str, x, choices: Sequence[str]) -> str:
    if x not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {x!r}")
    return x
