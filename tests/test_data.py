"""Annotation JSONL: validation with file:line errors, trimmed-mean ground truth, preference pairs."""
import json

import pytest
import torch
from PIL import Image

from zreward.data import AnnotationError, by_dimension, ground_truth, load_annotations, load_image, preference_pairs


def _write(tmp_path, lines):
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "img" / name)
    path = tmp_path / "ann.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _rec(**fields):
    record = {"prompt": "a cube", "image": "img/a.png", "dimension": "realism", "score": 3.5}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not None}


def test_ground_truth_drops_extremes():
    assert ground_truth([3.0]) == 3.0
    assert ground_truth([3.0, 4.0]) == 3.5
    assert ground_truth([1.0, 3.0, 3.5, 5.0]) == 3.25
    assert ground_truth([5.0, 2.0, 2.0]) == 2.0


def test_load_valid_file(tmp_path):
    path = _write(tmp_path, [
        _rec(),
        "",
        _rec(image="img/b.png", score=None, scores=[2.0, 2.5, 5.0], split="test"),
        _rec(image=str(tmp_path / "img" / "c.png"), dimension="alignment", score=5),
    ])
    records = load_annotations(path)
    assert [r.score for r in records] == [3.5, 2.5, 5.0]
    assert records[0].image == tmp_path / "img" / "a.png" and records[0].split == "train"
    assert records[1].source == f"{path}:3" and records[1].scores == (2.0, 2.5, 5.0)
    assert [r.split for r in load_annotations(path, split="test")] == ["test"]
    assert list(by_dimension(records)) == ["alignment", "realism"]


def test_errors_name_file_and_line(tmp_path):
    path = _write(tmp_path, [
        _rec(),
        "{not json",
        _rec(score=3.3),
        _rec(score=5.5),
        _rec(dimension="sharpness"),
        _rec(image="img/missing.png"),
        _rec(score=None, scores=[3.0, 7.0]),
        _rec(scores=[3.0]),
        _rec(score=None),
        _rec(split="dev", colour="red"),
        "[1, 2]",
        _rec(prompt=""),
        _rec(score=True),
    ])
    with pytest.raises(AnnotationError) as info:
        load_annotations(path)
    lines = str(info.value).splitlines()
    expected = [
        (2, "malformed JSON"), (3, "score 3.3 is not on the half-point grid"), (4, "score 5.5"),
        (5, "unknown dimension 'sharpness'"), (6, "image file not found"), (7, "score 7.0"),
        (8, "exactly one of 'score' or 'scores'"), (9, "exactly one of"), (10, "unknown split 'dev'"),
        (10, "unknown key 'colour'"), (11, "expected a JSON object"), (12, "'prompt' must be a non-empty string"),
        (13, "score True is not a number"),
    ]
    for number, text in expected:
        assert any(line.startswith(f"{path}:{number}: ") and text in line for line in lines), (number, text, lines)
    assert not any(line.startswith(f"{path}:1: ") for line in lines)


def test_missing_images_allowed_when_not_checked(tmp_path):
    path = _write(tmp_path, [_rec(image="img/none.png")])
    assert len(load_annotations(path, check_images=False)) == 1


def test_preference_pairs(tmp_path):
    path = _write(tmp_path, [
        _rec(score=3.0), _rec(image="img/b.png", score=4.0), _rec(image="img/c.png", score=3.0),
        _rec(prompt="other", score=1.0), _rec(dimension="aesthetics", score=5.0),
    ])
    records = load_annotations(path)
    pairs = preference_pairs(records)
    assert [(w.image.name, l.image.name) for w, l in pairs] == [("b.png", "a.png"), ("b.png", "c.png")]
    assert all(w.score > l.score and w.prompt == l.prompt and w.dimension == l.dimension for w, l in pairs)
    assert preference_pairs(records, min_gap=1.0) == []


def test_load_image(tmp_path):
    Image.new("RGB", (5, 4), (255, 0, 51)).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png")
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32
    assert image[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
