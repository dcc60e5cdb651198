"""Score-token ids, bin values and targets of the ops: checked, converted and cached (the generic argument checks
are :mod:`zr_kernels.checks`). Each check raises before any kernel launches and names the argument.

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

from zr_kernels.checks import check_shape

MAX_BINS = 1024


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
