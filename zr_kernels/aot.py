"""Ahead-of-time compile of every Triton kernel variant the launchers produce, for GPUs this machine need not have.

    python -m zr_kernels.aot --arch 80,90            # every variant, one table row each
    python -m zr_kernels.aot --arch 80,90 --quick    # one dtype, the widest flag sets: a CI-sized subset

The launchers run on ``meta`` tensors of the benchmarks' shapes (V = 248,320, N = 8192, K = 9, G = 16, D = 4096)
and of the edge sizes the argument checks allow (K = ``MAX_BINS``, the linear score head's ``MAX_SCORE_ROWS``,
G = ``MAX_GROUP_SIZE``), with every kernel replaced by a recorder. Each recorded launch is then specialised
by Triton's own binder (the signature, constexprs and alignment attributes a real launch would get) and
compiled to cubin with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, using the ptxas bundled in the
triton wheel: no GPU, no CUDA toolkit. A row per variant gives registers, spills and shared memory from
ptxas and Triton; the run fails (exit 1) on a compile error, on shared memory above the architecture's
per-block limit, on more registers than a block may hold, or on a kernel of a launcher module that no case
launched. Spills are reported, not failed.

Needs ``TRITON_INTERPRET`` unset: under the interpreter ``triton.jit`` returns functions with no compiler.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

# Largest dynamic shared memory one block may opt into, and registers per SM (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability").
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_BLOCK = 65536

VOCAB, ROWS, BINS, GROUP, DIM = 248_320, 8192, 9, 16, 4096
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
META = torch.device("meta")


@dataclass
class Launch:
    """One recorded kernel launch: the Triton function and the arguments the launcher passed it."""

    case: str
    dtype: str
    kernel: object
    args: tuple
    kwargs: dict


@dataclass
class Row:
    kernel: str
    arch: int
    dtype: str
    constexprs: str
    case: str
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    num_warps: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _launcher_modules() -> dict:
    """The launcher module of each op (its kernels are the ones ``CASES[op]`` must launch)."""
    from zr_kernels.kernels import group_advantages, linear_score, pairwise_gap, score_distribution, slice_kl

    return {"score_distribution": score_distribution, "slice_kl": slice_kl, "pairwise_gap": pairwise_gap,
            "group_advantages": group_advantages, "linear_score": linear_score}


def _kernels_of(module) -> dict[str, object]:
    from triton.runtime.jit import JITFunction

    return {name: fn for name, fn in vars(module).items() if isinstance(fn, JITFunction) and name.endswith("_kernel")}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, kernel, sink: list, label: tuple[str, str]):
        self.kernel, self.sink, self.label = kernel, sink, label

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append(Launch(*self.label, self.kernel, args, kwargs))
        return record


def capture(case: str, dtype: str, run: Callable[[], object]) -> list[Launch]:
    """The launches ``run()`` makes, in order, with every launcher module's kernels swapped for recorders."""
    launches: list[Launch] = []
    patched = [(module, name, fn) for module in _launcher_modules().values()
               for name, fn in _kernels_of(module).items()]
    try:
        for module, name, fn in patched:
            setattr(module, name, _Recorder(fn, launches, (case, dtype)))
        run()
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)
    return launches


# ---- the cases: each calls launchers exactly as the ops do, on meta tensors ----

def _empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=META, dtype=dtype)


def _ids(k: int) -> torch.Tensor:
    return torch.empty(k, device=META, dtype=torch.int64)


def _repeats_flag() -> torch.Tensor:
    """The repeated-ids flag the ops pass with ids checked on the device."""
    return torch.empty(1, device=META, dtype=torch.int32)


