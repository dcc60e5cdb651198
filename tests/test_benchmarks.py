"""Every benchmark once in smoke mode (on the CPU: Triton in the interpreter) under pytest-benchmark.

Checks that each op reports all its providers (those that cannot run here as skipped, with a reason), that
the numbers are finite, that the Triton providers really ran the Triton kernels, and that the JSON, markdown
and PNG come out. No timing is asserted.
"""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from benchmarks import harness, report
from benchmarks.__main__ import OPS, main
from zr_kernels import reference
from tests.helpers import DEVICE

PROVIDERS = {
    "score_distribution": {"triton", "eager", "compile", "liger"},
    "group_advantages": {"triton", "eager", "compile", "liger"},
    "pairwise_gap": {"triton", "eager", "compile", "liger"},
    "slice_kl": {"triton", "eager", "compile", "liger", "naive"},
    "linear_score": {"cuda", "triton", "eager", "compile", "liger", "naive"},
    "student_scoring": {"ours", "naive", "teacher"},
    "overhead": {"triton", "cuda", "eager", "bare"},
}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.parametrize("op", OPS)
def test_bench_smoke(op, benchmark, tmp_path):
    config = harness.Config(device=DEVICE, smoke=True, cpu_reps=1)
    cases = importlib.import_module(f"benchmarks.bench_{op}").cases(config)
    records = benchmark.pedantic(harness.run_cases, args=(cases, config, 1.0), kwargs={"log": lambda line: None},
                                 rounds=1, iterations=1)

    assert {r["provider"] for r in records} == PROVIDERS[op]
    if any(g.select is report.is_headline for g in report.GOALS if g.op == op):  # the others select by params
        assert any(r["headline"] for r in records), "the goals need a headline case"
    for r in records:
        assert r["status"] in ("ok", "skipped"), f"{r['case']} / {r['provider']}: {r['reason']}"
        if r["status"] == "skipped":
            assert r["reason"], f"{r['case']} / {r['provider']} skipped without a reason"
            continue
        case = next(c for c in cases if c.label == r["case"])
        timed = ("fwd_ms", "bwd_ms", "full_ms") if case.grad and not r["forward_only"] else ("fwd_ms",)
        assert all(_finite(r[key]) and r[key] > 0 for key in timed), r
        assert r["forward_only"] or _finite(r["speedup"]), r  # a bare launch is a floor, not a rival
        if case.bytes_moved is not None:
            assert _finite(r["gbps"]) and _finite(r["pct_copy"]), r
        if r["provider"] == "triton":
            assert any(ran.endswith(":triton") for ran in r["ran"]), f"{r['case']}: the Triton kernel did not run"
    if not torch.cuda.is_available():  # what must run on a CPU, and what must be skipped there
        ok = {r["provider"] for r in records if r["status"] == "ok"}
        assert ok == PROVIDERS[op] - {"cuda", "compile", "liger"}

    meta = report.run_meta(config, 1.0, f"pytest {op}")
    paths = report.write({op: records}, meta, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert {r["provider"] for r in data["ops"][op]["records"]} == PROVIDERS[op]
    assert data["meta"]["versions"]["torch"] == torch.__version__
    text = paths["md"].read_text()
    assert f"## {op}" in text and all(f"| {p} |" in text for p in PROVIDERS[op])
    for r in records:
        if r["status"] == "skipped":
            assert f"skipped: {r['reason']}" in text
    swept = any(r["x"] is not None for r in records)  # the overhead cases are points, not a sweep: no plot
    assert [p.name for p in paths["png"]] == ([f"{report.device_stem(meta)}-{op}.png"] if swept else [])
    assert all(p.stat().st_size > 0 for p in paths["png"])


def test_every_goal_has_one_case_in_the_full_run():
    """Goals pick their case by headline or by params; a renamed param or a dropped size would leave a goal
    silently 'n/a' on the GPU run. Builds the full (non-smoke) case lists without running them, except
    student_scoring's, which builds its 9B-shape model up front (its goals take the headline case)."""
    config = harness.Config(device=DEVICE, smoke=False)
    for op in (op for op in OPS if op != "student_scoring"):
        cases = importlib.import_module(f"benchmarks.bench_{op}").cases(config)
        for goal in (g for g in report.GOALS if g.op == op):
            chosen = [c.label for c in cases if goal.select({"op": c.op, "params": c.params, "headline": c.headline})]
            assert len(chosen) == 1, f"{op}: goal {goal.text!r} selects {chosen}"


def test_compiled_backward_is_timed():
    """The ``compile`` provider through real ``torch.compile`` (Inductor; its C++ backend on a CPU), which the CPU
    smoke run skips. A compiled backward donates its saved buffers by default and then refuses the
    ``retain_graph=True`` that timing the backward alone needs: every compile provider failed so on the H100."""
    config = harness.Config(device=DEVICE, smoke=False, cpu_reps=2)
    ids = torch.tensor([1, 5, 9], device=DEVICE)
    values = torch.tensor([1.0, 3.0, 5.0], device=DEVICE)

    def score(logits):
        return reference.score_distribution(logits, ids, values)

    case = harness.Case(op="score_distribution", label="tiny", grad=("logits",),
                        make_inputs=lambda: {"logits": torch.randn(4, 16, device=DEVICE, requires_grad=True)},
                        providers=[harness.eager_provider(score), harness.compile_provider(score, config)])
    records = harness.measure_case(case, config, None)
    assert [r["provider"] for r in records] == ["eager", "compile"]
    for r in records:
        assert r["status"] == "ok", f"{r['provider']}: {r['reason']}"
        assert all(_finite(r[key]) and r[key] > 0 for key in ("fwd_ms", "bwd_ms", "full_ms")), r


def test_cli_writes_results_and_keeps_other_ops(tmp_path, capsys):
    main(["--smoke", "--ops", "group_advantages", "--out", str(tmp_path)])
    main(["--smoke", "--ops", "pairwise_gap", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "## pairwise_gap" in printed and "| fwd+bwd vs eager | >= 5x |" in printed
    (json_path,) = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    assert set(data["ops"]) == {"group_advantages", "pairwise_gap"}  # the second run merged, not replaced
    assert data["meta"]["command"] == f"python -m benchmarks --smoke --ops pairwise_gap --out {tmp_path}"
    assert "## group_advantages" in json_path.with_suffix(".md").read_text()
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_goals_met_and_not_met():
    def record(provider, full_ms, op="pairwise_gap", headline=True, **params):
        return {"op": op, "provider": provider, "status": "ok", "headline": headline, "case": f"{op} {params}",
                "params": params, "fwd_ms": full_ms / 2, "full_ms": full_ms}

    meta = {"smoke": False, "cuda": True}
    gdso = dict(op="gdso_rewards", headline=False, P=4096, G=16)
    ops = {"pairwise_gap": {"meta": meta, "records": [
        record("triton", 1.0), record("eager", 6.0), record("compile", 1.2),
        record("triton", 2.0, **gdso), record("compile", 1.0, **gdso)]}}
    rows = report.goal_rows(ops)
    assert [(r["goal"], r["measured"], r["status"]) for r in rows] == [
        ("fwd+bwd vs eager", "6.00x", "met"), ("fwd+bwd vs torch.compile", "1.20x", "not met"),
        ("gdso_rewards vs torch.compile", "0.50x", "not met")]
    assert rows[2]["case"] == "gdso_rewards {'P': 4096, 'G': 16}"  # selected by its params, not the headline
    ops["pairwise_gap"]["records"][2] = {**ops["pairwise_gap"]["records"][2], "status": "skipped"}
    assert report.goal_rows(ops)[1]["status"].startswith("n/a")
