"""``zreward train teacher|student`` from the command line on tiny model folders and a generated annotation file with
PNG images: teacher -> student -> evaluate -> score, resume, errors before any step, two ranks under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zreward.cli import main
from zreward.deploy.model_folder import load_model_folder, read_metadata
from zreward.experiments.files import save_base_model, write_annotations
from zreward.experiments.synthetic import SyntheticPreferences
from zreward.train.config import StudentConfig, TeacherConfig, config_template, field_docs, load_config

REPO = Path(__file__).resolve().parents[1]
FAST = {"dtype": "float32", "lora_rank": 4, "lora_alpha": 8.0, "gradient_checkpointing": False, "lr": 1e-3,
        "save_every": 1, "eval_every": 1, "eval_batch_size": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Annotations (2 train prompts, 1 val prompt, 3 candidates each, 32x32 PNGs) and two tiny base folders."""
    root = tmp_path_factory.mktemp("train")
    write_annotations(SyntheticPreferences(3, 3, 32, seed=0, spread=1), root / "data", {"train": 2, "val": 1})
    save_base_model(root / "teacher-base", seed=0, layer_types=["full_attention"] * 2)
    save_base_model(root / "student-base", seed=1, layer_types=["full_attention"] * 2)
    return root


def teacher_settings(root, out, **overrides) -> dict:
    return {"base_model": str(root / "teacher-base"), "data": str(root / "data" / "annotations.jsonl"),
            "output_dir": str(out), "group_size": 2, "pairs_per_batch": 2, "steps_per_iteration": 2,
            "max_new_tokens": 2, "beta": 0.02, "eval_samples": 1, **FAST, **overrides}


def student_settings(root, out, teacher, **overrides) -> dict:
    return {"base_model": str(root / "student-base"), "teacher_model": str(teacher),
            "data": str(root / "data" / "annotations.jsonl"), "output_dir": str(out), "steps": 2, "batch_size": 2,
            "teacher_max_new_tokens": 2, "dimensions": ["realism", "aesthetics"], **FAST, **overrides}


def write(path: Path, settings: dict) -> Path:
    path.write_text(json.dumps(settings))
    return path


def train(role: str, config: Path, *extra: str) -> None:
    assert main(["train", role, "--config", str(config), *extra]) == 0


@pytest.mark.slow
def test_teacher_student_evaluate_score_from_the_command_line(workspace, tmp_path, capsys):
    """The whole path a user takes (about 30 s of CPU: two trainings, a teacher cache, two evaluations, a
    repeated student run)."""
    teacher_out, student_out = tmp_path / "teacher", tmp_path / "student"
    train("teacher", write(tmp_path / "teacher.json", teacher_settings(workspace, teacher_out, eval_every=2)))
    records = [json.loads(line) for line in (teacher_out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 2]
    assert {"plcc", "srcc", "hpa", "margin_hpa", "per_dimension"} <= set(val[0]) and val[0]["pairs"] > 0
    assert {p.name for p in (teacher_out / "checkpoints").iterdir()} == {"best", "step-00000001", "step-00000002"}
    assert (teacher_out / "curves.png").stat().st_size > 0
    assert read_metadata(teacher_out / "model")["role"] == "teacher"

    student = write(tmp_path / "student.json", student_settings(workspace, student_out, teacher_out / "model"))
    train("student", student)
    cache = student_out / "teacher_cache" / "teacher_cache.safetensors"
    probs = load_file(cache)["probs"]
    assert probs.shape == (6, 2, 9) and torch.allclose(probs.sum(-1), torch.ones(6, 2))
    scorer = load_model_folder(student_out / "model")
    assert read_metadata(student_out / "model")["role"] == "student" and not hasattr(scorer.model, "peft_config")

    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(student_out / "model"), "--data", str(workspace / "data" /
                 "annotations.jsonl"), "--split", "val", "--quiet", "--output", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["metrics"]["all"]["n"] == 12
    inputs = tmp_path / "inputs.jsonl"
    images = sorted((workspace / "data" / "images").iterdir())[:4]
    inputs.write_text("".join(json.dumps({"image": str(p), "prompt": "two red circles"}) + "\n" for p in images))
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(student_out / "model"), "--input", str(inputs), "--output", str(scores),
                 "--quiet"]) == 0
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]["dimensions"]) >= {"realism", "aesthetics"}

    # A repeated run with the same teacher and images reuses the cache instead of sampling again.
    capsys.readouterr()
    again = student_settings(workspace, tmp_path / "again", teacher_out / "model", steps=1, eval_every=0,
                             teacher_cache_dir=str(student_out / "teacher_cache"))
    train("student", write(tmp_path / "again.json", again))
    assert "reused" in capsys.readouterr().out
    assert torch.equal(load_file(cache)["probs"], probs)


