"""Host time per call of every fused op with the Triton launches stubbed out: a CPU-only proxy for host overhead.

    python -m benchmarks.host_time            # 64 rows, CPU tensors, microseconds per call

On a machine without a GPU, ``zr-bench --smoke --ops overhead`` times the Triton interpreter, which executes
the kernels in NumPy and swamps the host work being measured. This script replaces the interpreter's kernel
execution with a no-op, so what remains is exactly the wrapper's work: argument checks, constant conversion,
autograd bookkeeping, allocations and the launcher's own Python. Tensors are tiny (64 rows, V = 64) so that
CPU memory traffic stays negligible. On a GPU the real launches add roughly one bare launch each; use
``zr-bench --ops overhead`` there.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: launches go through the interpreter ...

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None  # ... whose kernel execution is skipped

import zr_kernels  # noqa: E402

ROWS, VOCAB, HIDDEN, NUM_BINS, GROUP = 64, 64, 32, 9, 8


def _per_call_us(fn, calls: int = 2000, repeats: int = 5) -> float:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids, values = torch.arange(3, 3 + NUM_BINS), torch.linspace(1.0, 5.0, NUM_BINS)
    logits = torch.randn(ROWS, VOCAB, requires_grad=True)
    target = torch.randint(0, NUM_BINS, (ROWS,))
    mu_w, mu_l = torch.rand(ROWS, GROUP, requires_grad=True), torch.rand(ROWS, GROUP, requires_grad=True)
    gap, teacher = torch.rand(ROWS), torch.softmax(torch.randn(ROWS, NUM_BINS), -1)
    hidden, weight = torch.randn(ROWS, HIDDEN, requires_grad=True), torch.randn(VOCAB, HIDDEN)
    rewards = torch.rand(ROWS * GROUP)
    ops = {  # name -> (forward returning a scalar loss, has a backward)
        "score_distribution": (lambda: zr_kernels.score_distribution(logits, ids, values, target,
                                                                     backend="triton").mean.sum(), True),
        "pairwise_gap": (lambda: zr_kernels.pairwise_gap(mu_w, mu_l, gap, 4.0, backend="triton").loss.sum(), True),
        "slice_kl": (lambda: zr_kernels.slice_kl(logits, teacher, ids, backend="triton"), True),
        "linear_score": (lambda: zr_kernels.linear_score(hidden, weight, values, ids, backend="triton").mean.sum(),
                         True),
        "group_advantages": (lambda: zr_kernels.group_advantages(rewards, GROUP, backend="triton"), False),
        "gdso_rewards": (lambda: zr_kernels.gdso_rewards(mu_w.detach(), mu_l.detach(), gap, gap, 1.0, 5.0, 0.5, 0.5,
                                                         backend="triton")[0], False),
    }
    print(f"host time per call, Triton launches stubbed, {ROWS} rows (torch {torch.__version__})")
    for name, (forward, has_backward) in ops.items():
        line = f"{name:20s} fwd {_per_call_us(forward):7.1f} us"
        if has_backward:
            line += f"   fwd+bwd {_per_call_us(lambda: forward().backward(), calls=1000):7.1f} us"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
