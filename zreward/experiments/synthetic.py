"""Synthetic text-to-image preference data with controlled defects (the embedded demo's data set).

A prompt asks for ``<count> <colour> <shape>s`` ("two red circles"). Each candidate image draws that scene
with one defect level ``L`` in 0..8 per reward dimension, and its annotated score for that dimension is
``5 - L / 2``: the half-point grid 1.0, 1.5, ..., 5.0 of the score vocabulary. Each dimension's defect changes
a different part of the image, so that one dimension's score says nothing about another's:

* alignment - the objects lose the prompt's colour, mixed towards a dark grey by ``L/8`` (a wrong attribute);
* realism - additive Gaussian pixel noise over the whole image, std ``0.04 L`` (generation noise);
* aesthetics - the background dulls from a light cream towards a grey-brown by ``L/8`` (flat, murky lighting),
  the objects untouched;
* plausibility - ``0.1 L`` of each object's blocks (a 16 x 16 grid over the image) are punched out, an exact
  share rather than a random one (broken, impossible objects).

The objects cover about the same share of the image whatever their count (one large, two medium or three small
ones: 40-46 % for circles and squares, 28 % for triangles), so the object defects are as visible as the
background and noise ones. With the default ``spread=None`` the four
levels are drawn independently, so an untrained model that happens to follow one cue ranks the other three
dimensions at chance. With ``spread=s`` each image draws one overall quality level and every dimension's level
deviates from it by at most ``s`` (correlated defects: one shared cue ranks every dimension).

``annotators=A`` adds label noise as real annotation has it: each of A annotators scores every (image,
dimension) at the true level moved one half-point up or down with probability ``annotator_noise / 2`` each (kept
on the grid), and the ground truth is their trimmed mean (``zreward.data.ground_truth``: the highest and lowest
dropped from three or more). ``annotations`` keeps every annotator's score.

Images are returned exactly as an 8-bit PNG stores them (rounded to multiples of 1/255), so writing them to files
and reading them back changes nothing. Everything is generated here from a seed (no files, no downloads); the same
seed gives the same data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zreward.data import ground_truth
from zreward.scoring.rubric import DIMENSIONS

COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.10, 0.72, 0.20), "blue": (0.12, 0.30, 0.92),
    "yellow": (0.96, 0.84, 0.08), "purple": (0.60, 0.15, 0.80), "orange": (0.98, 0.50, 0.05),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
MAX_LEVEL = 8
LEVELS = tuple(range(MAX_LEVEL + 1))
ANCHOR_LEVELS = (0, 2, 4, 6, 8)         # the rubric's five anchors: scores 5, 4, 3, 2, 1
BACKGROUND = (0.86, 0.84, 0.78)        # aesthetics level 0
DULL_BACKGROUND = (0.66, 0.64, 0.60)   # aesthetics level 8
WRONG_COLOUR = (0.25, 0.25, 0.25)      # alignment level 8
NOISE_PER_LEVEL = 0.04
HOLES_PER_LEVEL = 0.1
HOLE_GRID = 16                          # plausibility punches blocks of a HOLE_GRID x HOLE_GRID grid
# Object radius as a share of the image side, by count: the objects cover the same share of the image either way.
RADIUS = {1: 0.384, 2: 0.264, 3: 0.216}


def level_to_score(level: int) -> float:
    """Defect level 0..8 -> annotated score 5.0..1.0 on the half-point grid."""
    return 5.0 - 0.5 * level


@dataclass
class Candidate:
    """One generated image: its prompt group, pixels ``[3, H, W]`` in [0, 1], defect levels, each annotator's
    scores (``annotations``, one tuple per dimension) and their ground truth (``scores``, the trimmed mean)."""

    group: int
    prompt: str
    image: torch.Tensor
    levels: dict[str, int]
    annotations: dict[str, tuple[float, ...]] = None
    scores: dict[str, float] = field(init=False)

    def __post_init__(self):
        if self.annotations is None:
            self.annotations = {d: (level_to_score(level),) for d, level in self.levels.items()}
        self.scores = {d: ground_truth(values) for d, values in self.annotations.items()}


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
                 dimensions: tuple[str, ...] = DIMENSIONS, spread: int | None = None, annotators: int = 1,
                 annotator_noise: float = 0.0, level_choices: tuple[int, ...] = LEVELS):
        if image_size % 32 or image_size < 32:
            raise ValueError(f"image_size must be a positive multiple of 32 (Qwen-VL patches x merge), got {image_size}")
        if candidates < 2:
            raise ValueError(f"candidates must be at least 2 (pairs need two images per prompt), got {candidates}")
        level_choices = tuple(level_choices)
        if not level_choices or any(not 0 <= level <= MAX_LEVEL for level in level_choices):
            raise ValueError(f"level_choices must be defect levels in 0..{MAX_LEVEL}, got {level_choices}")
        if annotators < 1:
            raise ValueError(f"annotators must be at least 1, got {annotators}")
        if not 0.0 <= annotator_noise <= 1.0:
            raise ValueError(f"annotator_noise must be a probability in [0, 1], got {annotator_noise}")
        self.dimensions = tuple(dimensions)
        generator = torch.Generator().manual_seed(seed)
        self.items: list[Candidate] = []
        for group in range(num_prompts):
            colour = list(COLOURS)[_randint(generator, len(COLOURS))]
            shape = SHAPES[_randint(generator, len(SHAPES))]
            count = 1 + _randint(generator, len(COUNT_WORDS))
            prompt = f"{COUNT_WORDS[count - 1]} {colour} {shape}{'s' if count > 1 else ''}"
            for _ in range(candidates):
                levels = _levels(generator, self.dimensions, spread, level_choices)
                image = render(colour, shape, count, levels, image_size, generator)
                annotations = None
                if annotators > 1 or annotator_noise > 0:
                    annotations = {d: _annotate(generator, level, annotators, annotator_noise)
                                   for d, level in levels.items()}
                self.items.append(Candidate(group, prompt, image, levels, annotations))

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
    """Draw ``count`` shapes of ``colour`` on a background, apply each dimension's defect and quantise to 8 bits."""
    fraction = {d: levels.get(d, 0) / MAX_LEVEL for d in DIMENSIONS}
    target = torch.tensor(COLOURS[colour])
    fill = target + (torch.tensor(WRONG_COLOUR) - target) * fraction["alignment"]
    background = torch.tensor(BACKGROUND)
    background = background + (torch.tensor(DULL_BACKGROUND) - background) * fraction["aesthetics"]
    image = background.view(3, 1, 1).expand(3, size, size).clone()
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    radius = RADIUS[count] * size
    for cy, cx in _centres(count, size, generator):
        mask = _shape_mask(shape, ys - cy, xs - cx, radius)
        mask &= ~_punched_blocks(mask, HOLES_PER_LEVEL * levels.get("plausibility", 0), generator)
        image[:, mask] = fill.view(3, 1)
    image = image + NOISE_PER_LEVEL * levels.get("realism", 0) * torch.randn(image.shape, generator=generator)
    return (image.clamp(0.0, 1.0) * 255).round() / 255


