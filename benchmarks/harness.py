"""Measurement shared by every ``bench_<op>.py``: cases, providers, timing, peak memory, bandwidth.

A bench module builds ``Case`` objects (one shape of one op) holding ``Provider`` objects (one
implementation each). ``measure_case`` runs every provider of a case side by side and returns one
record per provider; a provider that cannot run here carries a ``skip`` reason instead of a function,
and one that raises is recorded with its error, so no provider is ever silently dropped.

On CUDA the times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)
and memory is ``torch.cuda.max_memory_allocated`` reset before each provider. On CPU (the ``--smoke``
mode, Triton in the interpreter) the times are medians of a wall-clock timer and memory is not measured.
"""
from __future__ import annotations

import gc
import importlib.util
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import zr_kernels
from zr_kernels import cuda_extension_available, interpreter_enabled


@dataclass
class Config:
    """What every bench needs to know about the run."""

    device: torch.device
    smoke: bool
    cpu_reps: int = 3  # timed calls per phase on CPU (after one warm-up call)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Provider:
    """One implementation of a case: ``fn(**inputs)`` returns a tensor or a tuple of tensors."""

    name: str
    fn: Optional[Callable[..., Any]] = None
    skip: Optional[str] = None
    compiled: bool = False  # reset Dynamo before its first call (each case compiles afresh)
    forward_only: bool = False  # a reference point with no backward (a bare launch): timed on fwd alone


@dataclass
class Case:
    """One shape of one op, measured across its providers.

    ``make_inputs()`` builds fresh inputs on the device; ``grad`` names the inputs that receive gradients
    (empty: forward only). ``bytes_moved`` is the minimal HBM traffic of the measured phase (fwd+bwd when
    there is a backward, else fwd); when given, achieved GB/s and the fraction of copy bandwidth are reported.
    ``series``/``x`` place the case on the op's sweep plot; ``headline`` marks the case the goals refer to.
    ``items`` (e.g. images) turns the time into a throughput; ``speedup`` is against the ``baseline`` provider.
    ``wall_clock`` times back-to-back calls with a wall-clock timer instead of CUDA events, so the host's
    per-call work (Python, dispatch, launches) counts even where the GPU would idle: the host-overhead cases.
    """

    op: str
    label: str
    make_inputs: Callable[[], dict]
    providers: list
    grad: tuple = ()
    bytes_moved: Optional[int] = None
    series: str = ""
    x: Optional[int] = None
    x_name: str = "N (rows)"
    headline: bool = False
    items: Optional[int] = None
    baseline: str = "eager"
    params: dict = field(default_factory=dict)
    wall_clock: bool = False


# ---- provider constructors: each knows why it may not run here -------------------------------------------

def triton_provider(fn: Callable, config: Config, name: str = "triton") -> Provider:
    if not config.cuda and not interpreter_enabled():
        return Provider(name, skip="needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")
    return Provider(name, fn)


def cuda_ext_provider(fn: Callable, config: Config, name: str = "cuda") -> Provider:
    if not config.cuda:
        return Provider(name, skip="the CUDA extension needs a CUDA device")
    if not cuda_extension_available():
        return Provider(name, skip="zr_kernels CUDA extension not built (pip install -e . with nvcc)")
    return Provider(name, fn)


def eager_provider(fn: Callable) -> Provider:
    return Provider("eager", fn)


def compile_provider(fn: Callable, config: Config) -> Provider:
    if config.smoke and not config.cuda:
        return Provider("compile", skip="torch.compile not run in CPU smoke mode (compile time); runs on GPU")
    return Provider("compile", torch.compile(fn, dynamic=False), compiled=True)


