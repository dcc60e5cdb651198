"""PLCC / SRCC against scipy, HPA / margin HPA / GSB on hand-worked cases."""
import math

import numpy as np
import pytest
from scipy import stats

from zreward.metrics import gsb, gsb_counts, hpa, margin_hpa, non_tied_pairs, plcc, reward_metrics, srcc


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    target = rng.choice(np.arange(1.0, 5.5, 0.5), size=50)
    pred = target + rng.normal(0, 0.7, size=50)
    assert plcc(pred, target) == pytest.approx(stats.pearsonr(pred, target)[0], abs=1e-12)
    assert srcc(pred, target) == pytest.approx(stats.spearmanr(pred, target)[0], abs=1e-12)
    assert plcc([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert srcc([1, 2, 3], [9, 5, 1]) == pytest.approx(-1.0)
    assert math.isnan(plcc([1, 1, 1], [1, 2, 3])) and math.isnan(srcc([1, 2], [3, 3]))


def test_hpa_hand_worked():
    # Prompt "a": human 4 > 3 > 2; prompt "b": human 3 == 3 (tied, excluded) and 5 > 3.
    groups = ["a", "a", "a", "b", "b", "b"]
    target = [4.0, 3.0, 2.0, 3.0, 3.0, 5.0]
    pred = [3.0, 3.5, 1.0, 2.0, 9.0, 4.0]
    # Pairs: a(0,1) wrong, a(0,2) right, a(1,2) right, b(3,5) right, b(4,5) wrong -> 3/5.
    assert hpa(pred, target, groups) == pytest.approx(3 / 5)
    # Margin (> 0.5): a(0,1) and a(1,2)? gaps 1, 2, 1 -> all of a; b(3,5), b(4,5) gap 2 -> 3/5 again.
    assert margin_hpa(pred, target, groups) == pytest.approx(3 / 5)
    # A gap of exactly 0.5 is not a margin pair.
    assert math.isnan(margin_hpa([1.0, 2.0], [3.0, 3.5], ["p", "p"]))
    assert hpa([1.0, 2.0], [3.0, 3.5], ["p", "p"]) == 1.0


def test_prediction_ties_count_as_wrong():
    assert hpa([2.0, 2.0], [4.0, 3.0], ["p", "p"]) == 0.0


def test_pairs_stay_within_groups():
    a, b = non_tied_pairs(["x", "y", "x", "y"], [1.0, 2.0, 3.0, 2.0])
    assert list(zip(a.tolist(), b.tolist())) == [(0, 2)]
    assert math.isnan(hpa([1.0, 2.0], [1.0, 5.0], ["x", "y"]))


def test_gsb():
    assert gsb(6, 3, 1) == pytest.approx(0.5)
    assert gsb(0, 4, 0) == 0.0 and gsb(0, 0, 2) == -1.0
    assert gsb_counts([3.0, 2.0, 1.0, 2.05], [2.0, 2.0, 2.0, 2.0], tolerance=0.1) == (1, 2, 1)
    for bad in [(0, 0, 0), (-1, 2, 3), (1.5, 0, 0)]:
        with pytest.raises(ValueError):
            gsb(*bad)


def test_reward_metrics_and_bad_inputs():
    result = reward_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0], ["p", "p", "p"])
    assert result["n"] == 3 and result["pairs"] == 3 and result["margin_pairs"] == 3
    assert result["hpa"] == result["margin_hpa"] == 1.0 and result["srcc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        plcc([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        srcc([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="groups and target"):
        hpa([1.0, 2.0], [1.0, 2.0], ["p"])
