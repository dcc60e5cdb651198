"""``python -m zr_kernels.check``: the install self-check users run on their GPU (here in the interpreter)."""
import importlib
import os
import subprocess
import sys

import torch

import zr_kernels.check as check


def test_every_op_passes_and_runs_its_triton_kernel():
    rows = check.run(quick=True, out=lambda line: None)
    assert rows and all(r.ok for r in rows), [check.format_row(r) for r in rows if not r.ok]
    fused = [r for r in rows if "bad ids" not in r.op]
    assert {r.op.split()[0] for r in fused} == set(check.CASES) | {"gdso_rewards"}
    assert {r.dtype for r in fused} == {"fp32", "bf16", "fp16"}
    assert all(r.backend == "triton" for r in fused)
    bad_ids = [r for r in rows if "bad ids" in r.op]
    assert len(bad_ids) == 12 and all(r.note == "ValueError before any launch" for r in bad_ids)


def test_a_wrong_kernel_fails_its_row(monkeypatch):
    """The check must be able to fail: a kernel 1 % off gives FAIL rows and exit status 1."""
    module = importlib.import_module("zr_kernels.group_advantages")  # the package attribute is the function
    launcher = module.group_advantages_fwd
    monkeypatch.setattr(module, "group_advantages_fwd", lambda *args: launcher(*args) * 1.01)
    rows = check.run(ops=("group_advantages",), dtypes=("fp32",), quick=True, out=lambda line: None)
    fused = [r for r in rows if r.op.startswith("group_advantages ")]
    assert len(fused) == 3 and not any(r.ok for r in fused)
    assert check.main(["--quick", "--ops", "group_advantages", "--dtypes", "fp32"]) == 1


def test_a_fallback_to_the_reference_is_a_failure(monkeypatch):
    module = importlib.import_module("zr_kernels.pairwise_gap")
    monkeypatch.setattr(module, "resolve_backend", lambda *args, **kwargs: "reference")
    rows = check.run(ops=("pairwise_gap",), dtypes=("fp32",), quick=True, out=lambda line: None)
    gap = [r for r in rows if r.op == "pairwise_gap"]
    assert gap and not gap[0].ok and "fell back" in gap[0].note


def test_three_way_rule():
    precise = torch.tensor([1.0, 2.0, float("inf")], dtype=torch.float64)
    eager = torch.tensor([1.001, 2.0, float("inf")])
    assert check.three_way(torch.tensor([1.002, 2.0, float("inf")]), eager, precise, 1e-6).ok
    assert not check.three_way(torch.tensor([1.003, 2.0, float("inf")]), eager, precise, 1e-6).ok
    assert not check.three_way(torch.tensor([1.0, 2.0, 3.0]), eager, precise, 1e-6).ok  # inf lost


def test_command_line_header_rows_and_exit_status():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "zr_kernels.check", "--quick", "--ops", "pairwise_gap",
                           "--dtypes", "bf16"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"torch {torch.__version__}" in done.stdout and "CUDA extension built:" in done.stdout
    assert "interpreter" in done.stdout and "cases passed" in done.stdout
    assert any(line.startswith("pairwise_gap ") and line.rstrip().endswith("pass")
               for line in done.stdout.splitlines())
