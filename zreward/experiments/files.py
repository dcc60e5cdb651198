"""Synthetic data and tiny models written as a user has them: PNG files with an annotation JSONL
(``zreward.data``), and base model folders (``save_pretrained`` of a model, its tokenizer and image processor), so
that ``zreward train`` runs on them exactly as on real ones."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from zreward.experiments.synthetic import SyntheticPreferences


def write_annotations(data: SyntheticPreferences, folder, splits: dict[str, int] | None = None,
                      file_name: str = "annotations.jsonl", append: bool = False) -> Path:
    """Each image of ``data`` as ``<folder>/images/<split>-<n>.png`` and one JSONL record per (image, dimension) with
    its annotators' scores. ``splits`` maps split names to numbers of prompt groups, dealt in order (default: all
    ``"train"``); a prompt's candidates stay in one split, as same-prompt pairs need. ``append`` adds the records to
    an existing file (another data set's splits, e.g. held-out prompts drawn from another seed). Returns the JSONL
    path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    groups = sorted({item.group for item in data.items})
    split_of, start = {}, 0
    for name, count in (splits or {"train": len(groups)}).items():
        split_of.update({g: name for g in groups[start:start + count]})
        start += count
    lines = []
    for n, item in enumerate(data.items):
        if item.group not in split_of:
            continue
        split = split_of[item.group]
        path = folder / "images" / f"{split}-{n:05d}.png"
        save_png(item.image, path)
        lines += [json.dumps({"prompt": item.prompt, "image": f"images/{path.name}", "dimension": d,
                              **_scores(item.annotations[d]), "split": split}) for d in item.levels]
    jsonl = folder / file_name
    with jsonl.open("a" if append else "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return jsonl


def _scores(annotations: tuple[float, ...]) -> dict:
    """One annotator's score as ``score``, several as ``scores`` (``zreward.data``'s two forms)."""
    return {"score": annotations[0]} if len(annotations) == 1 else {"scores": list(annotations)}


def save_png(image: torch.Tensor, path) -> None:
    """A float ``[3, H, W]`` image in ``[0, 1]`` as an 8-bit RGB PNG."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def save_base_model(folder, family: str = "qwen3.5", seed: int = 0, **overrides) -> Path:
    """A tiny random-weight model (``tiny_qwen35`` or ``tiny_qwen3_vl``; ``overrides`` update its text config)
    saved as a base model folder: weights, config, tokenizer and image processor."""
    from zreward.experiments.tiny_models import tiny_qwen3_vl, tiny_qwen35

    builders = {"qwen3.5": tiny_qwen35, "qwen3-vl": tiny_qwen3_vl}
    if family not in builders:
        raise ValueError(f"family must be one of {tuple(builders)}, got {family!r}")
    model, processor = builders[family](seed=seed, **overrides)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
