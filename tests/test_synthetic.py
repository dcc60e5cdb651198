"""Synthetic preference data: determinism, the half-point score grid, pairs, and that each defect is visible."""
import pytest
import torch

from zreward.experiments.synthetic import MAX_LEVEL, SyntheticPreferences, level_to_score, render
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


def _render(**levels):
    return render("red", "circle", 2, {d: levels.get(d, 0) for d in DIMENSIONS}, 64, torch.Generator().manual_seed(0))


def test_each_defect_moves_its_cue():
    clean = _render()
    roughness = lambda img: (img[:, 1:, :] - img[:, :-1, :]).abs().mean()  # noqa: E731
    assert roughness(_render(realism=MAX_LEVEL)) > 5 * roughness(clean)
    assert _render(aesthetics=MAX_LEVEL).std() < 0.5 * clean.std()
    saturation = lambda img: (img.max(0).values - img.min(0).values).max()  # noqa: E731
    assert saturation(_render(alignment=5)) < 0.6 * saturation(clean)
    object_pixels = lambda img: (img[0] - img[1] > 0.3).sum()  # noqa: E731 - red pixels
    assert object_pixels(_render(plausibility=MAX_LEVEL)) < 0.6 * object_pixels(clean)
    assert level_to_score(0) == 5.0 and level_to_score(MAX_LEVEL) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        SyntheticPreferences(2, 2, 48)
    with pytest.raises(ValueError, match="candidates"):
        SyntheticPreferences(2, 1, 32)
