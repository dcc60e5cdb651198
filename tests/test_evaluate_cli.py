"""``zreward evaluate`` end to end on a tiny saved Qwen3.5 and a generated annotation file."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from zreward.cli import main
from zreward.evaluate import format_table
from zreward.experiments.tiny_models import tiny_qwen35


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model, processor = tiny_qwen35(seed=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _dataset(folder):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        size = (64, 64) if i % 3 else (48, 80)  # two image sizes: batched separately
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        lines.append({"prompt": f"prompt {i // 3}", "image": f"{i}.png", "dimension": "realism",
                      "scores": [1.0 + 0.5 * i, 2.0, 4.5], "split": "test"})
        lines.append({"prompt": f"prompt {i // 3}", "image": f"{i}.png", "dimension": "alignment",
                      "score": 5.0 - 0.5 * i, "split": "test" if i < 5 else "train"})
    path = folder / "ann.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_evaluate_end_to_end(saved_model, tmp_path, capsys):
    data = _dataset(tmp_path)
    output = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(saved_model), "--data", str(data), "--output", str(output),
                 "--batch-size", "2"]) == 0
    result = json.loads(output.read_text())
    metrics = result["metrics"]
    assert list(metrics) == ["alignment", "realism", "all"]
    assert metrics["realism"]["n"] == 6 and metrics["alignment"]["n"] == 5 and metrics["all"]["n"] == 11
    # Realism ground truths (trimmed means) 2.0, 2.0, 2.0, 2.5, 3.0, 3.5: prompt 0 all tied, prompt 1 three pairs.
    assert metrics["realism"]["pairs"] == 3
    for row in metrics.values():
        for key in ("plcc", "srcc", "hpa", "margin_hpa"):
            assert row[key] is None or -1.0 <= row[key] <= 1.0
    predictions = result["predictions"]
    assert len(predictions) == 11 and all(1.0 <= p["prediction"] <= 5.0 for p in predictions)
    assert predictions[0]["source"].endswith("ann.jsonl:1") and predictions[0]["score"] == 2.0
    printed = capsys.readouterr()
    assert "dimension" in printed.out and "margin_hpa" in printed.out and "realism" in printed.out
    assert "scoring" in printed.err  # the tqdm bar


def test_evaluate_selects_split_and_dimension(saved_model, tmp_path):
    data = _dataset(tmp_path)
    output = tmp_path / "metrics.json"
    main(["evaluate", "--model", str(saved_model), "--data", str(data), "--output", str(output), "--quiet",
          "--split", "all", "--dimension", "alignment"])
    metrics = json.loads(output.read_text())["metrics"]
    assert list(metrics) == ["alignment", "all"] and metrics["alignment"]["n"] == 6


def test_evaluate_reports_bad_data(saved_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x", "image": "none.png", "dimension": "realism", "score": 2.0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: image file not found"):
        main(["evaluate", "--model", str(saved_model), "--data", str(path)])


def test_format_table():
    table = format_table({"realism": {"n": 4, "pairs": 2, "plcc": 0.5, "srcc": math.nan, "hpa": 1.0,
                                      "margin_hpa": 0.25, "margin_pairs": 1}})
    assert "realism" in table and "0.5000" in table and "nan" in table