def _grad_subsets(names: tuple[str, ...], quick: bool) -> list[tuple[str, ...]]:
    """Which outputs have an upstream gradient: every non-empty subset (each is its own kernel variant)."""
    if quick:
        return [names]
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def _score_distribution_cases(dtype, quick):
    from zr_kernels._validation import MAX_BINS
    from zr_kernels.kernels.score_distribution import score_distribution_bwd, score_distribution_fwd

    for k, with_target in itertools.product((BINS, MAX_BINS), (False, True)):
        logits, ids, values = _empty(ROWS, VOCAB, dtype=dtype), _ids(k), _empty(k)
        target = _ids(ROWS) if with_target else None
        yield f"score_distribution K={k} target={with_target}", lambda: score_distribution_fwd(
            logits, ids, values, target, 1.0)
        yield f"score_distribution K={k} target={with_target} device ids", lambda: score_distribution_fwd(
            logits, ids, values, target, 1.0, _repeats_flag())
        outputs = ("probs", "mean", "std") + (("nll",) if with_target else ())
        for wanted in _grad_subsets(outputs, quick):
            grads = {name: (_empty(ROWS, k) if name == "probs" else _empty(ROWS)) if name in wanted else None
                     for name in ("probs", "mean", "std", "nll")}
            stats = (_empty(ROWS, k), _empty(ROWS), _empty(ROWS))
            yield (f"score_distribution.backward K={k} grads={'+'.join(wanted)}",
                   lambda grads=grads, stats=stats: score_distribution_bwd(
                       *grads.values(), *stats, target, ids, values, 1.0, VOCAB, dtype))


def _slice_kl_cases(dtype, quick):
    from zr_kernels._validation import MAX_BINS
    from zr_kernels.kernels.slice_kl import slice_kl_bwd, slice_kl_fwd

    settings = [("slice", 0.0), ("slice", 1.0), ("slice", 0.5), ("vocab", 0.0)]
    for k, (normalize, beta) in itertools.product((BINS, MAX_BINS), settings):
        logits, teacher, ids = _empty(ROWS, VOCAB, dtype=dtype), _empty(ROWS, k), _ids(k)
        vocab = normalize == "vocab"
        name = f"slice_kl K={k} {normalize} beta={beta}"
        yield name, lambda: slice_kl_fwd(logits, teacher, ids, vocab, beta, 1.0)
        yield name + " device ids", lambda: slice_kl_fwd(logits, teacher, ids, vocab, beta, 1.0, _repeats_flag())
        yield name + " backward", lambda: slice_kl_bwd(_empty(ROWS), logits, teacher, ids, _empty(ROWS), vocab, beta,
                                                       1.0)