def _final_weights(out: Path, step: int) -> dict:
    return load_file(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


@pytest.mark.parametrize("role", [pytest.param("teacher", marks=pytest.mark.slow), "student"])
def test_resume_continues_bit_exactly(workspace, tmp_path, role):
    """Stopped after step 1 and resumed, a run ends with the weights of one that never stopped (the teacher takes
    about 20 s of CPU: three runs with sampled rollouts and evaluations)."""
    if role == "teacher":
        short, full = {"iterations": 1, "steps_per_iteration": 1}, {"iterations": 2, "steps_per_iteration": 1}
        settings = lambda out, **kw: teacher_settings(workspace, out, **kw)  # noqa: E731
    else:
        short, full = {"steps": 1}, {"steps": 2}
        settings = lambda out, **kw: student_settings(  # noqa: E731
            workspace, out, workspace / "teacher-base", teacher_cache_dir=str(tmp_path / "cache"), **kw)
    # full fine-tuning (LoRA is resumed the same way), an evaluation at the end of the interrupted run only
    full, short = {**full, "lora_rank": 0, "eval_every": 2, "save_every": 0}, {**short, "lora_rank": 0,
                                                                             "eval_every": 2, "save_every": 0}
    train(role, write(tmp_path / "straight.json", settings(tmp_path / "straight", **full)))
    train(role, write(tmp_path / "part.json", settings(tmp_path / "resumed", **short)))
    train(role, write(tmp_path / "rest.json", settings(tmp_path / "resumed", **full)), "--resume")
    straight, resumed = _final_weights(tmp_path / "straight", 2), _final_weights(tmp_path / "resumed", 2)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2]


def test_a_run_does_not_overwrite_another_and_resume_refuses_a_changed_config(workspace, tmp_path):
    out = tmp_path / "run"
    settings = student_settings(workspace, out, workspace / "teacher-base", steps=1, eval_every=0)
    train("student", write(tmp_path / "a.json", settings))
    with pytest.raises(SystemExit, match="pass --resume"):
        train("student", write(tmp_path / "b.json", settings))
    with pytest.raises(SystemExit, match=r"differs .* in \['lr'\]"):
        train("student", write(tmp_path / "c.json", {**settings, "lr": 0.5}), "--resume")


def test_an_interrupted_teacher_cache_build_keeps_the_parts_it_finished(workspace, tmp_path, monkeypatch):
    """A rank's finished part of the cache is reused when the build runs again: the teacher is not even loaded."""
    cache = tmp_path / "cache"
    settings = student_settings(workspace, tmp_path / "a", workspace / "teacher-base", steps=1, eval_every=0,
                                teacher_cache_dir=str(cache))
    train("student", write(tmp_path / "a.json", settings))
    probs = load_file(cache / "teacher_cache.safetensors")["probs"]
    part = cache / "part-00000-of-00001"  # as if the build had stopped after this rank's part, before the join
    part.mkdir()
    for name in ("teacher_cache.safetensors", "teacher_cache.json"):
        (cache / name).rename(part / name)
    key = json.loads((cache / "cache_key.json").read_text())
    (part / "cache_key.json").write_text(json.dumps({**key, "share": [0, key["num_items"]]}))
    (cache / "cache_key.json").unlink()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its part was built")

    monkeypatch.setattr("zreward.deploy.model_folder.load_model_folder", no_teacher)
    train("student", write(tmp_path / "b.json", {**settings, "output_dir": str(tmp_path / "b")}))
    assert torch.equal(load_file(cache / "teacher_cache.safetensors")["probs"], probs) and not part.exists()


def _bad_data(root: Path, tmp_path: Path) -> Path:
    lines = (root / "data" / "annotations.jsonl").read_text().splitlines()
    image = str(root / "data" / "images" / "00000.png")
    lines = [line.replace("images/", str(root / "data" / "images") + "/") for line in lines]
    lines.insert(2, '{"prompt": "x", "image": "' + image + '", "dimension": "realism", "score": 7}')
    lines.insert(5, '{"prompt": "x", "image": "nowhere.png", "dimension": "realism", "score": 3.0}')
    lines.insert(6, "{not json")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("problem", ["unknown key", "score text", "bad data", "not an image", "mixed sizes"])