def liger_provider(make_fn: Callable[[], Callable], config: Config) -> Provider:
    """``make_fn`` imports Liger and returns the provider function (Liger is imported only when it can run)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return Provider("liger", skip="liger-kernel not installed")
    if not config.cuda:
        return Provider("liger", skip="Liger's Triton kernels need CUDA (they fail in the Triton interpreter)")
    return Provider("liger", make_fn())


def no_liger(what: str) -> Provider:
    return Provider("liger", skip=f"no Liger equivalent ({what})")


# ---- timing -------------------------------------------------------------------------------------------------

def _sync(config: Config) -> None:
    if config.cuda:
        torch.cuda.synchronize(config.device)


WALL_CLOCK_CALLS = 300  # back-to-back calls per wall-clock measurement on CUDA


def time_ms(fn: Callable[[], Any], config: Config, wall_clock: bool = False) -> float:
    """Median milliseconds of ``fn()`` (on CUDA with ``wall_clock``: the mean over back-to-back calls)."""
    if config.cuda and wall_clock:
        fn()
        _sync(config)
        start = time.perf_counter()
        for _ in range(WALL_CLOCK_CALLS):
            fn()
        _sync(config)
        return (time.perf_counter() - start) * 1e3 / WALL_CLOCK_CALLS
    if config.cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    samples = []
    for _ in range(config.cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(config: Config) -> float:
    """Achieved GB/s of a device-to-device copy (bytes read + bytes written), the roofline for the ops."""
    numel = (1 << 28) if config.cuda else (1 << 22)  # 1 GiB fp32 on GPU, 16 MiB on CPU
    src = torch.empty(numel, dtype=torch.float32, device=config.device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), config)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _grad_outputs(out: Any) -> list:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def _measure_provider(case: Case, provider: Provider, config: Config) -> dict:
    torch.manual_seed(0)
    inputs = case.make_inputs()
    leaves = [] if provider.forward_only else [inputs[name] for name in case.grad]
    fn = provider.fn

    def forward():
        return fn(**inputs)

    def full():
        outs = _grad_outputs(forward())
        return torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    if provider.compiled:
        torch._dynamo.reset()
    phase = full if leaves else forward
    with zr_kernels.trace_backends() as ran:  # warm-up (compiles), and a record of which backends ran
        phase()
    _sync(config)

    peak_mib = None
    if config.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(config.device)
        base = torch.cuda.memory_allocated(config.device)
        phase()
        _sync(config)
        peak_mib = (torch.cuda.max_memory_allocated(config.device) - base) / 2**20

    wall = case.wall_clock
    record = {"fwd_ms": time_ms(forward, config, wall), "bwd_ms": None, "full_ms": None, "peak_mib": peak_mib,
              "ran": sorted({f"{op}:{backend}" for op, backend in ran}), "forward_only": provider.forward_only}
    if leaves:
        record["full_ms"] = time_ms(full, config, wall)
        record["bwd_ms"] = _backward_ms(forward, leaves, provider, config, wall)
    return record


def _backward_ms(forward: Callable[[], Any], leaves: list, provider: Provider, config: Config, wall: bool) -> float:
    """Time of the backward alone: one forward, then its graph run backward again and again (``retain_graph``).

    A ``torch.compile`` backward donates the buffers its forward saved (it may reuse their memory for its own
    results), so it refuses ``retain_graph=True``. Donation changes where the backward writes, not which kernels
    it runs, so for this timing alone the compiled provider is compiled again with donation off; its forward,
    fwd+bwd and peak memory (measured before this) are those of the default compile a user gets.
    """
    if not provider.compiled:
        return _time_retained_backward(forward, leaves, config, wall)
    with torch._functorch.config.patch(donated_buffer=False):
        torch._dynamo.reset()  # the graph cached so far was compiled with donation on
        return _time_retained_backward(forward, leaves, config, wall)


def _time_retained_backward(forward: Callable[[], Any], leaves: list, config: Config, wall: bool) -> float:
    outs = _grad_outputs(forward())
    grads = [torch.ones_like(o) for o in outs]

    def backward():
        return torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    backward()  # warm-up: a recompiled backward is compiled at its first call
    _sync(config)
    return time_ms(backward, config, wall)


def measure_case(case: Case, config: Config, copy_gbps: Optional[float]) -> list:
    """One record (a flat dict) per provider of ``case``, with speedups against ``case.baseline``."""
    records = []
    for provider in case.providers:
        record = {"op": case.op, "case": case.label, "series": case.series, "x": case.x, "x_name": case.x_name,
                  "headline": case.headline, "baseline": case.baseline, "params": case.params,
                  "provider": provider.name, "status": "ok", "reason": None}
        if provider.skip is not None:
            record.update(status="skipped", reason=provider.skip)
        else:
            try:
                record.update(_measure_provider(case, provider, config))
            except torch.cuda.OutOfMemoryError:
                record.update(status="skipped", reason="out of memory at this shape")
            except Exception as error:  # a broken provider is reported, and the other providers still run
                record.update(status="failed", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
            gc.collect()
            if config.cuda:
                torch.cuda.empty_cache()
        records.append(record)
    _derive(records, case, copy_gbps)
    return records


def main_ms(record: dict) -> Optional[float]:
    """The time the case is judged by: fwd+bwd when the op has a backward, else fwd."""
    return record.get("full_ms") if record.get("full_ms") is not None else record.get("fwd_ms")


def _derive(records: list, case: Case, copy_gbps: Optional[float]) -> None:
    base = next((r for r in records if r["provider"] == case.baseline and r["status"] == "ok"), None)
    for record in records:
        ms = main_ms(record) if record["status"] == "ok" else None
        record["gbps"] = record["pct_copy"] = record["speedup"] = record["items_per_s"] = None
        if ms is None or not math.isfinite(ms) or ms <= 0:
            continue
        if case.bytes_moved is not None:
            record["gbps"] = case.bytes_moved / ms / 1e6
            if copy_gbps:
                record["pct_copy"] = 100 * record["gbps"] / copy_gbps
        if base is not None and main_ms(base) and not record.get("forward_only"):  # a bare launch is no rival
            record["speedup"] = main_ms(base) / ms
        if case.items is not None:
            record["items_per_s"] = case.items / ms * 1e3


def run_cases(cases: list, config: Config, copy_gbps: Optional[float], log: Callable[[str], None] = print) -> list:
    records = []
    for case in cases:
        log(f"  {case.op}: {case.label}")
        records.extend(measure_case(case, config, copy_gbps))
    return records


def randn(*shape, config: Config, dtype=torch.float32, scale: float = 1.0, requires_grad: bool = False):
    """Random normal tensor on the run's device (generated in fp32, then cast)."""
    t = (torch.randn(*shape, device=config.device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
