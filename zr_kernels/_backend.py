"""Which implementation runs an op, and a record of what ran.

Every public op takes ``backend=None``; the env var ``ZR_KERNELS_BACKEND`` supplies the default.
``"auto"`` picks the fused kernels for CUDA tensors and the PyTorch reference for CPU tensors.
``"triton"`` on CPU tensors runs the Triton kernels in the interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before ``triton`` is imported.

``trace_backends()`` lets a test (or a curious user) see which implementation really executed:
launchers call ``note()`` right after a kernel was launched (a call with nothing to compute, e.g. zero rows,
launches nothing and notes nothing), so the record survives ``torch.compile`` (the custom op body runs at run
time, not at trace time).

Triton launches on the *current* CUDA device; ``launch_guard(device)`` makes the tensors' device current
around a launch when it is not (tensors on ``cuda:1`` while ``cuda:0`` is current).
"""
from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch

BACKEND_ENV_VAR = "ZR_KERNELS_BACKEND"
BACKENDS = ("auto", "triton", "cuda", "reference")

_traces: list[list[tuple[str, str]]] = []


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(op: str, requested: str | None, device: torch.device, fused=("triton",)) -> str:
    """Turn the user's ``backend`` argument into the implementation that will run.

    ``fused`` lists the fused implementations this op has, preferred first (``linear_score`` has
    ``("cuda", "triton")``). Raises ``ValueError`` naming ``backend`` when the choice cannot run.
    """
    choice = requested if requested is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or unset), got {choice!r}")
    if choice == "auto":
        if device.type != "cuda":
            return "reference"
        for name in fused:
            if name != "cuda" or cuda_extension_available():
                return name
        return "reference"
    if choice == "reference":
        return choice
    if choice not in fused:
        raise ValueError(f"backend={choice!r} is not available for {op}; it has {fused + ('reference',)}")
    if choice == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' for {op} on {device.type} tensors needs TRITON_INTERPRET=1 "
            "set before triton is imported (or use backend='reference')"
        )
    if choice == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' for {op} needs CUDA tensors, got {device.type} tensors")
        if not cuda_extension_available():
            raise ValueError(f"backend='cuda' for {op}: the zr_kernels CUDA extension is not built")
    return choice


def cuda_extension_available() -> bool:
    """Whether the CUDA extension ``zr_kernels._C`` was built with this install (it imports without a GPU)."""
    try:
        from zr_kernels import _C  # noqa: F401
    except ImportError:
        return False
    return True


class FusedRoute:
    """How a fused op reaches its kernels, by the cheapest route that keeps autograd and ``torch.compile`` working.

    Traced by ``torch.compile``, the ``torch.library`` custom ``op`` goes into the graph (its fake and autograd
    registrations are what the compiler needs). In eager mode an ``autograd.Function`` built from the custom op's
    own ``forward``, ``setup_context`` and ``backward`` launches the kernels directly, without the custom op's
    Python dispatch on every call; with no gradient to record (or no ``backward``: forward-only ops), ``forward``
    runs bare.
    """

    def __init__(self, op, forward, setup_context=None, backward=None):
        self.op, self.forward = op, forward
        self.function = None if backward is None else _eager_function(op, forward, setup_context, backward)

    def __call__(self, *args, needs_grad: bool = False):
        if torch.compiler.is_compiling():
            return self.op(*args)
        if needs_grad and self.function is not None and torch.is_grad_enabled():
            return self.function.apply(*args)
        return self.forward(*args)


class Kernel(NamedTuple):
    """A backward launcher (annotated, so ``torch.library`` can infer its schema) and its fake implementation."""

    launch: Callable
    fake: Callable


def fused_op(name: str, forward: Callable, fake: Callable, setup_context: Callable | None = None,
             backward: Callable | None = None, backward_kernels: dict[str, Kernel] | None = None) -> FusedRoute:
    """Register a fused op once, for eager mode and for ``torch.compile``, and return its :class:`FusedRoute`.

    ``forward`` (annotated) launches the forward kernels; it becomes the custom op ``zr_kernels::<name>`` with
    ``fake`` as its fake implementation. With a ``backward``, each ``backward_kernels[key]`` becomes the custom op
    ``zr_kernels::<name>_<key>`` (with its fake), and ``backward(ctx, kernels, *grads)`` is the one backward
    formula: ``kernels.<key>`` is the custom op when a compiled graph runs it and the launcher itself in eager
    mode, where the route's ``autograd.Function`` calls it with no custom-op dispatch.
    """
    op = torch.library.custom_op(f"zr_kernels::{name}", forward, mutates_args=())
    op.register_fake(fake)
    if backward is None:
        return FusedRoute(op, forward)
    compiled, eager = {}, {}
    for key, kernel in (backward_kernels or {}).items():
        kernel_op = torch.library.custom_op(f"zr_kernels::{name}_{key}", kernel.launch, mutates_args=())
        kernel_op.register_fake(kernel.fake)
        compiled[key], eager[key] = kernel_op, kernel.launch
    compiled, eager = SimpleNamespace(**compiled), SimpleNamespace(**eager)
    op.register_autograd(lambda ctx, *grads: backward(ctx, compiled, *grads), setup_context=setup_context)
    return FusedRoute(op, forward, setup_context, lambda ctx, *grads: backward(ctx, eager, *grads))


def _eager_function(op, forward, setup_context, backward) -> type[torch.autograd.Function]:
    # The forward(ctx, *args) form: Function.apply binds a setup_context-style forward's arguments with
    # inspect.signature on every call, which costs more than a kernel launch.
    def forward_with_context(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    name = "".join(part.title() for part in op._name.split("::")[-1].split("_"))  # e.g. ScoreDistribution
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_with_context),
                                                   "backward": staticmethod(backward)})


_NO_GUARD = contextlib.nullcontext()


def launch_guard(device: torch.device):
    """A context making ``device`` the current CUDA device for a launch, or a no-op when it already is (or is
    not a CUDA device). Costs one ``current_device()`` query per launch when nothing needs to change."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device.index)


def note(op: str, backend: str) -> None:
    """Record that ``op`` ran on ``backend`` in every open ``trace_backends()`` block."""
    if torch.compiler.is_compiling():  # tracing is not running; the custom op body notes at run time
        return
    for trace in _traces:
        trace.append((op, backend))


@contextlib.contextmanager
def trace_backends():
    """Collect ``(op, backend)`` pairs for every kernel or reference call inside the block.

    >>> with trace_backends() as ran:
    ...     score_distribution(logits, ids, values, backend="triton")
    >>> ran
    [('score_distribution', 'triton')]
    """
    trace: list[tuple[str, str]] = []
    _traces.append(trace)
    try:
        yield trace
    finally:
        _traces.remove(trace)
