"""The annotation file as the trainers read it: images loaded from disk when a batch asks for them, the train
split's images and GDSO pairs, and everything checked before the first step.

Image sizes: the scorer processes one image size per forward pass (``preprocess_images``), and a GDSO batch holds
the winner and loser images of several pairs. So every image of a run has one size: either the file's images
all have the same size, or the config's ``image_size`` names the ``[height, width]`` each image is resized to
when read (antialiased bicubic, as the scorer's own resize). The model's image processor then takes that size to
its own patch grid as it would at inference.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from zreward.data import Annotation, AnnotationError, load_annotations, load_image, preference_pairs
from zreward.experiments.synthetic import PreferencePair


@dataclass(frozen=True)
class Item:
    """One image of the data set with its generation prompt (the records of its dimensions share it)."""

    prompt: str
    image: Path
    source: str  # file:line of its first record


class ImageItems:
    """Images and prompts by index, read from disk on demand (the trainers' data protocol: ``len``,
    ``images(indices)``, ``prompts(indices)``); at most one batch of images is in memory."""

    def __init__(self, items: list[Item], image_size: tuple[int, int] | None = None):
        self.items = list(items)
        self.image_size = None if image_size is None else tuple(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def images(self, indices) -> torch.Tensor:
        """Float ``[B, 3, H, W]`` in ``[0, 1]``, resized to ``image_size`` when one is set."""
        return torch.stack([read_image(self.items[i].image, self.image_size) for i in indices])

    def prompts(self, indices) -> list[str]:
        return [self.items[i].prompt for i in indices]

    def subset(self, indices) -> "ImageItems":
        return ImageItems([self.items[i] for i in indices], self.image_size)


def read_image(path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as float ``[3, H, W]`` in ``[0, 1]``, resized to ``size = (height, width)`` if given."""
    image = load_image(path)
    if size is None or tuple(image.shape[1:]) == tuple(size):
        return image
    resized = F.interpolate(image[None], size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    return resized[0].clamp(0.0, 1.0)


def unique_items(records: list[Annotation]) -> tuple[list[Item], dict[tuple[str, Path], int]]:
    """The distinct (prompt, image) of ``records`` in file order, and the index of each."""
    index: dict[tuple[str, Path], int] = {}
    items = []
    for record in records:
        key = (record.prompt, record.image)
        if key not in index:
            index[key] = len(items)
            items.append(Item(record.prompt, record.image, record.source))
    return items, index


def gdso_pairs(records: list[Annotation], index: dict[tuple[str, Path], int],
               min_gap: float) -> list[PreferencePair]:
    """GDSO's training instances: same-prompt, same-dimension record pairs whose ground truths differ by more
    than ``min_gap`` (``zreward.data.preference_pairs``), as winner/loser indices into the items."""
    return [PreferencePair(index[(w.prompt, w.image)], index[(l.prompt, l.image)], w.dimension, w.score, l.score)
            for w, l in preference_pairs(records, min_gap)]


@dataclass
class RunData:
    """The checked annotation file of a run: its train and val records and the train split's images."""

    train: list[Annotation]
    val: list[Annotation]
    items: ImageItems
    index: dict[tuple[str, Path], int]


def load_run_data(path, image_size=None, score_range: tuple[float, float] | None = None) -> RunData:
    """Read and check the annotation file ``path`` before any model is loaded.

    Every malformed line and missing image (``load_annotations``), then every image that cannot be opened or
    whose size breaks the one-size rule, and every score outside ``score_range`` is reported as ``file:line`` in
    one ``AnnotationError``. The train split must not be empty.
    """
    records = load_annotations(path)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if not train:
        raise AnnotationError(f"{path}: no records in the train split")
    used = train + val
    errors = _image_problems(used, image_size)
    if score_range is not None:
        low, high = score_range
        errors += [f"{r.source}: score {s} lies outside the score vocabulary's range [{low}, {high}]"
                   for r in used for s in r.scores if not low <= s <= high]
    if errors:
        raise AnnotationError("\n".join(errors))
    items, index = unique_items(train)
    return RunData(train, val, ImageItems(items, image_size), index)


def _image_problems(records: list[Annotation], image_size) -> list[str]:
    """Unreadable images, and with no ``image_size`` images of more than one size, as ``file:line`` lines."""
    from PIL import Image, UnidentifiedImageError

    errors, sizes, first_of = [], Counter(), {}
    seen: dict[Path, tuple[int, int] | None] = {}
    for record in records:
        if record.image not in seen:
            try:
                with Image.open(record.image) as image:
                    seen[record.image] = (image.height, image.width)
            except (OSError, UnidentifiedImageError) as error:
                seen[record.image] = None
                errors.append(f"{record.source}: cannot read image {record.image} ({error})")
        size = seen[record.image]
        if size is not None:
            sizes[size] += 1
            first_of.setdefault(size, record.source)
    if image_size is None and len(sizes) > 1:
        listed = ", ".join(f"{h}x{w} ({n} records, first {first_of[(h, w)]})" for (h, w), n in sizes.most_common())
        errors.append(f"images have {len(sizes)} sizes: {listed}; set image_size = [height, width] in the config "
                      "to train at one size")
    return errors