def test_bad_input_is_a_clear_error_before_any_step(workspace, tmp_path, role, problem):
    out = tmp_path / "out"
    settings = (teacher_settings(workspace, out) if role == "teacher"
                else student_settings(workspace, out, workspace / "teacher-base"))
    expected = []
    if problem == "unknown key":
        settings["learning_rate"] = 1e-4
        expected = ["unknown config key(s) ['learning_rate']", "config.json"]
    elif problem == "score text":
        settings["score_texts"] = ["1", "2", "10"]
        settings["score_values"] = [1.0, 3.0, 5.0]
        expected = ["score text '10' must be a single token"]
    elif problem == "bad data":
        settings["data"] = str(_bad_data(workspace, tmp_path))
        expected = ["bad.jsonl:3: score 7 is not on the half-point grid", "bad.jsonl:6: image file not found",
                    "bad.jsonl:7: malformed JSON"]
    else:
        data = tmp_path / "data.jsonl"
        image = tmp_path / ("fake.png" if problem == "not an image" else "wide.png")
        if problem == "not an image":
            image.write_text("not a png")
        else:
            from PIL import Image

            Image.new("RGB", (64, 32)).save(image)
        lines = (workspace / "data" / "annotations.jsonl").read_text().splitlines()
        lines = [line.replace('"images/', f'"{workspace / "data" / "images"}/') for line in lines]
        record = json.loads(lines[0]) | {"image": str(image)}
        data.write_text("\n".join(lines + [json.dumps(record)]) + "\n")
        settings["data"] = str(data)
        expected = [f"data.jsonl:{len(lines) + 1}: cannot read image"] if problem == "not an image" else \
            ["images have 2 sizes: 32x32", f"64 (1 records, first {data}:{len(lines) + 1})", "image_size"]
    with pytest.raises(SystemExit) as error:
        train(role, write(tmp_path / "config.json", settings))
    message = str(error.value)
    assert message.startswith(f"zreward train {role}: ")
    for text in expected:
        assert text in message
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()


def test_image_size_trains_on_mixed_sizes(workspace, tmp_path):
    """With image_size set, an image of another size is resized when read, and the run trains."""
    from PIL import Image

    lines = (workspace / "data" / "annotations.jsonl").read_text().splitlines()
    lines = [line.replace('"images/', f'"{workspace / "data" / "images"}/') for line in lines]
    Image.open(json.loads(lines[0])["image"]).resize((64, 48)).save(tmp_path / "big.png")
    record = json.loads(lines[0])
    lines[0] = json.dumps(record | {"image": str(tmp_path / "big.png")})
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    settings = student_settings(workspace, tmp_path / "out", workspace / "teacher-base", steps=1, eval_every=0,
                                image_size=[32, 32], data=str(tmp_path / "data.jsonl"))
    train("student", write(tmp_path / "config.json", settings))
    assert (tmp_path / "out" / "model" / "zreward_model.json").is_file()


def test_student_on_a_qwen3_vl_base_model(workspace, tmp_path):
    base = save_base_model(tmp_path / "qwen3-vl", family="qwen3-vl", seed=2)
    settings = student_settings(workspace, tmp_path / "out", workspace / "teacher-base", steps=1, eval_every=1,
                                base_model=str(base), lora_rank=0, gradient_checkpointing=True)
    train("student", write(tmp_path / "config.json", settings))
    scorer = load_model_folder(tmp_path / "out" / "model")
    assert type(scorer.model).__name__ == "Qwen3VLForConditionalGeneration"


@pytest.mark.parametrize("cls", [TeacherConfig, StudentConfig])
def test_every_key_is_documented_and_the_printed_template_loads(cls, tmp_path, capsys):
    undocumented = [name for name, doc in field_docs(cls).items() if not doc]
    assert not undocumented, f"document these fields where they are defined: {undocumented}"
    role = "teacher" if cls is TeacherConfig else "student"
    assert main(["train", role, "--print-config"]) == 0
    template = capsys.readouterr().out
    required = {k: v for k, v in {"base_model": "m", "data": "d.jsonl", "teacher_model": "t"}.items()
                if k in field_docs(cls)}
    for key, value in required.items():
        template = template.replace(f'{key} = ""', f'{key} = "{value}"')
    path = tmp_path / "run.toml"
    path.write_text(template)
    assert load_config(cls, path) == cls(**required)


