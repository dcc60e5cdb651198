"""``zreward score`` / ``zreward rank``: streaming, per-image records, bad inputs, resume after a kill, top-k."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import zreward.deploy.score as score_module
from zreward.cli import main
from zreward.data import load_image
from tests.deploy_helpers import save_tiny_student
from zreward.deploy.engine import Scoring, score_images
from zreward.deploy.model_folder import load_model_folder
from zreward.deploy.rank import top_k, top_k_path
from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer
from zreward.scoring.rubric import DIMENSIONS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def scorer(model_dir):
    return load_model_folder(model_dir)


def _images(folder, count, sizes=((32, 32), (32, 64))):
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"img{i:03d}.png"
        Image.fromarray((rng.random((*sizes[i % len(sizes)], 3)) * 255).astype(np.uint8)).save(folder / name)
        names.append(name)
    return names


def _jsonl(folder, names, prompts_per=3):
    path = folder / "candidates.jsonl"
    path.write_text("".join(json.dumps({"image": n, "prompt": f"prompt {i // prompts_per}"}) + "\n"
                            for i, n in enumerate(names)))
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scores_every_image_with_full_records(scorer, model_dir, tmp_path, capsys):
    names = _images(tmp_path, 5)
    data = _jsonl(tmp_path, names)
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(model_dir), "--input", str(data), "--output", str(out),
                 "--batch-size", "2"]) == 0
    lines = _lines(out)
    assert sorted(line["image"] for line in lines) == names
    values = scorer.vocab.values
    for line in lines:
        assert list(line) == ["image", "prompt", "dimensions", "reward", "aggregation"]
        assert list(line["dimensions"]) == list(DIMENSIONS)
        for entry in line["dimensions"].values():
            probs = torch.tensor(entry["probs"])
            assert probs.shape == (9,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
            assert entry["mean"] == pytest.approx(float(probs @ values), abs=1e-5)
            assert entry["std"] == pytest.approx(float((probs * (values - entry["mean"]) ** 2).sum().sqrt()), abs=1e-5)
        means = [entry["mean"] for entry in line["dimensions"].values()]
        assert line["reward"] == pytest.approx(sum(means) / 4, abs=1e-6)
        # The same numbers as scoring the image on its own.
        alone = score_images(scorer, [load_image(tmp_path / line["image"])], [line["prompt"]], DIMENSIONS)
        assert means == pytest.approx(alone.mean[0].tolist(), abs=1e-5)
    assert "scoring" in capsys.readouterr().err  # the progress bar


def test_dimensions_and_aggregation(model_dir, tmp_path):
    data = _jsonl(tmp_path, _images(tmp_path, 2))
    out = tmp_path / "scores.jsonl"
    main(["score", "--model", str(model_dir), "--input", str(data), "--output", str(out), "--quiet",
          "--dimension", "realism", "--dimension", "alignment", "--aggregation", "min"])
    for line in _lines(out):
        assert list(line["dimensions"]) == ["realism", "alignment"] and line["aggregation"] == "min"
        assert line["reward"] == pytest.approx(min(d["mean"] for d in line["dimensions"].values()))
    with pytest.raises(SystemExit, match="weights must be 2 non-negative numbers"):
        main(["score", "--model", str(model_dir), "--input", str(data), "--output", str(tmp_path / "o.jsonl"),
              "--dimension", "realism", "--dimension", "alignment", "--weights", "1", "2", "3"])
    with pytest.raises(SystemExit, match="engine 'vllm' needs vLLM|vLLM's CPU backend cannot run"):
        main(["score", "--model", str(model_dir), "--input", str(data), "--output", str(tmp_path / "o.jsonl"),
              "--engine", "vllm"])


def test_bad_lines_and_images_are_reported_with_file_and_line(model_dir, tmp_path, capsys):
    names = _images(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (1, 300)).save(tmp_path / "thin.png")  # aspect ratio above the processor's 200
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join([
        json.dumps({"image": names[0], "prompt": "a"}),
        "{not json",
        json.dumps({"image": "missing.png", "prompt": "a"}),
        json.dumps({"image": "broken.png", "prompt": "a"}),
        json.dumps(["image", "prompt"]),
        "",
        json.dumps({"image": "thin.png", "prompt": "a"}),
        json.dumps({"image": names[1], "prompt": "a", "note": "extra keys are ignored"}),
    ]) + "\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(model_dir), "--input", str(data), "--output", str(out), "--quiet"]) == 0
    assert [line["image"] for line in _lines(out)] == names
    err = capsys.readouterr().err
    for number, problem in [(2, "malformed JSON"), (3, "missing.png"), (4, "broken.png"),
                            (5, "expected an object"), (7, "aspect ratio")]:
        assert f"mixed.jsonl:{number}: " in err and problem in err, (number, err)
    assert "2 scored, 0 already in" in err and "5 skipped" in err
    with pytest.raises(SystemExit, match=r"mixed.jsonl:2: malformed JSON"):
        main(["score", "--model", str(model_dir), "--input", str(data), "--output", str(tmp_path / "f.jsonl"),
              "--quiet", "--on-error", "fail"])


def test_folder_input_with_prompts_file(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    names = _images(folder, 3)
    (folder / "prompts.json").write_text(json.dumps({names[0]: "a cat", names[2]: "a dog"}))
    out = tmp_path / "scores.jsonl"
    main(["score", "--model", str(model_dir), "--input", str(folder), "--output", str(out), "--quiet"])
    assert sorted((line["image"], line["prompt"]) for line in _lines(out)) == [(names[0], "a cat"),
                                                                               (names[2], "a dog")]
    assert f"no prompt for '{names[1]}'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read the prompts file"):
        main(["score", "--model", str(model_dir), "--input", str(folder), "--output", str(tmp_path / "x.jsonl"),
              "--prompts", str(tmp_path / "none.json")])


def test_memory_is_bounded_by_the_batch_not_the_data_set(scorer, tmp_path, monkeypatch):
    names = _images(tmp_path, 30, sizes=((32, 32), (32, 64), (64, 32)))
    data = _jsonl(tmp_path, names)
    state = {"loaded": 0, "scored": 0, "held": 0}

    def counting_load(path):
        state["loaded"] += 1
        state["held"] = max(state["held"], state["loaded"] - state["scored"])
        return load_image(path)

    def counting_score(scorer, images, prompts, dimensions):
        state["scored"] += len(images)
        return score_images(scorer, images, prompts, dimensions)

    monkeypatch.setattr(score_module, "load_image", counting_load)
    monkeypatch.setattr(score_module, "score_images", counting_score)
    counts = score_module.score_file(scorer, data, tmp_path / "s.jsonl", Scoring(("realism",)), batch_size=2,
                                     progress=False)
    assert counts == {"scored": 30, "skipped": 0, "already_done": 0} and state["scored"] == 30
    assert state["held"] <= score_module.MAX_PENDING_BATCHES * 2


def test_scoring_leaves_nothing_behind_that_breaks_training():
    # The ops cache small tensors (score values, token ids); made under inference_mode, autograd would refuse them.
    score_images(tiny_scorer(0, STUDENT_CONFIG, torch.device("cpu")), [torch.rand(3, 32, 32)], ["a"], DIMENSIONS)
    trainee = tiny_scorer(1, STUDENT_CONFIG, torch.device("cpu"))
    trainee.student_scores(torch.rand(1, 3, 32, 32), ["a"]).mean.sum().backward()
    assert trainee.lm_head_weight().grad is not None


def test_existing_output_needs_resume(model_dir, tmp_path):
    data = _jsonl(tmp_path, _images(tmp_path, 1))
    out = tmp_path / "scores.jsonl"
    out.write_text("{}\n")
    with pytest.raises(SystemExit, match="already holds scores: pass --resume"):
        main(["score", "--model", str(model_dir), "--input", str(data), "--output", str(out), "--quiet"])


def test_resume_after_a_kill_loses_nothing_and_repeats_nothing(scorer, model_dir, tmp_path):
    names = _images(tmp_path, 24, sizes=((32, 32),))
    data = _jsonl(tmp_path, names)
    names += names[:2]  # a candidate listed twice is scored twice, also across a resume
    data.write_text(data.read_text() + "".join(data.read_text().splitlines(keepends=True)[:2]))
    out = tmp_path / "scores.jsonl"
    job = subprocess.Popen([sys.executable, "-m", "zreward.cli", "score", "--model", str(model_dir), "--input",
                            str(data), "--output", str(out), "--batch-size", "1", "--quiet"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_bytes().count(b"\n") < 3) and time.monotonic() < deadline:
        assert job.poll() is None, job.stderr.read().decode()
        time.sleep(0.002)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    job.stderr.close()
    written = out.read_bytes().count(b"\n")
    assert 3 <= written < len(names), written
    with out.open("a") as handle:
        handle.write('{"image": "img000.png", "prom')  # a line cut off mid-write
    counts = score_module.score_file(scorer, data, out, Scoring(), batch_size=4, resume=True, progress=False)
    assert counts["already_done"] == written and counts["scored"] == len(names) - written
    lines = _lines(out)
    assert sorted(line["image"] for line in lines) == sorted(names)
    everything = score_images(scorer, [load_image(tmp_path / line["image"]) for line in lines],
                              [line["prompt"] for line in lines], DIMENSIONS)
    assert [line["reward"] for line in lines] == pytest.approx(everything.mean.mean(1).tolist(), abs=1e-5)


def test_top_k_per_prompt(model_dir, tmp_path):
    names = _images(tmp_path, 7)
    data = _jsonl(tmp_path, names, prompts_per=3)
    out = tmp_path / "scores.jsonl"
    main(["score", "--model", str(model_dir), "--input", str(data), "--output", str(out), "--quiet",
          "--top-k", "2"])
    scores = _lines(out)
    best = _lines(top_k_path(out, 2))
    assert top_k_path(out, 2).name == "scores.top2.jsonl"
    for prompt in {line["prompt"] for line in scores}:
        rewards = sorted((line["reward"] for line in scores if line["prompt"] == prompt), reverse=True)
        kept = [line for line in best if line["prompt"] == prompt]
        assert [line["rank"] for line in kept] == list(range(1, len(kept) + 1))
        assert [line["reward"] for line in kept] == rewards[:2]
    assert [line["prompt"] for line in best] == ["prompt 0"] * 2 + ["prompt 1"] * 2 + ["prompt 2"]
    ranked = tmp_path / "best1.jsonl"
    assert main(["rank", "--scores", str(out), "--top-k", "1", "--output", str(ranked)]) == 0
    assert [line["rank"] for line in _lines(ranked)] == [1, 1, 1]


def test_rank_keeps_ties_in_input_order_and_reports_bad_lines(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}", "prompt": "p", "reward": r}) + "\n"
                            for i, r in enumerate([1.0, 3.0, 3.0, 2.0, 3.0])))
    assert [(r["image"], r["rank"]) for r in top_k(path, 3)] == [("1", 1), ("2", 2), ("4", 3)]
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_k(path, 0)
    path.write_text(path.read_text() + '{"image": "x"}\n')
    with pytest.raises(SystemExit, match=r"scores.jsonl:6: not a score line"):
        main(["rank", "--scores", str(path), "--top-k", "1", "--output", str(tmp_path / "b.jsonl")])
