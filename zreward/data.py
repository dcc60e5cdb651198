"""Annotation data: a JSONL file of rubric scores, ground truth, same-prompt preference pairs.

One JSON object per line (blank lines are skipped)::

    {"prompt": "a red cube", "image": "images/0001.png", "dimension": "realism", "score": 3.5, "split": "train"}
    {"prompt": "a red cube", "image": "images/0002.png", "dimension": "realism", "scores": [3.0, 3.5, 4.5],
     "split": "test"}

- ``prompt``: the generation prompt (non-empty string).
- ``image``: path to the image, relative to the JSONL file's folder or absolute; the file must exist.
- ``dimension``: one of ``zreward.scoring.rubric.DIMENSIONS``.
- exactly one of ``score`` (one annotation) or ``scores`` (several annotators), each on the half-point grid
  1.0, 1.5, ..., 5.0.
- ``split`` (optional, default ``"train"``): ``"train"``, ``"val"`` or ``"test"``.

The ground truth of several annotations drops the highest and the lowest before averaging (when there are at
least three, paper Sec. 2). Errors name ``file:line``; all of a file's errors are reported together.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zreward.metrics import non_tied_pairs
from zreward.scoring.rubric import DIMENSIONS

SPLITS = ("train", "val", "test")
SCORE_MIN, SCORE_MAX, SCORE_STEP = 1.0, 5.0, 0.5
_KEYS = {"prompt", "image", "dimension", "score", "scores", "split"}


class AnnotationError(ValueError):
    """Malformed annotation file; the message lists every bad line as ``file:line: problem``."""


@dataclass(frozen=True)
class Annotation:
    prompt: str
    image: Path
    dimension: str
    scores: tuple[float, ...]
    split: str
    source: str  # "file:line", for messages

    @property
    def score(self) -> float:
        """Ground truth: the trimmed mean of the annotations."""
        return ground_truth(self.scores)


def ground_truth(scores) -> float:
    """Mean of the annotations after dropping one highest and one lowest (only with three or more)."""
    scores = sorted(float(s) for s in scores)
    if not scores:
        raise ValueError("scores must hold at least one annotation")
    if len(scores) >= 3:
        scores = scores[1:-1]
    return sum(scores) / len(scores)


def _grid_error(score) -> str | None:
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"score {score!r} is not a number"
    steps = (score - SCORE_MIN) / SCORE_STEP
    if not SCORE_MIN <= score <= SCORE_MAX or abs(steps - round(steps)) > 1e-6:
        return f"score {score!r} is not on the half-point grid 1.0, 1.5, ..., 5.0"
    return None


def _parse(record, root: Path, check_images: bool) -> tuple[dict | None, list[str]]:
    """The fields of one JSON value, or the list of what is wrong with it."""
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {type(record).__name__}"]
    problems = [f"unknown key {key!r}" for key in sorted(set(record) - _KEYS)]
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("'prompt' must be a non-empty string")
    dimension = record.get("dimension")
    if dimension not in DIMENSIONS:
        problems.append(f"unknown dimension {dimension!r} (expected one of {', '.join(DIMENSIONS)})")
    split = record.get("split", "train")
    if split not in SPLITS:
        problems.append(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if ("score" in record) == ("scores" in record):
        problems.append("give exactly one of 'score' or 'scores'")
        scores = []
    else:
        scores = [record["score"]] if "score" in record else record["scores"]
        if not isinstance(scores, list) or not scores:
            problems.append("'scores' must be a non-empty list")
            scores = []
        problems += [e for e in map(_grid_error, scores) if e]
    image = record.get("image")
    if not isinstance(image, str) or not image:
        problems.append("'image' must be a path string")
    else:
        image = Path(image) if Path(image).is_absolute() else root / image
        if check_images and not image.is_file():
            problems.append(f"image file not found: {image}")
    if problems:
        return None, problems
    return dict(prompt=prompt, image=image, dimension=dimension, scores=tuple(float(s) for s in scores),
                split=split), []


def jsonl_values(path) -> Iterator[tuple[str, Any, str | None]]:
    """``(where, value, problem)`` for each non-blank line of a JSONL file: ``where`` is ``file:line``, ``problem``
    None or what makes the line malformed JSON (then ``value`` is None)."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line), None
            except json.JSONDecodeError as error:
                yield f"{path}:{number}", None, f"malformed JSON ({error.msg} at column {error.colno})"


def load_annotations(path, split: str | None = None, *, check_images: bool = True) -> list[Annotation]:
    """Read and validate an annotation JSONL file; keep only ``split`` when given.

    Raises ``AnnotationError`` listing every bad line (malformed JSON, missing fields, scores off the grid,
    unknown dimensions or splits, missing image files).
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    records, errors = [], []
    for where, value, problem in jsonl_values(path):
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        fields, problems = _parse(value, path.parent, check_images)
        errors += [f"{where}: {p}" for p in problems]
        if fields is not None:
            records.append(Annotation(**fields, source=where))
    if errors:
        raise AnnotationError("\n".join(errors))
    return [r for r in records if split is None or r.split == split]


def preference_pairs(records: list[Annotation], min_gap: float = 0.0) -> list[tuple[Annotation, Annotation]]:
    """``(winner, loser)`` pairs of same-prompt, same-dimension records whose ground truths differ by more
    than ``min_gap`` (GDSO training pairs; the HPA pairs of the metrics)."""
    groups = [(r.prompt, r.dimension) for r in records]
    first, second = non_tied_pairs(groups, [r.score for r in records], min_gap)
    pairs = []
    for a, b in zip(first.tolist(), second.tolist()):
        win, lose = (records[a], records[b]) if records[a].score > records[b].score else (records[b], records[a])
        pairs.append((win, lose))
    return pairs


def by_dimension(records: list[Annotation]) -> dict[str, list[Annotation]]:
    """Records grouped by dimension, in ``DIMENSIONS`` order (dimensions without records left out)."""
    groups = defaultdict(list)
    for record in records:
        groups[record.dimension].append(record)
    return {d: groups[d] for d in DIMENSIONS if groups[d]}


def load_image(path) -> torch.Tensor:
    """An image file as float ``[3, H, W]`` in ``[0, 1]`` (RGB), the scorer's input format."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
