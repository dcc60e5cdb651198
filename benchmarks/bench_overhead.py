"""Host overhead: wall time per call of every fused op at trainer sizes (64 rows), forward and forward+backward.

At these sizes the GPU work is a few microseconds, so the time per call is what the host spends: argument
checks, Python, autograd bookkeeping, allocations and kernel launches. Each case times 300 back-to-back
calls with a wall-clock timer (``Case.wall_clock``) for three providers side by side:

* ``triton`` (and ``cuda`` for ``linear_score``): the fused op, eager mode, as a trainer calls it;
* ``eager``: its PyTorch reference from ``zr_kernels.reference``, the speedup baseline;
* ``bare``: one launch of an empty Triton kernel, the floor any Triton op pays per kernel.

Goals (benchmarks/README.md): forward ≤ 3× a bare launch, forward+backward ≤ 8× a bare launch, and every fused
op's forward+backward faster than its eager reference.
"""
from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

import zr_kernels
from benchmarks.harness import Case, Config, Provider, cuda_ext_provider, eager_provider, randn, triton_provider
from zr_kernels import reference

OP = "overhead"
ROWS = 64
VOCAB = 32_768  # small enough that the dense [64, V] logits gradient is ~1 µs of HBM traffic on an H100
HIDDEN = 1024
NUM_BINS = 9
GROUP = 8
SCORE_RANGE = 4.0


@triton.jit
def _empty_kernel(out_ptr):
    if tl.program_id(0) < 0:  # never true: the kernel only costs its launch
        tl.store(out_ptr, 0.0)


def _bare(config: Config) -> Provider:
    scratch = torch.empty(1, device=config.device)

    def launch(**_inputs):
        _empty_kernel[(1,)](scratch)
        return scratch

    provider = triton_provider(launch, config, name="bare")
    provider.forward_only = True
    return provider


def _case(name: str, make_inputs, fused: dict, eager, grad: tuple, config: Config) -> Case:
    """``fused`` maps provider name to the fused call; every case also times ``eager`` and a bare launch."""
    providers = [(cuda_ext_provider if backend == "cuda" else triton_provider)(fn, config, name=backend)
                 for backend, fn in fused.items()]
    return Case(op=OP, label=f"{name} rows={ROWS}", make_inputs=make_inputs,
                providers=[*providers, eager_provider(eager), _bare(config)],
                grad=grad, wall_clock=True, params={"fused_op": name, "rows": ROWS})


def cases(config: Config) -> list:
    def randn_(*shape, **kw):
        return randn(*shape, config=config, **kw)

    def ids():
        return torch.randperm(VOCAB, device=config.device)[:NUM_BINS]

    def values():
        return torch.linspace(1.0, 5.0, NUM_BINS, device=config.device)

    def logits():
        return randn_(ROWS, VOCAB, dtype=torch.bfloat16, scale=3.0, requires_grad=True)

    def score_distribution_inputs():
        return {"logits": logits(), "token_ids": ids(), "values": values(),
                "target": torch.randint(0, NUM_BINS, (ROWS,), device=config.device)}

    def gap_inputs():
        return {"mu_w": (randn_(ROWS, GROUP) + 3).requires_grad_(), "mu_l": (randn_(ROWS, GROUP) + 3).requires_grad_(),
                "gap": randn_(ROWS)}

    def slice_kl_inputs():
        return {"student_logits": logits(), "teacher_probs": torch.softmax(randn_(ROWS, NUM_BINS), -1),
                "token_ids": ids()}

    def linear_score_inputs():
        return {"hidden": randn_(ROWS, HIDDEN, dtype=torch.bfloat16, requires_grad=True),
                "weight": randn_(VOCAB, HIDDEN, dtype=torch.bfloat16, scale=HIDDEN ** -0.5),
                "values": values(), "token_ids": ids()}

    def gdso_inputs():
        scores = randn_(ROWS, GROUP) + 3
        return {"mu_w": randn_(ROWS, GROUP) + 3, "mu_l": randn_(ROWS, GROUP) + 3, "s_w": scores[:, 0],
                "s_l": scores[:, 1]}

    gap_args = dict(score_range=SCORE_RANGE)
    gdso_args = dict(score_min=1.0, score_max=5.0, lambda_pt=0.5, lambda_pw=0.5)
    return [
        _case("score_distribution", score_distribution_inputs,
              {"triton": partial(zr_kernels.score_distribution, backend="triton")},
              reference.score_distribution, ("logits",), config),
        _case("pairwise_gap", gap_inputs, {"triton": partial(zr_kernels.pairwise_gap, **gap_args, backend="triton")},
              partial(reference.pairwise_gap, **gap_args), ("mu_w", "mu_l"), config),
        _case("slice_kl", slice_kl_inputs, {"triton": partial(zr_kernels.slice_kl, backend="triton")},
              reference.slice_kl, ("student_logits",), config),
        _case("linear_score", linear_score_inputs,
              {backend: partial(zr_kernels.linear_score, backend=backend) for backend in ("cuda", "triton")},
              reference.linear_score, ("hidden",), config),
        _case("group_advantages", lambda: {"rewards": randn_(ROWS * GROUP)},
              {"triton": partial(zr_kernels.group_advantages, group_size=GROUP, backend="triton")},
              partial(reference.group_advantages, group_size=GROUP), (), config),
        _case("gdso_rewards", gdso_inputs, {"triton": partial(zr_kernels.gdso_rewards, **gdso_args, backend="triton")},
              partial(reference.gdso_rewards, **gdso_args), (), config),
    ]
