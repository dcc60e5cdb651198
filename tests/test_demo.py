"""``zreward demo`` smoke test: a seconds-long configuration writes its PNG and JSON with finite metrics."""
import json
import math

from zreward.cli import build_parser
from zreward.experiments.demo import DemoConfig, run_demo
from zreward.training.gdso import GDSOConfig
from zreward.training.risd import RISDConfig


def test_cli_registers_demo():
    args = build_parser().parse_args(["demo", "--steps", "3", "--output-dir", "x", "--seed", "2", "--device", "cpu"])
    assert (args.steps, args.output_dir, args.seed, args.device) == (3, "x", 2, "cpu")
    assert callable(args.run)


def test_tiny_demo_runs_end_to_end(tmp_path):
    config = DemoConfig(
        steps=1, train_prompts=2, eval_prompts=2, candidates=3, image_size=32, output_dir=str(tmp_path),
        gdso=GDSOConfig(group_size=2, pairs_per_batch=1, max_new_tokens=2, steps_per_iteration=1),
        risd=RISDConfig(batch_size=2, teacher_max_new_tokens=2),
    )
    lines = []
    summary = run_demo(config, log=lines.append)
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == summary["stages"]
    assert (tmp_path / "teacher_cache" / "teacher_cache.safetensors").exists()
    assert set(summary["stages"]) == {"teacher_before", "student_before", "teacher_after", "student_after"}
    for metrics in summary["stages"].values():
        assert metrics["pairs"] > 0
        for key in ("plcc", "srcc", "hpa"):
            assert math.isfinite(metrics[key]), key
    assert len(summary["gdso_history"]) == 1 and len(summary["risd_history"]) == 2
    assert any("student after RISD" in line for line in lines)
