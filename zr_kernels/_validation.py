"""Argument checks shared by every op. Each raises before any kernel launches and names the argument.

Value checks that would read device memory (id range, uniqueness, target range) run only for CPU
tensors, so CUDA calls stay free of host syncs: pass ``token_ids`` as a list or CPU tensor to have
them checked. CUDA (and traced) ids are checked on the device instead: an id outside ``[0, V)`` is never
read or written by the kernels, and ids with a repeated value (:func:`repeated_ids`) make the outputs NaN, so
bad ids give NaN, never an out-of-bounds access or a gradient that depends on which store lands last.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_BINS = 1024


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


# Constant tensors built from Python sequences (or CPU tensors) of ids and bin values, per device and dtype.
# Trainers pass the same score ids and values on every call: converting, checking and copying them to the GPU
# once keeps the hot path free of host-to-device copies (each one a sync with pageable memory).
_CONSTANTS: dict = {}
_MAX_CONSTANTS = 256


def _cached_constant(key: tuple, make) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced code builds its constants in the graph, no global state
        return make()
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        tensor = _CONSTANTS[key] = make()
    return tensor


def cached_arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n, device=device)`` (int64), built once per size and device."""
    return _cached_constant(("arange", n, device), lambda: torch.arange(n, device=device))


def _host_ints(token_ids, name: str) -> tuple:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D [K], got shape {tuple(token_ids.shape)}")
        return tuple(token_ids.tolist())
    if type(token_ids).__module__ == "numpy" and getattr(token_ids, "ndim", None) == 1:  # a numpy array of ids
        token_ids = token_ids.tolist()
    if isinstance(token_ids, Sequence) and all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                               for i in token_ids):
        return tuple(operator.index(i) for i in token_ids)
    raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints")


def _check_num_ids(k: int, name: str) -> None:
    if not 1 <= k <= MAX_BINS:
        raise ValueError(f"{name} must hold between 1 and {MAX_BINS} ids, got {k}")


def ids_on_device(token_ids) -> bool:
    """Whether :func:`as_token_ids` leaves the values of ``token_ids`` unchecked (a CUDA tensor, or any tensor
    while ``torch.compile`` traces): the kernels then check them on the device."""
    return isinstance(token_ids, torch.Tensor) and (token_ids.device.type == "cuda" or torch.compiler.is_compiling())


def repeated_ids(ids: torch.Tensor) -> torch.Tensor:
    """A one-element int32 tensor on ``ids``' device: 1 when ``ids`` hold a repeated value, else 0.

    For ids checked on the device: a few tiny kernels, no host sync. The fused kernels read it and give NaN
    outputs when it is set, because the backward of a repeated id must sum over its repeats, which a plain store
    per id does not do (and on a GPU, which of the repeats' stores lands is not defined).
    """
    ordered = ids.sort().values
    return (ordered[1:] == ordered[:-1]).any().to(torch.int32).reshape(1)


def as_token_ids(token_ids, vocab_size: int, device: torch.device, name: str = "token_ids") -> torch.Tensor:
    """Validate score-token ids and return them as an int64 tensor on ``device`` (treat it as read-only).

    Accepts a sequence of ints or a 1-D integer tensor. Range and uniqueness are checked on the host
    when the ids are not already on a CUDA device (the usual case: they are constants of a vocabulary);
    those are converted and copied to ``device`` once and reused on later calls with the same ids.
    """
    if isinstance(token_ids, torch.Tensor) and token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {token_ids.dtype}")
    if ids_on_device(token_ids):
        # Already on the GPU (or traced): only metadata is checked here, so there is no host sync; the kernels
        # check the values. They read the ids with stride 1, so a strided view (``table[:, 0]``) is copied.
        if token_ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D [K], got shape {tuple(token_ids.shape)}")
        _check_num_ids(token_ids.numel(), name)
        return token_ids.to(device=device, dtype=torch.int64).contiguous()
    ids = _host_ints(token_ids, name)
    _check_num_ids(len(ids), name)
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocabulary size), got range [{low}, {high}]")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} must be unique, got duplicates in {list(ids)}")
    return _cached_constant(("ids", ids, device), lambda: torch.tensor(ids, dtype=torch.int64, device=device))


def check_target(target, lead_shape: Sequence[int], num_bins: int, device: torch.device) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be an integer tensor of bin indices, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 (or int32) tensor of bin indices, got {target.dtype}")
    check_shape("target", target, lead_shape, "one bin index per row of logits")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but logits is on {device}")
    if target.device.type != "cuda" and target.numel() and not torch.compiler.is_compiling():
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_bins:
            raise ValueError(f"target must hold bin indices in [0, {num_bins}), got range [{low}, {high}]")


def as_values(values, num_bins: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Bin scores as a contiguous ``[K]`` tensor in the statistics dtype on ``device`` (treated as constants).

    A tensor already on ``device`` is used as it is (cast if needed); a sequence or a tensor on another device
    (a CPU tensor of constants, typically) is converted and copied once and reused on later calls.
    """
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point():
            raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
        if values.shape != (num_bins,):
            raise ValueError(f"values must have shape ({num_bins},) (one score per token id), "
                             f"got {tuple(values.shape)}")
        if values.device == device or torch.compiler.is_compiling():
            return values.detach().to(device=device, dtype=dtype).contiguous()
        scores = tuple(values.tolist())
    else:
        try:
            scores = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise TypeError("values must be a 1-D float tensor or a sequence of numbers") from None
        if len(scores) != num_bins:
            raise ValueError(f"values must have shape ({num_bins},) (one score per token id), got ({len(scores)},)")
    return _cached_constant(("values", scores, device, dtype),
                            lambda: torch.tensor(scores, dtype=dtype, device=device))
