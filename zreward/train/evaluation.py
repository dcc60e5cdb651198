"""Evaluation on the val split while training: PLCC / SRCC / HPA / margin HPA every ``eval_every`` steps, in the
run's JSONL log, and the best checkpoint by val HPA kept beside the latest."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from zreward.data import Annotation
from zreward.evaluate import record_metrics
from zreward.scoring.rubric import DIMENSIONS
from zreward.train.data import ImageItems, Item
from zreward.training.checkpoint import save_checkpoint
from zreward.training.distributed import DistContext

BEST = "best"  # the best checkpoint's folder name, beside the step-<N> ones

# (images [B, 3, H, W] on the device, prompts, dimension) -> expected scores [B]
ScoreFn = Callable[[torch.Tensor, list[str], str], torch.Tensor]


class Validator:
    """Scores the val records with ``score_fn`` and returns their metrics as a log record.

    The records are cut into batches of one dimension, dealt to the ranks round-robin; a rank with fewer batches
    than another repeats one (its result dropped), so that every rank runs the same number of forward passes, as
    FSDP2's collectives need. Each evaluation samples from its own seed (``seed + step``) and leaves the training's
    random streams as they were, so that a resumed run evaluates and trains exactly as an uninterrupted one.
    """

    def __init__(self, records: list[Annotation], image_size, batch_size: int, ctx: DistContext, score_fn: ScoreFn,
                 seed: int):
        self.records, self.ctx, self.score_fn, self.seed = records, ctx, score_fn, seed
        self.items = ImageItems([Item(r.prompt, r.image, r.source) for r in records], image_size)
        batches = []
        for dimension in DIMENSIONS:
            indices = [i for i, r in enumerate(records) if r.dimension == dimension]
            batches += [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
        mine = batches[ctx.rank::ctx.world_size]
        rounds = -(-len(batches) // ctx.world_size)
        self.batches = [(b, True) for b in mine] + [(batches[0], False)] * (rounds - len(mine))

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        found: list[tuple[int, float]] = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + step)
            for indices, kept in self.batches:
                images = self.items.images(indices).to(self.ctx.device)
                scores = self.score_fn(images, self.items.prompts(indices), self.records[indices[0]].dimension)
                if kept:
                    found += zip(indices, scores.float().cpu().tolist())
        if self.ctx.distributed:
            gathered: list = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, found)
            found = [pair for part in gathered for pair in part]
        predictions = [math.nan] * len(self.records)
        for index, value in found:
            predictions[index] = value
        metrics = record_metrics(self.records, predictions)
        return {"split": "val", "step": step, **metrics.pop("all"), "per_dimension": metrics}


class ValidatedTraining:
    """Mixed into a trainer (before the trainer's class): ``extra_records`` evaluates with ``validator`` before the
    first step, every ``eval_every`` steps and after the last, and keeps ``<checkpoint_dir>/best``, the weights of
    the evaluation with the highest val HPA (ties keep the earlier). The best so far is part of the trainer's state,
    so a resumed run keeps comparing against it."""

    validator: Validator | None = None
    eval_every: int = 0
    checkpoint_dir: Path | None = None

    def extra_records(self, finished: bool) -> list[dict]:
        step = self.step_count
        if self.validator is None or not (step == 0 or finished or (self.eval_every and step % self.eval_every == 0)):
            return []
        record = self.validator(step)
        best = self.state.get("best")
        if not math.isnan(record["hpa"]) and (best is None or record["hpa"] > best["hpa"]):
            self.state["best"] = {"step": step, "hpa": record["hpa"]}
            if self.checkpoint_dir is not None:
                save_checkpoint(Path(self.checkpoint_dir) / BEST, self.model, None,
                                {"step": step, "hpa": record["hpa"]})
        return [record]
