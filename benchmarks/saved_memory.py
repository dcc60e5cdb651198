"""Bytes autograd keeps saved for backward, split by component: the activation memory a training step holds
between its forward and its backward, measurable on any device (the CPU's stand-in for the CUDA peak).

    saved = SavedBytes(parameters, {"generator": pipe.transformer, "vision": model.model.visual})
    with saved, saved.label("scorer"):
        loss = step()
    saved.total, saved.by_component   # bytes; each storage counted once, under the innermost label running

Parameters (and anything else sharing their storage) are left out. Tensors that ``torch.utils.checkpoint`` holds
inside a checkpointed region are its own business and do not show here: checkpointing keeps the region's inputs.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, parameters=(), components: dict | None = None):
        self.parameter_ptrs = {p.untyped_storage().data_ptr() for p in parameters}
        self.components = components or {}
        self.sizes: dict[int, tuple[str, int]] = {}  # storage -> (component, bytes)
        self._labels: list[str] = []
        self._hooks = []
        super().__init__(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.parameter_ptrs and ptr not in self.sizes:
            self.sizes[ptr] = (self._labels[-1] if self._labels else "other", storage.nbytes())
        return tensor

    def _leave(self, *_) -> None:
        self._labels.pop()

    @contextmanager
    def label(self, name: str):
        """Attribute what is saved inside the block to ``name`` (unless a labelled module runs inside it)."""
        self._labels.append(name)
        try:
            yield
        finally:
            self._labels.pop()

    def __enter__(self):
        for name, module in self.components.items():
            self._hooks.append(module.register_forward_pre_hook(lambda *_, name=name: self._labels.append(name)))
            self._hooks.append(module.register_forward_hook(self._leave))
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.sizes.values())

    @property
    def by_component(self) -> dict[str, int]:
        counts = Counter()
        for name, size in self.sizes.values():
            counts[name] += size
        return dict(counts.most_common())
