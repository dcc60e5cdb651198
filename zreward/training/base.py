"""The trainer base GDSO, RISD and ReFL share: one optimizer loop, one checkpoint format, one log.

A trainer subclasses :class:`TrainerBase` and writes ``step()`` (one optimisation step, returns its metrics) and
``default_steps()``; the base provides:

* AdamW over the trainable parameters (``lr``, ``weight_decay``), gradients averaged over ranks, clipped to
  ``max_grad_norm`` (:meth:`TrainerBase._apply`);
* this rank's shard of a seeded, per-epoch data order (:meth:`TrainerBase._next_indices`), so that ranks see
  disjoint items and a resumed run sees the same ones;
* ``train(num_steps, log_file=..., checkpoint_dir=..., save_every=...)``: a progress bar, one JSONL record per
  step (``{"split": "train", "step": ..., <metrics>}``, plus whatever ``extra_records`` adds, e.g. ReFL's
  validation), periodic checkpoints;
* ``save(path)`` / ``load(path)`` / ``resume(checkpoint_dir)`` through :mod:`zreward.training.checkpoint`
  (safetensors + JSON, atomic): model, optimizer, every rank's RNG states, the step counter and data position,
  the history and the config. Resuming and stepping on gives bit-identical weights to never having stopped.
"""
from __future__ import annotations

import abc
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zreward.data import jsonl_values
from zreward.training.checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint, save_checkpoint
from zreward.training.distributed import (DistContext, all_reduce_gradients, broadcast_parameters, clip_grad_norm,
                                          shard_indices)


class TrainerBase(abc.ABC):
    """Optimizer, data order, checkpoints and the training loop of every zreward trainer.

    ``model`` holds the trainable parameters (those with ``requires_grad``) and is what checkpoints store;
    ``config`` is a dataclass saved with every checkpoint, with the fields ``lr``, ``weight_decay``,
    ``max_grad_norm`` and ``seed`` that every trainer's config has.
    """

    def __init__(self, model: torch.nn.Module, config, ctx: DistContext | None = None):
        self.ctx = ctx or DistContext(device=next(model.parameters()).device)
        self.model, self.config = model, config
        broadcast_parameters(model)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.state = {"step": 0, "epoch": 0, "position": 0}
        self.history: list[dict] = []

    @property
    def step_count(self) -> int:
        """Optimisation steps taken so far (restored by ``load``)."""
        return self.state["step"]

    @abc.abstractmethod
    def default_steps(self) -> int:
        """How many steps a full run takes, from the trainer's config."""

    @abc.abstractmethod
    def step(self) -> dict:
        """One optimisation step of the trainer's algorithm; returns its metrics (``"step"`` among them)."""

    def _next_indices(self, num_items: int, per_step: int) -> list[int]:
        """The next ``per_step`` of this rank's shard of the (seed, epoch) order; a new epoch when it runs out."""
        order = shard_indices(num_items, self.ctx, self.config.seed, self.state["epoch"])
        if len(order) < per_step:
            raise ValueError(f"each rank needs at least {per_step} items per step, got {len(order)}")
        if self.state["position"] + per_step > len(order):
            self.state["epoch"] += 1
            self.state["position"] = 0
            order = shard_indices(num_items, self.ctx, self.config.seed, self.state["epoch"])
        start = self.state["position"]
        self.state["position"] += per_step
        return order[start:start + per_step]

    def _apply(self, loss: torch.Tensor) -> float:
        """Backward, rank-average, clip, optimizer step, ``on_optimizer_step``; returns the pre-clip gradient
        norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(self.model)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = clip_grad_norm(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.on_optimizer_step()
        return float(norm)

    def on_optimizer_step(self) -> None:
        """Called after every optimizer step (e.g. to push the new weights to an inference engine)."""

    def extra_records(self, finished: bool) -> list[dict]:
        """Records ``train`` logs besides the step's own, before the first step (``self.step_count == 0``) and
        after every step (``finished`` on the last); none by default."""
        return []

    def train(self, num_steps: int | None = None, *, log=None, log_file=None, checkpoint_dir=None,
              save_every: int = 0, progress: bool = False) -> list[dict]:
        """Step until ``num_steps`` steps in all (default: ``default_steps()``), continuing from the current count.

        ``log(record)`` gets every record; ``log_file`` (JSONL) gets them on the main rank, with the records of
        an interrupted run past the resumed step dropped so that the file reads as one run; ``checkpoint_dir``
        gets ``step-<N>`` checkpoints every ``save_every`` steps and at the end; ``progress`` shows a bar.
        """
        total = num_steps if num_steps is not None else self.default_steps()
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {save_every}")
        write = self._log_writer(log, log_file)
        if self.step_count == 0:
            for record in self.extra_records(finished=False):
                write(record)
        with tqdm(total=total, initial=self.step_count, desc=type(self).__name__, unit="step",
                  disable=not (progress and self.ctx.is_main)) as bar:
            while self.step_count < total:
                metrics = self.step()
                write({"split": "train", **metrics})
                finished = self.step_count == total
                for record in self.extra_records(finished):
                    write(record)
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if checkpoint_dir is not None and ((save_every and self.step_count % save_every == 0) or finished):
                    self.save(Path(checkpoint_dir) / checkpoint_name(self.step_count))
        return self.history

    def _log_writer(self, log, log_file):
        path = Path(log_file) if log_file is not None and self.ctx.is_main else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = [r for r in read_log(path) if r["step"] <= self.step_count] if self.step_count > 0 else []
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

        def write(record: dict) -> None:  # the file first: a callback may read it
            if path is not None:
                with path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if log is not None:
                log(record)
        return write

    def save(self, path, extra_models: dict | None = None) -> Path:
        """Checkpoint to ``path`` (collective under torch.distributed: every rank calls it)."""
        state = {"trainer": self.state, "history": self.history, "config": asdict(self.config)}
        return save_checkpoint(path, self.model, self.optimizer, state, extra_models=extra_models)

    def load(self, path, extra_models: dict | None = None) -> None:
        """Restore a checkpoint ``save`` wrote: weights, optimizer, RNG states, step counter and data position."""
        state = load_checkpoint(path, self.model, self.optimizer, extra_models=extra_models)
        self.state, self.history = state["trainer"], state["history"]

    def resume(self, checkpoint_dir) -> Path | None:
        """Load the latest ``step-<N>`` checkpoint under ``checkpoint_dir``; returns it (None if there is none)."""
        path = latest_checkpoint(checkpoint_dir)
        if path is not None:
            self.load(path)
        return path


def read_log(path) -> list[dict]:
    """The records of a JSONL log ``train`` wrote (empty if the file does not exist).

    A malformed last line is what a crash in the middle of a write leaves: it is dropped with a warning. A
    malformed line before it is not ours to drop: ``ValueError`` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = list(jsonl_values(path))
    records = []
    for number, (where, value, problem) in enumerate(lines, start=1):
        if problem is None:
            records.append(value)
        elif number == len(lines):
            warnings.warn(f"{where}: {problem}; dropped (an interrupted write)", stacklevel=2)
        else:
            raise ValueError(f"{where}: {problem}")
    return records