def _pairwise_gap_cases(dtype, quick):
    from zr_kernels.kernels.pairwise_gap import MAX_GROUP_SIZE, gdso_rewards_fwd, pairwise_gap_bwd, pairwise_gap_fwd

    for group in (1, GROUP, MAX_GROUP_SIZE):
        pairs = max(1, ROWS // group)
        mu_w, mu_l, per_pair = _empty(pairs, group, dtype=dtype), _empty(pairs, group, dtype=dtype), _empty(pairs)
        yield f"pairwise_gap G={group}", lambda: pairwise_gap_fwd(mu_w, mu_l, per_pair, 4.0)
        yield f"pairwise_gap.backward G={group}", lambda: pairwise_gap_bwd(per_pair, mu_w, mu_l, per_pair, 4.0)
        yield f"gdso_rewards G={group}", lambda: gdso_rewards_fwd(mu_w, mu_l, per_pair, per_pair, 4.0, 1.0, 1.0)


def _group_advantages_cases(dtype, quick):
    from zr_kernels.kernels.group_advantages import SCALES, group_advantages_fwd

    for (n, group), scale in itertools.product(((ROWS, GROUP), (1 << 22, 4096)), SCALES):
        rewards = _empty(n, dtype=dtype)
        yield f"group_advantages N={n} G={group} {scale}", lambda: group_advantages_fwd(rewards, group, scale, True,
                                                                                        1e-6)


def _linear_score_cases(dtype, quick):
    from zr_kernels.kernels import linear_score as launchers
    from zr_kernels.linear_score import MAX_SCORE_ROWS

    for k, lm_head, with_bias in itertools.product((BINS, MAX_SCORE_ROWS), (False, True), (False, True)):
        rows = VOCAB if lm_head else k
        hidden, weight = _empty(ROWS, DIM, dtype=dtype), _empty(rows, DIM, dtype=dtype)
        ids = _ids(k) if lm_head else None
        bias = _empty(rows, dtype=dtype) if with_bias else None
        name = f"linear_score K={k} lm_head={lm_head} bias={with_bias}"
        for target in (None, _ids(ROWS)):
            yield f"{name} target={target is not None}", lambda target=target: launchers.linear_score_fwd(
                hidden, weight, ids, bias, _empty(k), target, 1.0)
        grad_logits = _empty(ROWS, k)
        yield name + " grad_hidden", lambda: launchers.linear_score_grad_hidden(grad_logits, weight, ids, DIM)
        yield name + " grad_weight", lambda: launchers.linear_score_grad_weight(grad_logits, hidden, ids, rows,
                                                                                with_bias)
    for k, with_target in itertools.product((BINS, MAX_SCORE_ROWS), (False, True)):
        stats, target = (_empty(ROWS, k), _empty(ROWS), _empty(ROWS)), _ids(ROWS) if with_target else None
        outputs = ("probs", "mean", "std") + (("nll",) if with_target else ())
        for wanted in _grad_subsets(outputs, quick):
            grads = [(_empty(ROWS, k) if name == "probs" else _empty(ROWS)) if name in wanted else None
                     for name in ("probs", "mean", "std", "nll")]
            yield (f"linear_score.backward K={k} grads={'+'.join(wanted)}",
                   lambda grads=grads, stats=stats, target=target: launchers.linear_score_grad_logits(
                       *grads, *stats, target, _empty(k), 1.0))


CASES = {
    "score_distribution": _score_distribution_cases,
    "slice_kl": _slice_kl_cases,
    "pairwise_gap": _pairwise_gap_cases,
    "group_advantages": _group_advantages_cases,
    "linear_score": _linear_score_cases,
}


def launches(ops, dtypes, quick: bool) -> Iterator[Launch]:
    for op, dtype_name in itertools.product(ops, dtypes):
        for case, run in CASES[op](DTYPES[dtype_name], quick):
            yield from capture(case, dtype_name, run)


# ---- compiling one launch ----

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def specialise(launch: Launch, backend):
    """Triton's own specialisation of the recorded arguments: ``(options, signature, constexprs, attrs)``."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    return kernel._pack_args(backend, launch.kwargs, bound, specialization, options)


def compile_launch(launch: Launch, arch: int, specialised=None) -> Row:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = specialised or specialise(launch, make_backend(target))
    names = launch.kernel.arg_names
    shown = " ".join(f"{names[path[0]]}={value}" for path, value in sorted(constexprs.items())
                     if names[path[0]].isupper())
    row = Row(launch.kernel.__name__, arch, launch.dtype, shown, launch.case)
    log = io.StringIO()
    # Triton prints ptxas's -v report when asked to; always_compile makes it run even for a cached kernel.
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as error:  # noqa: BLE001 -- any compiler failure is a row's verdict, not a crash of the run
        row.problems.append(f"compile error: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
        return row
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    report = log.getvalue()
    registers, spills = _PTXAS_REGISTERS.search(report), _PTXAS_SPILLS.search(report)
    row.registers = int(registers.group(1)) if registers else None
    row.spill_bytes = int(spills.group(1)) + int(spills.group(2)) if spills else None
    row.shared_bytes, row.num_warps = compiled.metadata.shared, compiled.metadata.num_warps
    if row.shared_bytes > SHARED_MEMORY_LIMIT[arch]:
        row.problems.append(f"shared memory {row.shared_bytes} B > sm_{arch} limit {SHARED_MEMORY_LIMIT[arch]} B")
    if row.registers is not None and row.registers * 32 * row.num_warps > REGISTERS_PER_BLOCK:
        row.problems.append(f"{row.registers} registers x {32 * row.num_warps} threads > {REGISTERS_PER_BLOCK}")
    return row


def run(archs, ops, dtypes, quick: bool, out=sys.stdout) -> list[Row]:
    """Compile every distinct variant for every arch; print a table row as each finishes. Returns the rows."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    rows, seen, launched = [], set(), set()
    print(_HEADER, file=out, flush=True)
    for launch in launches(ops, dtypes, quick):
        launched.add(launch.kernel.__name__)
        for arch in archs:
            specialised = specialise(launch, make_backend(GPUTarget("cuda", arch, 32)))
            options, signature, constexprs, attrs = specialised
            key = (launch.kernel.__name__, arch, tuple(signature.items()), tuple(sorted(constexprs.items())),
                   repr(sorted(attrs.items())))
            if key in seen:  # the same binary from another case (e.g. a runtime size that differs)
                continue
            seen.add(key)
            row = compile_launch(launch, arch, specialised)
            rows.append(row)
            print(format_row(row), file=out, flush=True)
    modules = _launcher_modules()
    for name in sorted({name for op in ops for name in _kernels_of(modules[op])} - launched):
        row = Row(name, 0, "-", "-", "no case launches it")
        row.problems.append("kernel never launched by any case: add one to zr_kernels.aot")
        rows.append(row)
        print(format_row(row), file=out, flush=True)
    return rows


_HEADER = ("| kernel | arch | dtype | constexprs | registers | spills (B) | shared (B) | warps | case | status |\n"
           "|---|---|---|---|---|---|---|---|---|---|")


def format_row(row: Row) -> str:
    cells = (row.kernel, f"sm_{row.arch}" if row.arch else "-", row.dtype, row.constexprs, _cell(row.registers),
             _cell(row.spill_bytes), _cell(row.shared_bytes), _cell(row.num_warps), row.case,
             "ok" if row.ok else "FAILED: " + "; ".join(row.problems))
    return "| " + " | ".join(cells) + " |"


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _parse_archs(text: str) -> list[int]:
    archs = [int(a) for a in text.replace("sm_", "").split(",") if a.strip()]
    unknown = [a for a in archs if a not in SHARED_MEMORY_LIMIT]
    if not archs or unknown:
        raise argparse.ArgumentTypeError(f"--arch takes a comma list of {sorted(SHARED_MEMORY_LIMIT)}, got {text!r}")
    return archs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zr_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=_parse_archs, default=[80, 90], help="compute capabilities, e.g. 80,90")
    parser.add_argument("--ops", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: all; --quick: bf16)")
    parser.add_argument("--quick", action="store_true",
                        help="one dtype and only the all-gradients backward variants: a CI-sized subset")
    parser.add_argument("--output", help="also write the table (with the command and versions) to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    ops = [op for op in args.ops.split(",") if op]
    if not ops or any(op not in CASES for op in ops):
        parser.error(f"--ops takes a comma list of {', '.join(CASES)}, got {args.ops!r}")
    dtypes = (args.dtypes or ("bf16" if args.quick else ",".join(DTYPES))).split(",")
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes takes a comma list of {', '.join(DTYPES)}, got {args.dtypes!r}")

    import triton

    started = time.perf_counter()
    table = io.StringIO()
    rows = run(args.arch, ops, dtypes, args.quick, out=_Tee(sys.stdout, table))
    failed = sum(not row.ok for row in rows)
    spilling = sorted({f"{row.kernel} (sm_{row.arch}, {row.dtype})" for row in rows if row.spill_bytes})
    summary = (f"spilling variants: {', '.join(spilling) if spilling else 'none'}\n"
               f"{len(rows) - failed} compiled, {failed} failed")
    print(summary, flush=True)
    if args.output:
        command = "python -m zr_kernels.aot " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.output, "w") as f:
            f.write(f"# Ahead-of-time compile of the Triton kernels\n\n`{command}` with triton {triton.__version__}, "
                    f"torch {torch.__version__}, {time.perf_counter() - started:.0f} s on the CPU (no GPU).\n\n"
                    f"{table.getvalue()}\n{summary}\n")
    return 1 if failed else 0


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


if __name__ == "__main__":
    sys.exit(main())
