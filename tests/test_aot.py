"""zr_kernels.aot: the ahead-of-time compile for sm_80/sm_90 runs without a GPU and fails when it should.

Each test runs the tool in a subprocess without TRITON_INTERPRET (the interpreter's kernels have no compiler).
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def _table_rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| _")]


def test_compiles_every_kernel_of_an_op_for_both_archs():
    done = _run("import sys, zr_kernels.aot as aot; "
                "sys.exit(aot.main(['--arch', '80,90', '--ops', 'group_advantages', '--quick']))")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _table_rows(done.stdout)
    assert {(r[0], r[1]) for r in rows} == {(k, a) for k in ("_batch_moments_kernel", "_group_advantages_kernel")
                                            for a in ("sm_80", "sm_90")}
    assert all(r[-1] == "ok" and int(r[4]) > 0 and int(r[6]) >= 0 for r in rows)  # registers, shared memory read
    assert done.stdout.strip().splitlines()[-1] == f"{len(rows)} compiled, 0 failed"


def test_shared_memory_over_the_limit_fails_the_run():
    done = _run("import sys, zr_kernels.aot as aot; aot.SHARED_MEMORY_LIMIT[90] = 8; "
                "sys.exit(aot.main(['--arch', '90', '--ops', 'group_advantages', '--quick']))")
    assert done.returncode == 1
    assert "FAILED: shared memory" in done.stdout and done.stdout.strip().endswith("failed")
    assert " 0 failed" not in done.stdout


def test_a_kernel_no_case_launches_fails_the_run():
    # Drop the "batch" scale: _batch_moments_kernel is then never launched, which must not pass silently.
    code = ("import sys, zr_kernels.aot as aot; full = aot.CASES['group_advantages']; "
            "aot.CASES['group_advantages'] = lambda dtype, quick: ((n, r) for n, r in full(dtype, quick) "
            "if 'batch' not in n); "
            "sys.exit(aot.main(['--arch', '90', '--ops', 'group_advantages', '--quick']))")
    done = _run(code)
    assert done.returncode == 1
    assert "_batch_moments_kernel" in done.stdout and "never launched" in done.stdout


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "zr_kernels.aot", "--quick"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr
