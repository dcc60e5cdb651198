"""Synthetic preference data: determinism, the half-point score grid, pairs, 8-bit images, annotators, and that
each defect moves its own cue and leaves the others' alone."""
import io

import pytest
import torch
from PIL import Image

from zreward.data import ground_truth
from zreward.experiments.synthetic import ANCHOR_LEVELS, MAX_LEVEL, SyntheticPreferences, level_to_score, render
from zreward.scoring.rubric import DIMENSIONS


def test_same_seed_same_data_and_grid_scores():
    a, b = SyntheticPreferences(5, 3, 32, seed=4), SyntheticPreferences(5, 3, 32, seed=4)
    assert len(a) == 15
    for x, y in zip(a.items, b.items):
        assert x.prompt == y.prompt and x.levels == y.levels and torch.equal(x.image, y.image)
    assert not torch.equal(a.images([0]), SyntheticPreferences(5, 3, 32, seed=5).images([0]))
    images = a.images(range(len(a)))
    assert images.shape == (15, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    for item in a.items:
        assert set(item.scores) == set(DIMENSIONS)
        for score in item.scores.values():
            assert 1.0 <= score <= 5.0 and (2 * score).is_integer()
    assert a.items[0].prompt.split()[0] in ("one", "two", "three")


def test_pairs_are_same_prompt_non_tied_winner_first():
    data = SyntheticPreferences(6, 3, 32, seed=0)
    pairs = data.pairs()
    assert pairs
    for pair in pairs:
        w, l = data.items[pair.winner], data.items[pair.loser]
        assert w.group == l.group
        assert pair.score_w == w.scores[pair.dimension] > pair.score_l == l.scores[pair.dimension]
    assert {p.dimension for p in data.pairs(["realism"])} == {"realism"}


def test_spread_correlates_dimensions():
    data = SyntheticPreferences(10, 3, 32, seed=1, spread=1)
    for item in data.items:
        levels = list(item.levels.values())
        assert max(levels) - min(levels) <= 2


def test_default_levels_are_independent_across_dimensions():
    def largest_correlation(data):
        levels = torch.tensor([[item.levels[d] for d in DIMENSIONS] for item in data.items], dtype=torch.float64)
        correlation = torch.corrcoef(levels.T)
        return correlation[~torch.eye(len(DIMENSIONS), dtype=torch.bool)].abs().max(), levels

    independent, levels = largest_correlation(SyntheticPreferences(250, 4, 32, seed=0))
    assert independent < 0.15  # 1000 images: standard error 0.03 per pair of dimensions
    assert set(levels.flatten().tolist()) == set(range(MAX_LEVEL + 1))
    correlated, _ = largest_correlation(SyntheticPreferences(50, 4, 32, seed=0, spread=1))
    assert correlated > 0.8


def test_level_choices_restrict_the_scores():
    data = SyntheticPreferences(10, 3, 32, seed=2, level_choices=ANCHOR_LEVELS)
    scores = {score for item in data.items for score in item.scores.values()}
    assert scores <= {5.0, 4.0, 3.0, 2.0, 1.0} and len(scores) > 1
    with pytest.raises(ValueError, match="level_choices"):
        SyntheticPreferences(2, 2, 32, level_choices=(0, 9))


def test_images_are_8_bit_and_survive_a_png_round_trip():
    data = SyntheticPreferences(3, 2, 64, seed=3)
    for item in data.items:
        pixels = (item.image * 255).round().to(torch.uint8)
        assert torch.equal(pixels.float() / 255, item.image)
        buffer = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        back = torch.from_numpy(__import__("numpy").array(Image.open(io.BytesIO(buffer.getvalue())))).permute(2, 0, 1)
        assert torch.equal(back.float() / 255, item.image)


def test_annotators_score_on_the_grid_and_the_truth_is_their_trimmed_mean():
    data = SyntheticPreferences(20, 3, 32, seed=5, annotators=3, annotator_noise=0.6)
    off = 0
    for item in data.items:
        for dimension, votes in item.annotations.items():
            assert len(votes) == 3 and all((2 * v).is_integer() and 1.0 <= v <= 5.0 for v in votes)
            assert all(abs(v - level_to_score(item.levels[dimension])) <= 0.5 for v in votes)
            assert item.scores[dimension] == ground_truth(votes)
            off += sum(v != level_to_score(item.levels[dimension]) for v in votes)
    assert 0.4 < off / (len(data) * 4 * 3) < 0.7  # about annotator_noise of the votes, less where clipped
    clean = SyntheticPreferences(20, 3, 32, seed=5)
    assert all(item.annotations == {d: (s,) for d, s in item.scores.items()} for item in clean.items)
    with pytest.raises(ValueError, match="annotators"):
        SyntheticPreferences(2, 2, 32, annotators=0)
    with pytest.raises(ValueError, match="annotator_noise"):
        SyntheticPreferences(2, 2, 32, annotator_noise=1.5)


def _render(**levels):
    """A two-circle red image with the given defect levels; the same object positions at every level."""
    return render("red", "circle", 2, {d: levels.get(d, 0) for d in DIMENSIONS}, 64, torch.Generator().manual_seed(0))


OBJECTS = _render()[0] - _render()[1] > 0.3  # where the clean image's red circles are


def _cues(image):
    """The statistic each defect moves: object saturation, the median difference between neighbouring pixels,
    background brightness, and the share of the objects' pixels that still differ from the background."""
    corner = image[:, ~OBJECTS].median(1).values  # the background colour
    return {
        "alignment": (image.max(0).values - image.min(0).values)[OBJECTS & _solid(image, corner)].mean(),
        "realism": (image[:, 1:, :] - image[:, :-1, :]).abs().median(),  # 0 without noise, edges or not
        "aesthetics": image[:, ~OBJECTS].mean(),
        "plausibility": _solid(image, corner)[OBJECTS].float().mean(),
    }


def _solid(image, background):
    return (image - background.view(3, 1, 1)).abs().amax(0) > 0.05


def test_each_defect_moves_its_own_cue_and_leaves_the_others():
    clean = _cues(_render())
    moved = {"alignment": lambda a, b: a < 0.5 * b, "realism": lambda a, b: a > b + 0.1,
             "aesthetics": lambda a, b: a < 0.8 * b, "plausibility": lambda a, b: a < 0.3 * b}
    for dimension in DIMENSIONS:
        defect = _cues(_render(**{dimension: MAX_LEVEL}))
        assert moved[dimension](defect[dimension], clean[dimension]), dimension
        if dimension != "realism":  # pixel noise moves every statistic a little
            for other in set(DIMENSIONS) - {dimension}:
                assert defect[other] == pytest.approx(float(clean[other]), rel=0.05, abs=1e-6), (dimension, other)
    assert level_to_score(0) == 5.0 and level_to_score(MAX_LEVEL) == 1.0


def test_each_level_step_survives_8_bit_quantisation():
    """Each level moves its cue further than the one before on the 8-bit images: no step is rounded away."""
    for dimension in DIMENSIONS:
        values = [float(_cues(_render(**{dimension: level}))[dimension]) for level in range(MAX_LEVEL + 1)]
        steps = [b - a for a, b in zip(values, values[1:])]
        assert all(step > 0 for step in steps) or all(step < 0 for step in steps), (dimension, values)


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        SyntheticPreferences(2, 2, 48)
    with pytest.raises(ValueError, match="candidates"):
        SyntheticPreferences(2, 1, 32)
