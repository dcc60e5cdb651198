"""Check this install's fused ops against their PyTorch twins, on this machine's GPU::

    python -m zr_kernels.check            # every op, fp32 / bf16 / fp16, forward + backward, small and real sizes
    python -m zr_kernels.check --quick    # about a minute: fewer shapes, real sizes in bf16 only

Every case runs the fused op (the backend ``auto`` picks, and each fused backend the op has), the op's twin in
``zr_kernels.reference`` on the same inputs (``eager``) and the twin on float64 copies (``precise``), with the same
random upstream gradients, and applies the three-way rule to every output and input gradient::

    |fused - precise| <= 2 * |eager - precise| + atol      (plus one rounding step for 16-bit outputs)

i.e. the kernel may be as far from the exact result as eager PyTorch in that dtype, twice over, and no more.
Inputs are strided views (``logits[:, -1, :]``), shapes are odd, and on a GPU one case per op has the sizes of a
real model (V = 248,320 score-token vocabulary, N = 8192 rows, D = 4096). Bad score ids are checked too: on the
host they must raise ``ValueError``, as CUDA tensors they must give NaN (never a read or write out of bounds).

One row per case: op, dtype, shape, the output with the least margin, its max error and bound, the backend that
ran, pass. Exit status 1 if any case fails. Without a GPU it re-runs itself with ``TRITON_INTERPRET=1``, so the
Triton kernels run in the interpreter on small shapes (the header says which path ran).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from zr_kernels._backend import cuda_extension_available, interpreter_enabled

# Absolute slack per input dtype for the three-way rule (values are fp32 statistics of O(1) size).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-10}
GRAD_ATOL_FACTOR = 10  # gradients are sums of products of outputs: allow them ten times the outputs' slack
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REAL_VOCAB, REAL_ROWS, REAL_DIM = 248_320, 8192, 4096


class Comparison(NamedTuple):
    """The three-way rule on one tensor: the largest error; the error and the bound of the element closest to (or
    furthest past) its bound; and whether every element is within its bound (non-finite entries must match the
    precise result exactly)."""

    max_error: float
    error: float
    bound: float
    ok: bool
    problem: str = ""

    @property
    def margin(self) -> float:
        return self.bound - self.error if self.ok or not self.problem else -float("inf")


def three_way(fused: torch.Tensor, eager: torch.Tensor, precise: torch.Tensor, atol: float) -> Comparison:
    """``|fused - precise| <= 2 * |eager - precise| + atol`` elementwise, plus one rounding step of the output's
    dtype for bf16 / fp16 outputs (eager and a kernel can round a near-tie to neighbouring values)."""
    nan = float("nan")
    if fused.shape != precise.shape:
        return Comparison(nan, nan, nan, False, f"shape {tuple(fused.shape)} != {tuple(precise.shape)}")
    rounding = torch.finfo(fused.dtype).eps if fused.dtype in (torch.bfloat16, torch.float16) else 0.0
    k, e, r = (x.detach().double() for x in (fused, eager, precise))
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(k), finite):
        return Comparison(nan, nan, nan, False, "non-finite entries differ from the reference")
    if not torch.equal(k[~finite].nan_to_num(), r[~finite].nan_to_num()):
        return Comparison(nan, nan, nan, False, "inf/nan values differ from the reference")
    err = (k - r).abs()[finite]
    bound = (2 * (e - r).abs() + atol + rounding * r.abs())[finite]
    if err.numel() == 0:
        return Comparison(0.0, 0.0, atol, True)
    worst = (err - bound).argmax()
    return Comparison(err.max().item(), err[worst].item(), bound[worst].item(), bool((err <= bound).all()))


@dataclass
class Row:
    op: str
    dtype: str
    shape: str
    output: str = ""
    max_error: float = float("nan")
    error: float = float("nan")
    bound: float = float("nan")
    backend: str = ""
    ok: bool = False
    note: str = ""


# ---- running one case: fused op, eager twin, precise twin ----

def _upcast(x):
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _run(fn, args: list, grad_positions: tuple[int, ...], upstream: list | None):
    """Outputs (tensors, None dropped) of ``fn(*args)`` plus the gradients of ``sum(output * upstream)`` with
    respect to ``args[i]`` for ``i in grad_positions``; returns ``(tensors, names, upstream used)``."""
    args = [a.detach().clone().requires_grad_() if i in grad_positions else a for i, a in enumerate(args)]
    out = fn(*args)
    fields = out._fields if hasattr(out, "_fields") else None
    outs = list(out) if isinstance(out, tuple) else [out]
    names = list(fields) if fields else [f"out{i}" for i in range(len(outs))] if len(outs) > 1 else ["out"]
    kept = [(n, o) for n, o in zip(names, outs) if o is not None]
    if upstream is None:
        upstream = [torch.randn(o.shape, device=o.device, dtype=torch.float64) for _, o in kept]
    tensors, labels = [o for _, o in kept], [n for n, _ in kept]
    differentiable = [(o, u) for (_, o), u in zip(kept, upstream) if o.requires_grad]
    if grad_positions and differentiable:
        loss = sum((o.double() * u).sum() for o, u in differentiable)
        grads = torch.autograd.grad(loss, [args[i] for i in grad_positions], allow_unused=True)
        tensors += [g if g is not None else torch.zeros_like(args[i]) for g, i in zip(grads, grad_positions)]
        labels += [f"grad_{i}" for i in grad_positions]
    return tensors, labels, upstream


def compare_op(op: str, dtype: torch.dtype, shape: str, fused: Callable, reference: Callable, args: list,
               grad_positions: tuple[int, ...] = (), arg_names: tuple[str, ...] = ()) -> Row:
    """One row: ``fused(*args)`` against ``reference`` on the same inputs and on float64 copies."""
    from zr_kernels import trace_backends

    name = DTYPES_BY_TYPE[dtype]
    with trace_backends() as ran:
        fused_out, labels, upstream = _run(fused, args, grad_positions, None)
    eager_out, _, _ = _run(reference, args, grad_positions, upstream)
    precise_out, _, _ = _run(reference, [_upcast(a) for a in args], grad_positions, upstream)
    backends = sorted({backend for _, backend in ran})
    row = Row(op, name, shape, backend="+".join(backends) or "none")
    worst_margin = None
    for label, f, e, p in zip(labels, fused_out, eager_out, precise_out):
        if label.startswith("grad_"):
            label = "grad_" + arg_names[int(label[5:])] if arg_names else label
        atol = ATOL[dtype] * (GRAD_ATOL_FACTOR if label.startswith("grad_") else 1)
        result = three_way(f, e, p, atol)
        if worst_margin is None or result.margin < worst_margin:
            worst_margin = result.margin
            row.output, row.note = label, result.problem
            row.max_error, row.error, row.bound = result.max_error, result.error, result.bound
    row.ok = worst_margin is not None and worst_margin >= 0 and "reference" not in backends
    if "reference" in backends:
        row.note = "the fused op fell back to the reference"
    return row


DTYPES_BY_TYPE = {v: k for k, v in DTYPES.items()}


# ---- the cases ----

class Case(NamedTuple):
    """One case: its row label, and a function that builds the inputs and returns the row (inputs are built only
    when the case runs, so a real-size case that does not fit in GPU memory is skipped alone)."""

    op: str
    shape: str
    run: Callable[[], Row]


def _strided(rows: int, cols: int, dtype, device, scale: float = 3.0) -> torch.Tensor:
    """``[rows, cols]`` as the last position of ``[rows, 2, cols]``: a non-contiguous view like ``logits[:, -1]``."""
    return (torch.randn(rows, 2, cols, device=device, dtype=dtype) * scale)[:, -1, :]


def _score_distribution_cases(dtype, device, sizes):
    from zr_kernels import reference, score_distribution

    def case(rows, vocab, bins):
        logits = _strided(rows, vocab, dtype, device)
        ids = torch.randperm(vocab, device=device)[:bins]
        values = torch.linspace(1.0, 5.0, bins, device=device)
        target = torch.randint(0, bins, (rows,), device=device)
        return compare_op(
            "score_distribution", dtype, f"N={rows} V={vocab} K={bins}",
            lambda x, t: score_distribution(x, ids, values, t, 0.7, backend="triton"),
            lambda x, t: reference.score_distribution(x, ids, values, t, 0.7), [logits, target], (0,), ("logits",))

    for size in sizes["logits"]:
        yield Case("score_distribution", _shape("N V K", size), lambda size=size: case(*size))


def _slice_kl_cases(dtype, device, sizes):
    from zr_kernels import reference, slice_kl

    def case(rows, vocab, bins, normalize, beta):
        logits = _strided(rows, vocab, dtype, device)
        ids = torch.randperm(vocab, device=device)[:bins]
        teacher = torch.softmax(torch.randn(rows, bins, device=device) * 2, -1)
        teacher[::3, 0] = 0.0  # zeros in the teacher: 0 log 0 = 0
        teacher = teacher / teacher.sum(-1, keepdim=True)
        return compare_op(
            f"slice_kl {normalize} beta={beta}", dtype, f"N={rows} V={vocab} K={bins}",
            lambda x: slice_kl(x, teacher, ids, normalize, beta, 0.9, "none", backend="triton"),
            lambda x: reference.slice_kl(x, teacher, ids, normalize, beta, 0.9, "none"), [logits], (0,),
            ("logits",))

    for size, mode in _product(sizes["logits"], sizes["slice_kl_modes"]):
        yield Case(f"slice_kl {mode[0]} beta={mode[1]}", _shape("N V K", size),
                   lambda size=size, mode=mode: case(*size, *mode))


def _pairwise_gap_cases(dtype, device, sizes):
    from zr_kernels import gdso_rewards, pairwise_gap, reference

    def inputs(pairs, group):
        mu_w = (1 + 4 * torch.rand(pairs, 2 * group, device=device)).to(dtype)[:, ::2]  # strided [P, G]
        mu_l = (1 + 4 * torch.rand(pairs, group, device=device)).to(dtype)
        return mu_w, mu_l, 3 + 2 * torch.rand(pairs, device=device), 1 + 2 * torch.rand(pairs, device=device)

    def gap_case(pairs, group):
        mu_w, mu_l, s_w, s_l = inputs(pairs, group)
        return compare_op(
            "pairwise_gap", dtype, f"P={pairs} G={group}",
            lambda a, b: pairwise_gap(a, b, s_w - s_l, 4.0, backend="triton"),
            lambda a, b: reference.pairwise_gap(a, b, s_w - s_l, 4.0), [mu_w, mu_l], (0, 1), ("mu_w", "mu_l"))

    def rewards_case(pairs, group):
        mu_w, mu_l, s_w, s_l = inputs(pairs, group)
        return compare_op(
            "gdso_rewards", dtype, f"P={pairs} G={group}",
            lambda a, b: gdso_rewards(a, b, s_w, s_l, 1.0, 5.0, 0.5, 0.5, backend="triton"),
            lambda a, b: reference.gdso_rewards(a, b, s_w, s_l, 1.0, 5.0, 0.5, 0.5), [mu_w, mu_l])

    for size in sizes["pairs"]:
        yield Case("pairwise_gap", _shape("P G", size), lambda size=size: gap_case(*size))
        yield Case("gdso_rewards", _shape("P G", size), lambda size=size: rewards_case(*size))


def _group_advantages_cases(dtype, device, sizes):
    from zr_kernels import group_advantages, reference

    def case(n, group, scale):
        rewards = torch.rand(2 * n, device=device).to(dtype)[::2]  # strided
        return compare_op(
            f"group_advantages {scale}", dtype, f"N={n} G={group}",
            lambda r: group_advantages(r, group, scale, backend="triton"),
            lambda r: reference.group_advantages(r, group, scale), [rewards])

    for size, scale in _product(sizes["rewards"], ("group", "batch", "none")):
        yield Case(f"group_advantages {scale}", _shape("N G", size),
                   lambda size=size, scale=scale: case(*size, scale))


def _linear_score_cases(dtype, device, sizes):
    from zr_kernels import linear_score, reference

    def case(rows, dim, vocab, bins, backend):
        hidden = _strided(rows, dim, dtype, device, scale=dim ** -0.5)  # unit-scale logits, as a trained head gives
        weight = torch.randn(vocab, dim, device=device, dtype=dtype)
        bias = torch.randn(vocab, device=device, dtype=dtype)
        ids = torch.randperm(vocab, device=device)[:bins].tolist()
        values = torch.linspace(1.0, 5.0, bins, device=device)
        return compare_op(
            f"linear_score {backend}", dtype, f"N={rows} D={dim} V={vocab} K={bins}",
            lambda h, w, b: linear_score(h, w, values, ids, b, 0.8, backend=backend),
            lambda h, w, b: reference.linear_score(h, w, values, ids, b, 0.8), [hidden, weight, bias], (0, 1, 2),
            ("hidden", "weight", "bias"))

    for size, backend in _product(sizes["hidden"], _linear_score_backends(device)):
        yield Case(f"linear_score {backend}", _shape("N D V K", size),
                   lambda size=size, backend=backend: case(*size, backend))


def _linear_score_backends(device: torch.device) -> list[str]:
    return ["triton"] + (["cuda"] if device.type == "cuda" and cuda_extension_available() else [])


def _shape(names: str, size) -> str:
    return " ".join(f"{n}={v}" for n, v in zip(names.split(), size))


def _product(a, b):
    return [(x, y) for x in a for y in b]


def _bad_id_rows(device) -> list[Row]:
    """Bad score ids: on the host a ValueError before any launch; as CUDA tensors NaN, nothing out of bounds."""
    from zr_kernels import linear_score, score_distribution, slice_kl, trace_backends

    rows = []
    logits = torch.randn(6, 50, device=device)
    teacher = torch.full((6, 3), 1 / 3, device=device)
    hidden, weight = torch.randn(6, 16, device=device), torch.randn(50, 16, device=device)
    triton = "triton" if device.type == "cuda" else "reference"  # host ids must fail before any backend runs
    calls = {
        "score_distribution": lambda ids: score_distribution(logits, ids, [1.0, 2.0, 3.0], backend=triton).mean,
        "slice_kl slice": lambda ids: slice_kl(logits, teacher, ids, reduction="none", backend=triton),
        "slice_kl vocab": lambda ids: slice_kl(logits, teacher, ids, "vocab", reduction="none", backend=triton),
    }
    for backend in _linear_score_backends(device):
        calls[f"linear_score {backend}"] = lambda ids, backend=backend: linear_score(
            hidden, weight, [1.0, 2.0, 3.0], ids, backend=backend if device.type == "cuda" else "reference").mean
    for (op, call), (what, ids) in _product(calls.items(), [("id = V", [2, 5, 50]), ("id = -1", [2, -1, 5]),
                                                              ("repeated id", [7, 3, 7])]):
        row = Row(f"{op} bad ids", "fp32", f"ids {ids} ({what})", output="host ids")
        try:
            call(ids)
        except ValueError:
            row.ok, row.backend, row.note = True, "none", "ValueError before any launch"
        else:
            row.note = "no ValueError for bad host ids"
        rows.append(row)
        if device.type != "cuda":
            continue
        row = Row(f"{op} bad ids", "fp32", f"ids {ids} ({what})", output="CUDA ids")
        with trace_backends() as ran:
            out = call(torch.tensor(ids, device=device))
            torch.cuda.synchronize()  # a kernel fault surfaces here
        row.backend = "+".join(sorted({b for _, b in ran}))
        row.ok = bool(out.isnan().all())
        row.note = "" if row.ok else "expected NaN for every row"
        rows.append(row)
    return rows


CASES = {
    "score_distribution": _score_distribution_cases,
    "slice_kl": _slice_kl_cases,
    "pairwise_gap": _pairwise_gap_cases,
    "group_advantages": _group_advantages_cases,
    "linear_score": _linear_score_cases,
}


def case_sizes(device: torch.device, quick: bool, real: bool) -> dict:
    """The shapes of each op's cases: odd and small everywhere, plus the real model sizes when ``real``."""
    sizes = {
        "logits": [(111, 300, 9)] if quick else [(1, 32, 2), (7, 111, 9), (111, 300, 9), (507, 100, 17)],
        "slice_kl_modes": [("slice", 0.0), ("vocab", 0.0)] if quick else [
            ("slice", 0.0), ("slice", 1.0), ("slice", 0.5), ("vocab", 0.0)],
        "pairs": [(37, 5)] if quick else [(1, 1), (37, 5), (111, 16)],
        "rewards": [(96, 8)] if quick else [(16, 1), (96, 8), (507, 3)],
        "hidden": [(37, 96, 300, 9)] if quick else [(1, 16, 32, 2), (37, 96, 300, 9), (129, 200, 111, 32)],
    }
    if real:
        sizes["logits"].append((REAL_ROWS, REAL_VOCAB, 9))
        sizes["pairs"].append((REAL_ROWS // 16, 16))
        sizes["rewards"].append((REAL_ROWS * 16, 16))
        sizes["hidden"].append((REAL_ROWS, REAL_DIM, REAL_VOCAB, 9))
    return sizes


def run(ops=tuple(CASES), dtypes=tuple(DTYPES), quick: bool = False, device: str | None = None,
        out=print) -> list[Row]:
    """Run the cases, print a header and one row per case; returns the rows."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for line in header(device):
        out(line)
    out("")
    out("error / bound: the element closest to its bound (of the output or gradient with the least margin)")
    out(f"{'op':34s} {'dtype':5s} {'shape':30s} {'output':12s} {'max error':>10s} {'error':>10s} {'bound':>10s} "
        f"{'backend':14s} result")
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        real = device.type == "cuda" and (not quick or dtype == torch.bfloat16)
        sizes = case_sizes(device, quick, real)
        for op in ops:
            torch.manual_seed(0)
            for case in CASES[op](dtype, device, sizes):
                rows.append(_guarded(case, dtype))
                out(format_row(rows[-1]))
    for row in _bad_id_rows(device):
        rows.append(row)
        out(format_row(row))
    failed = [r for r in rows if not r.ok]
    out("")
    out(f"{len(rows) - len(failed)} of {len(rows)} cases passed" + (f"; FAILED: {len(failed)}" if failed else ""))
    return rows


def _guarded(case: Case, dtype: torch.dtype) -> Row:
    try:
        return case.run()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Row(case.op, DTYPES_BY_TYPE[dtype], case.shape, ok=True, note="skipped: out of GPU memory")
    except Exception as error:  # noqa: BLE001 - a crashing case is a failed row, and the other cases still run
        return Row(case.op, DTYPES_BY_TYPE[dtype], case.shape, note=f"{type(error).__name__}: {error}")


def format_row(row: Row) -> str:
    result = "pass" if row.ok else "FAIL"
    note = f"  ({row.note})" if row.note else ""
    return (f"{row.op:34s} {row.dtype:5s} {row.shape:30s} {row.output:12s} {row.max_error:10.3g} "
            f"{row.error:10.3g} {row.bound:10.3g} {row.backend:14s} {result}{note}")


def header(device: torch.device) -> list[str]:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        where = f"{name} (sm {capability}), CUDA {torch.version.cuda}"
        path = "Triton kernels compiled for this GPU" + (" and the CUDA extension" if cuda_extension_available() else "")
    else:
        where = f"CPU ({platform.machine()}), no CUDA device"
        path = "Triton kernels in the interpreter (TRITON_INTERPRET=1), small shapes only"
    return [f"zr_kernels.check: {where}",
            f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
            f"CUDA extension built: {'yes' if cuda_extension_available() else 'no'}; path checked: {path}"
            + ("" if device.type == "cuda" or interpreter_enabled() else " [interpreter NOT enabled]")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zr_kernels.check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and modes, real sizes in bf16 only")
    parser.add_argument("--ops", nargs="+", choices=tuple(CASES), default=tuple(CASES))
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=tuple(DTYPES))
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    args = parser.parse_args(argv)
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not on_gpu and not interpreter_enabled():
        # Triton reads TRITON_INTERPRET when it is imported, which importing zr_kernels already did.
        print("zr_kernels.check: no CUDA device; re-running with TRITON_INTERPRET=1 (the Triton interpreter)",
              flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "zr_kernels.check", *(argv or sys.argv[1:])],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    # The interpreter evaluates masked-out lanes too (exp/log of -inf); the kernels mask them on store.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    started = time.perf_counter()
    rows = run(args.ops, args.dtypes, args.quick, args.device)
    print(f"{time.perf_counter() - started:.1f} s")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