def test_the_training_doc_lists_every_key_as_print_config_prints_it():
    doc = (REPO / "docs" / "training.md").read_text()
    for cls, role in ((TeacherConfig, "teacher"), (StudentConfig, "student")):
        assert f"```toml\n{config_template(cls)}```" in doc, \
            f"docs/training.md: paste the output of `zreward train {role} --print-config` under 'Every key'"


@pytest.mark.parametrize("cls,key,value,match", [
    (TeacherConfig, "lr", "1e-5", "lr: expected float"),
    (TeacherConfig, "lora_rank", 1.5, "lora_rank: expected int"),
    (TeacherConfig, "dtype", "float16", "dtype must be one of"),
    (TeacherConfig, "aggregation", "mean", "aggregation must be one of"),
    (StudentConfig, "dimensions", ["sharpness"], "dimensions must be distinct names"),
    (StudentConfig, "strategy", "zero3", "strategy must be one of"),
])
def test_config_values_are_checked_with_the_file_named(cls, key, value, match, tmp_path):
    path = write(tmp_path / "run.json", {"base_model": "m", "data": "d.jsonl", "teacher_model": "t", key: value}
                 if cls is StudentConfig else {"base_model": "m", "data": "d.jsonl", key: value})
    with pytest.raises(ValueError, match=match) as error:
        load_config(cls, path)
    assert str(path) in str(error.value)


def test_dry_run_estimates_the_configured_shape(workspace, tmp_path, monkeypatch, capsys):
    """--dry-run builds the model on the meta device with LoRA marked and asks zreward.training.memory for the
    configured ranks, strategy, batch and sequence length (the estimator itself is tested with its module)."""
    import types

    calls = []

    class Estimate:
        def table(self):
            return "memory table"

    def estimate_memory(model, **kwargs):
        calls.append((model, kwargs))
        return Estimate()

    monkeypatch.setitem(sys.modules, "zreward.training.memory",
                        types.SimpleNamespace(estimate_memory=estimate_memory))
    config = write(tmp_path / "t.json", teacher_settings(workspace, tmp_path / "out", max_new_tokens=100))
    assert main(["train", "teacher", "--config", str(config), "--dry-run", "--world-size", "8",
                 "--device-memory-gib", "80"]) == 0
    (model, kwargs), = calls
    assert all(p.device.type == "meta" for p in model.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    prompt_tokens = kwargs["seq_len"] - 100 - 3  # reasoning, then the answer prefix "Score: " (3 tokens)
    assert 100 < prompt_tokens < 1000  # the rubric text and one image token (a 32x32 image is 2x2 patches)
    assert kwargs == {"world_size": 8, "strategy": "fsdp2", "batch_size": 2 * 2 * 2, "seq_len": kwargs["seq_len"],
                      "gradient_checkpointing": False, "engine_memory_fraction": 0.0, "device_memory": 80 * 2**30,
                      "image_tokens": 1, "logprob_chunk": 256}
    assert "memory table" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def _torchrun(role: str, config: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "zreward.cli", "train", role, "--config", str(config)]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_teacher_and_student_on_two_ranks_under_torchrun(workspace, tmp_path):
    """Teacher and student on FSDP2 (LoRA; the teacher with a sharded reference policy, the student's cache built
    in two parts): both train on two gloo ranks, evaluate on the val split and write model folders. (~1 min: two
    torchrun launches.)"""
    teacher = write(tmp_path / "teacher.json", teacher_settings(workspace, tmp_path / "teacher",
                                                                steps_per_iteration=1, gradient_checkpointing=True))
    result = _torchrun("teacher", teacher, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    student = write(tmp_path / "student.json", student_settings(workspace, tmp_path / "student",
                                                                tmp_path / "teacher" / "model", steps=1,
                                                                strategy="fsdp2", gradient_checkpointing=True))
    result = _torchrun("student", student, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for role in ("teacher", "student"):
        log = [json.loads(line) for line in (tmp_path / role / "log.jsonl").read_text().splitlines()]
        assert [r["split"] for r in log] == ["val", "train", "val"]
        assert read_metadata(tmp_path / role / "model")["role"] == role