def _centres(count: int, size: int, generator: torch.Generator) -> list[tuple[float, float]]:
    """Object centres ``(y, x)``: one near the middle, two side by side (or stacked), three in three of the four
    quadrants; each jittered a little."""
    def jitter(scale: float) -> float:
        return (torch.rand((), generator=generator).item() - 0.5) * scale * size

    if count == 1:
        return [(size / 2 + jitter(0.2), size / 2 + jitter(0.2))]
    if count == 2:
        centres = [(size / 2 + jitter(0.3), size * x) for x in (0.27, 0.73)]
        if torch.rand((), generator=generator).item() < 0.5:
            centres = [(x, y) for y, x in centres]
        return centres
    slots = torch.randperm(4, generator=generator)[:3].tolist()
    return [((slot // 2 + 0.5) * size / 2 + jitter(0.06), (slot % 2 + 0.5) * size / 2 + jitter(0.06))
            for slot in slots]


def _levels(generator: torch.Generator, dimensions, spread: int | None, choices: tuple[int, ...]) -> dict[str, int]:
    """One defect level per dimension from ``choices``: independent, or (``spread``) within ``spread`` places of
    the choices around one shared draw."""
    if spread is None:
        return {d: choices[_randint(generator, len(choices))] for d in dimensions}
    base = _randint(generator, len(choices))
    return {d: choices[min(len(choices) - 1, max(0, base + _randint(generator, 2 * spread + 1) - spread))]
            for d in dimensions}


def _annotate(generator: torch.Generator, level: int, annotators: int, noise: float) -> tuple[float, ...]:
    """``annotators`` scores of an image at defect ``level``: each one half-point off with probability ``noise``
    (up or down alike), clipped to the grid."""
    draws = torch.rand(annotators, 2, generator=generator)
    steps = torch.where(draws[:, 0] < noise, torch.where(draws[:, 1] < 0.5, -1, 1), 0)
    return tuple(level_to_score(min(MAX_LEVEL, max(0, level + int(step)))) for step in steps)


def _shape_mask(shape: str, dy: torch.Tensor, dx: torch.Tensor, radius: float) -> torch.Tensor:
    if shape == "circle":
        return dy * dy + dx * dx <= radius * radius
    if shape == "square":
        return (dy.abs() <= radius * 0.85) & (dx.abs() <= radius * 0.85)
    # upward triangle: inside the base and the two slanted sides
    return (dy <= radius * 0.8) & (dy >= -radius) & (dx.abs() <= (dy + radius) * 0.6)


def _punched_blocks(mask: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of ``round(share x n)`` of the ``n`` blocks (of a ``HOLE_GRID`` grid over the image) that
    ``mask`` touches, drawn without replacement."""
    size = mask.shape[0]
    block = max(1, size // HOLE_GRID)
    touched = mask.view(size // block, block, size // block, block).any(3).any(1).flatten()
    candidates = touched.nonzero().squeeze(1)
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:round(share * candidates.numel())]]
    holes = torch.zeros_like(touched)
    holes[chosen] = True
    return holes.view(size // block, size // block).repeat_interleave(block, 0).repeat_interleave(block, 1)


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=generator))
