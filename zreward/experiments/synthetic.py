"""Synthetic text-to-image preference data with controlled defects (the embedded demo's data set).

A prompt asks for ``<count> <colour> <shape>s`` ("two red circles"). Each candidate image draws that scene
with one defect level ``L`` in 0..8 per reward dimension, and its annotated score for that dimension is
``5 - L / 2``: the half-point grid 1.0, 1.5, ..., 5.0 of the score vocabulary. The defects are simple visual
cues a tiny ViT can pick up, each mapped onto its rubric:

* alignment - the objects lose their colour (mixed towards grey by ``L/8``, a wrong attribute binding) and
  from ``L >= 6`` one object is missing or extra (a wrong count);
* realism - additive Gaussian pixel noise, std ``0.04 L`` (generation noise);
* aesthetics - contrast washed out towards flat grey by ``0.1 L`` (flat, unpleasant rendering);
* plausibility - ``0.08 L`` of each object's 4x4 blocks are punched out (broken, impossible objects).

With ``spread=None`` the four levels are drawn independently. With ``spread=s`` each image first draws one
overall quality level and every dimension's level deviates from it by at most ``s``: real generations have
correlated defects, and one shared cue is what lets a tiny random-init model learn within minutes.

Everything is generated here from a seed (no files, no downloads); the same seed gives the same data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zreward.scoring.rubric import DIMENSIONS

COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.10, 0.72, 0.20), "blue": (0.12, 0.30, 0.92),
    "yellow": (0.96, 0.84, 0.08), "purple": (0.60, 0.15, 0.80), "orange": (0.98, 0.50, 0.05),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
MAX_LEVEL = 8
BACKGROUND = (0.93, 0.91, 0.86)


def level_to_score(level: int) -> float:
    """Defect level 0..8 -> annotated score 5.0..1.0 on the half-point grid."""
    return 5.0 - 0.5 * level


@dataclass
class Candidate:
    """One generated image: its prompt group, pixels ``[3, H, W]`` in [0, 1], defect levels and scores."""

    group: int
    prompt: str
    image: torch.Tensor
    levels: dict[str, int]
    scores: dict[str, float] = field(init=False)

    def __post_init__(self):
        self.scores = {d: level_to_score(level) for d, level in self.levels.items()}


@dataclass
class PreferencePair:
    """Two same-prompt candidates (indices into the data set) ranked on one dimension, winner first."""

    winner: int
    loser: int
    dimension: str
    score_w: float
    score_l: float


class SyntheticPreferences:
    """``num_prompts`` prompts x ``candidates`` images each, with scores for every dimension."""

    def __init__(self, num_prompts: int, candidates: int = 3, image_size: int = 64, seed: int = 0,
                 dimensions: tuple[str, ...] = DIMENSIONS, spread: int | None = None):
        if image_size % 32 or image_size < 32:
            raise ValueError(f"image_size must be a positive multiple of 32 (Qwen-VL patches x merge), got {image_size}")
        if candidates < 2:
            raise ValueError(f"candidates must be at least 2 (pairs need two images per prompt), got {candidates}")
        self.dimensions = tuple(dimensions)
        generator = torch.Generator().manual_seed(seed)
        self.items: list[Candidate] = []
        for group in range(num_prompts):
            colour = list(COLOURS)[_randint(generator, len(COLOURS))]
            shape = SHAPES[_randint(generator, len(SHAPES))]
            count = 1 + _randint(generator, len(COUNT_WORDS))
            prompt = f"{COUNT_WORDS[count - 1]} {colour} {shape}{'s' if count > 1 else ''}"
            for _ in range(candidates):
                levels = _levels(generator, self.dimensions, spread)
                image = render(colour, shape, count, levels, image_size, generator)
                self.items.append(Candidate(group, prompt, image, levels))

    def __len__(self) -> int:
        return len(self.items)

    def images(self, indices) -> torch.Tensor:
        return torch.stack([self.items[i].image for i in indices])

    def prompts(self, indices) -> list[str]:
        return [self.items[i].prompt for i in indices]

    def scores(self, indices, dimension: str) -> torch.Tensor:
        return torch.tensor([self.items[i].scores[dimension] for i in indices], dtype=torch.float32)

    def pairs(self, dimensions=None) -> list[PreferencePair]:
        """Every same-prompt, non-tied pair on each dimension, winner first (the GDSO training instances)."""
        out = []
        by_group: dict[int, list[int]] = {}
        for index, item in enumerate(self.items):
            by_group.setdefault(item.group, []).append(index)
        for dimension in dimensions or self.dimensions:
            for members in by_group.values():
                for a_pos, a in enumerate(members):
                    for b in members[a_pos + 1:]:
                        s_a, s_b = self.items[a].scores[dimension], self.items[b].scores[dimension]
                        if s_a != s_b:
                            w, l = (a, b) if s_a > s_b else (b, a)
                            out.append(PreferencePair(w, l, dimension, max(s_a, s_b), min(s_a, s_b)))
        return out


def render(colour: str, shape: str, count: int, levels: dict[str, int], size: int,
           generator: torch.Generator) -> torch.Tensor:
    """Draw ``count`` shapes of ``colour`` on a light background, then apply each dimension's defect."""
    alignment = levels.get("alignment", 0)
    if alignment >= 6:  # wrong count: one object missing (or one extra when a single one was asked for)
        count = count + 1 if count == 1 else count - 1
    grey = sum(COLOURS[colour]) / 3
    fill = torch.tensor([c + (grey - c) * alignment / MAX_LEVEL for c in COLOURS[colour]])
    image = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, size, size).clone()
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    cells = torch.randperm(4, generator=generator)[:count].tolist()
    cell = size / 2
    for slot in cells:
        radius = cell * (0.28 + 0.12 * torch.rand((), generator=generator).item())
        cy = (slot // 2 + 0.5) * cell + (torch.rand((), generator=generator).item() - 0.5) * (cell - 2 * radius)
        cx = (slot % 2 + 0.5) * cell + (torch.rand((), generator=generator).item() - 0.5) * (cell - 2 * radius)
        mask = _shape_mask(shape, ys - cy, xs - cx, radius)
        mask &= ~_punched_blocks(levels.get("plausibility", 0), size, generator)
        image[:, mask] = fill.view(3, 1)
    washed = 0.1 * levels.get("aesthetics", 0)
    image = image + (0.5 - image) * washed
    noise = 0.04 * levels.get("realism", 0)
    image = image + noise * torch.randn(image.shape, generator=generator)
    return image.clamp(0.0, 1.0)


def _levels(generator: torch.Generator, dimensions, spread: int | None) -> dict[str, int]:
    if spread is None:
        return {d: _randint(generator, MAX_LEVEL + 1) for d in dimensions}
    base = _randint(generator, MAX_LEVEL + 1)
    return {d: min(MAX_LEVEL, max(0, base + _randint(generator, 2 * spread + 1) - spread)) for d in dimensions}


def _shape_mask(shape: str, dy: torch.Tensor, dx: torch.Tensor, radius: float) -> torch.Tensor:
    if shape == "circle":
        return dy * dy + dx * dx <= radius * radius
    if shape == "square":
        return (dy.abs() <= radius * 0.85) & (dx.abs() <= radius * 0.85)
    # upward triangle: inside the base and the two slanted sides
    return (dy <= radius * 0.8) & (dy >= -radius) & (dx.abs() <= (dy + radius) * 0.6)


def _punched_blocks(level: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean ``[size, size]`` mask of the 4x4 blocks removed from objects at plausibility ``level``."""
    blocks = torch.rand(size // 4, size // 4, generator=generator) < 0.08 * level
    return blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=generator))
