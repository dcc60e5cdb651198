"""``zreward ablate`` smoke test: a seconds-long run writes its JSON, table and PNG with every arm and seed.

No ordering between arms is asserted: at this size it depends on the seed.
"""
import json
import math

import pytest
import torch

from zreward.cli import build_parser
from zreward.experiments.ablate import AblationConfig, run_ablation
from zreward.experiments.arms import DESCRIPTIONS, STUDENT_ARMS, TEACHER_ARMS, WRITTEN_REASONING_ARM
from zreward.training.gdso import GDSOConfig
from zreward.training.opd import OPDConfig
from zreward.training.risd import RISDConfig

ARMS = {"teacher_zero_shot", "sft", "rewarddance", "grpo", "gdso", "gdso_parsed", "student_zero_shot",
        "student_sft", "opd", "risd"}


def test_cli_registers_ablate():
    args = build_parser().parse_args(["ablate", "--output-dir", "x", "--seeds", "2", "--teacher-steps", "5",
                                      "--student-steps", "6", "--eval-every", "3", "--device", "cpu", "--threads", "2",
                                      "--arms", "gdso", "student_sft", "--annotators", "3", "--annotator-noise", "0.4"])
    assert (args.output_dir, args.seeds, args.teacher_steps, args.student_steps, args.eval_every, args.device,
            args.threads) == ("x", 2, 5, 6, 3, "cpu", 2)
    assert (args.arms, args.annotators, args.annotator_noise) == (["gdso", "student_sft"], 3, 0.4)
    assert callable(args.run)


@pytest.mark.parametrize("argv, named", [
    (["--seeds", "0"], "--seeds"), (["--teacher-steps", "two"], "--teacher-steps"),
    (["--eval-every", "-1"], "--eval-every"), (["--device", "tpu"], "--device"), (["--threads", "0"], "--threads"),
    (["--arms", "teacher_zero_shot"], "--arms"), (["--annotator-noise", "2"], "--annotator-noise"),
])
def test_bad_arguments_name_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate", *argv])
    assert f"argument {named}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device_is_refused(tmp_path, capsys):
    args = build_parser().parse_args(["ablate", "--device", "cuda", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        args.run(args)
    assert "argument --device" in capsys.readouterr().err


def _tiny_config(output_dir, workers: int, **overrides) -> AblationConfig:
    return AblationConfig(**overrides,
        seeds=2, teacher_steps=2, student_steps=2, eval_every=1, train_prompts=2, eval_prompts=2, image_size=32,
        workers=workers, output_dir=str(output_dir),
        gdso=GDSOConfig(group_size=2, pairs_per_batch=1, max_new_tokens=2, steps_per_iteration=1, beta=0.0),
        risd=RISDConfig(batch_size=2, teacher_max_new_tokens=2),
        opd=OPDConfig(batch_size=2, max_new_tokens=2),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ablate")
    threads = torch.get_num_threads()
    result = run_ablation(_tiny_config(output_dir, workers=1), progress=False)
    assert torch.get_num_threads() == threads, "the run must restore the caller's thread count"
    return output_dir, result


def test_tiny_ablation_writes_every_arm_and_seed(tiny_run):
    output_dir, result = tiny_run
    assert set(TEACHER_ARMS) | set(STUDENT_ARMS) | {WRITTEN_REASONING_ARM} < ARMS == set(DESCRIPTIONS)
    written = json.loads((output_dir / "ablation.json").read_text())
    assert set(written["arms"]) == set(written["summary"]) == ARMS
    assert written["summary"] == json.loads(json.dumps(result["summary"]))
    assert (output_dir / "ablation.png").stat().st_size > 0
    table = (output_dir / "ablation.md").read_text()
    for name in ARMS:
        assert f"| {name} |" in table
        runs = written["arms"][name]
        assert [run["seed"] for run in runs] == [0, 1]
        trained = name in TEACHER_ARMS or name in STUDENT_ARMS or name == WRITTEN_REASONING_ARM
        for run in runs:
            for key in ("plcc", "srcc", "hpa"):
                assert math.isfinite(run["metrics"][key]), (name, key)
            # every curve starts at its role's zero-shot point
            assert [step for step, _ in run["curve"]] == ([0, 1, 2] if trained else [0])
            assert len(run["history"]) == (2 if trained else 0)
        stats = written["summary"][name]["hpa"]
        assert stats["std"] is not None and stats["mean"] == pytest.approx(sum(r["metrics"]["hpa"] for r in runs) / 2)
    for name in ("student_sft", "risd"):
        assert written["summary"][name]["tokens_per_score"]["mean"] == 1
    # sampled reasoning (at most max_new_tokens=2 tokens), then the score token
    for name in ("gdso", "opd", "rewarddance"):
        assert 1 < written["summary"][name]["tokens_per_score"]["mean"] <= 3, name
    # the OPD student's output tokens are its own rollout lengths
    for run in written["arms"]["opd"]:
        lengths = [m["output_tokens"] for m in run["history"]]
        assert run["tokens_per_score"] == pytest.approx(sum(lengths) / len(lengths))
    for run in written["arms"]["rewarddance"]:
        assert 0.0 <= run["metrics"]["rationale_match"] <= run["metrics"]["rationale_format"] <= 1.0


def test_worker_processes_give_the_same_numbers(tiny_run, tmp_path):
    """Each arm seeds itself, so running the arms in two spawned processes changes nothing."""
    _, serial = tiny_run
    parallel = run_ablation(_tiny_config(tmp_path, workers=2), progress=False)
    assert parallel["workers"] == 2
    assert parallel["arms"] == serial["arms"]


def test_a_subset_of_arms_with_noisy_annotators(tmp_path):
    """``arms`` trains only those (risd and opd come with gdso); the zero-shot rows are always there; the labels
    of a noisy-annotator run are the trimmed means, which the table's settings line names."""
    result = run_ablation(_tiny_config(tmp_path, workers=1, arms=("student_sft",), annotators=3,
                                       annotator_noise=0.5), progress=False)
    assert set(result["arms"]) == set(result["summary"]) == {"teacher_zero_shot", "student_zero_shot", "student_sft"}
    assert result["summary"]["teacher_zero_shot"]["tokens_per_score"]["mean"] is None
    table = (tmp_path / "ablation.md").read_text()
    assert "| student_sft |" in table and "| gdso |" not in table and "3 annotator(s)" in table
    with pytest.raises(ValueError, match="arms must be"):
        run_ablation(_tiny_config(tmp_path, workers=1, arms=("student_zero_shot",)), progress=False)
