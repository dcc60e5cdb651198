"""``zr-bench`` / ``python -m benchmarks``: run the benchmarks, print a markdown table, write JSON + PNG.

    python -m benchmarks --out benchmarks/results          # GPU: every op, realistic shapes and sweeps
    python -m benchmarks --smoke --ops score_distribution  # CPU: tiny shapes, Triton in the interpreter
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import warnings
from pathlib import Path

import torch

OPS = ("score_distribution", "group_advantages", "pairwise_gap", "slice_kl", "linear_score", "student_scoring",
       "overhead")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zr-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), metavar="OP",
                        help=f"which benchmarks to run (default: all of {', '.join(OPS)})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and few repetitions (runs on CPU with Triton in the interpreter)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="directory for <device>.json, <device>.md and <device>-<op>.png (default: %(default)s)")
    return parser


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        _parser().error("no CUDA device: the full-size benchmarks need a GPU; use --smoke for the CPU smoke run")
    if not cuda:  # the Triton kernels run in the interpreter; must be set before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The interpreter evaluates masked-out lanes too (exp/log of -inf); the kernels mask them on store.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

    from benchmarks import harness, report

    config = harness.Config(device=torch.device("cuda" if cuda else "cpu"), smoke=args.smoke)
    copy_gbps = harness.copy_bandwidth_gbps(config)
    meta = report.run_meta(config, copy_gbps, shlex.join(["python", "-m", "benchmarks", *argv]))
    print(f"{meta['device_name']}: copy bandwidth {copy_gbps:.0f} GB/s", file=sys.stderr)
    records_by_op = {}
    for op in args.ops:
        module = importlib.import_module(f"benchmarks.bench_{op}")
        print(f"{op}:", file=sys.stderr)
        records_by_op[op] = harness.run_cases(module.cases(config), config, copy_gbps,
                                              log=lambda line: print(line, file=sys.stderr))
    paths = report.write(records_by_op, meta, args.out)
    print(report.markdown({"meta": meta, "ops": {op: {"meta": meta, "records": r} for op, r in records_by_op.items()}}))
    print(f"wrote {paths['json']}, {paths['md']}" + "".join(f", {p}" for p in paths["png"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
