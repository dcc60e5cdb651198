"""``zreward demo``: a seconds-long configuration writes its PNG and JSON with finite metrics; ``--seeds`` writes the
mean ± sd over seeds; and on a shortened run at CI size both models learn (held-out metrics above where they
started, on two seeds)."""
import json
import math

import pytest

from zreward.cli import build_parser
from zreward.deploy.model_folder import load_model_folder
from zreward.experiments.demo import DemoConfig, run_demo, run_demo_seeds
from zreward.training.gdso import GDSOConfig
from zreward.training.risd import RISDConfig


def test_cli_registers_demo():
    args = build_parser().parse_args(["demo", "--steps", "3", "--output-dir", "x", "--seed", "2", "--device", "cpu",
                                      "--seeds", "4", "--threads", "1"])
    assert (args.steps, args.output_dir, args.seed, args.device, args.seeds, args.threads) == (3, "x", 2, "cpu", 4, 1)
    assert callable(args.run)
    defaults = build_parser().parse_args(["demo"])
    assert (defaults.seeds, defaults.threads) == (1, None)


@pytest.mark.parametrize("argv, named", [(["--seeds", "0"], "--seeds"), (["--threads", "two"], "--threads")])
def test_bad_arguments_name_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", *argv])
    assert f"argument {named}" in capsys.readouterr().err


def _tiny(output_dir, **overrides) -> DemoConfig:
    return DemoConfig(
        steps=1, train_prompts=2, eval_prompts=2, val_prompts=2, eval_every=1, candidates=3, image_size=32,
        output_dir=str(output_dir),
        gdso=GDSOConfig(group_size=2, pairs_per_batch=1, max_new_tokens=2, steps_per_iteration=1),
        risd=RISDConfig(batch_size=2, teacher_max_new_tokens=2), **overrides)


def test_tiny_demo_runs_end_to_end(tmp_path):
    lines = []
    summary = run_demo(_tiny(tmp_path, risd_steps_per_gdso_step=2), log=lines.append)
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == summary["stages"]
    # it ran what a user runs: files on disk and zreward train's entry points, whose outputs are all there
    records = [json.loads(line) for line in (tmp_path / "data" / "annotations.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert all((tmp_path / "data" / r["image"]).is_file() for r in records)
    for role in ("teacher", "student"):
        assert (tmp_path / "base" / role / "config.json").is_file()
        assert (tmp_path / role / "zreward_model.json").is_file()
        log = [json.loads(line) for line in (tmp_path / "runs" / role / "log.jsonl").read_text().splitlines()]
        assert {r["split"] for r in log} == {"train", "val"}
        assert (tmp_path / "runs" / role / "checkpoints" / "best").is_dir()
    assert (tmp_path / "runs" / "student" / "teacher_cache" / "teacher_cache.safetensors").exists()
    # the stages were scored from the model folders, which deploy as they are
    teacher, student = (load_model_folder(tmp_path / role) for role in ("teacher", "student"))
    assert json.loads((tmp_path / "teacher" / "zreward_model.json").read_text())["role"] == "teacher"
    assert teacher.model.config.text_config.hidden_size != student.model.config.text_config.hidden_size
    assert set(summary["stages"]) == {"teacher_before", "student_before", "teacher_after", "student_after"}
    for metrics in summary["stages"].values():
        assert metrics["pairs"] > 0
        for key in ("plcc", "srcc", "hpa"):
            assert math.isfinite(metrics[key]), key
    assert len(summary["gdso_history"]) == 1 and len(summary["risd_history"]) == 2
    assert any("student after RISD" in line for line in lines)


def test_seeds_write_each_run_and_the_mean_and_sd(tmp_path):
    lines = []
    result = run_demo_seeds(_tiny(tmp_path, seed=3), 2, log=lines.append)
    assert result["seeds"] == [3, 4]
    written = json.loads((tmp_path / "seeds.json").read_text())
    assert written["mean_sd"] == result["mean_sd"]
    for seed in (3, 4):
        assert (tmp_path / f"seed-{seed}" / "summary.json").exists()
    runs = [json.loads((tmp_path / f"seed-{seed}" / "summary.json").read_text())["stages"] for seed in (3, 4)]
    for stage, stats in result["mean_sd"].items():
        values = [run[stage]["hpa"] for run in runs]
        assert stats["hpa"]["mean"] == pytest.approx(sum(values) / 2)
        assert stats["hpa"]["sd"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert any(line.strip().startswith("teacher_after") and "±" in line for line in lines)


@pytest.mark.slow
def test_both_models_learn_on_a_shortened_run(tmp_path):
    """At CI size (100 GDSO and 100 RISD steps on 160 training images, 40 test images) the held-out metrics of both
    trained models rise above where they started on each of two seeds; the full default run goes much further
    (docs/demo.md). The last weights are compared, not the best by val HPA: two val prompts are too few to choose
    by (on one seed they ranked the untrained student first). Measured with 2 threads, seeds 0 / 1: HPA
    0.54 -> 0.64 / 0.43 -> 0.72 (teacher) and 0.42 -> 0.54 / 0.53 -> 0.67 (student)."""
    result = run_demo_seeds(DemoConfig(steps=100, train_prompts=40, eval_prompts=10, val_prompts=2, eval_every=100,
                                       final_model="last", output_dir=str(tmp_path)), 2, log=lambda line: None)
    for run in result["runs"]:
        stages = run["stages"]
        for role in ("teacher", "student"):
            before, after = stages[f"{role}_before"], stages[f"{role}_after"]
            assert after["hpa"] >= before["hpa"] + 0.03, (run["seed"], role, before["hpa"], after["hpa"])
            assert after["plcc"] >= before["plcc"] + 0.05, (run["seed"], role, before["plcc"], after["plcc"])
