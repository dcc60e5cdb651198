"""group_advantages: GRPO group-relative advantages (Eq. 3) over contiguous groups; forward only.

Reads ``N`` rewards and writes ``N`` advantages (fp32), so ``bytes_moved`` is ``8·N``; at these sizes the op
is launch-bound and the interesting number is the time against eager's handful of kernels.
"""
from __future__ import annotations

import zr_kernels
from benchmarks.harness import Case, Config, compile_provider, eager_provider, no_liger, randn, triton_provider
from zr_kernels import reference

OP = "group_advantages"


def _triton(rewards, group_size):
    return zr_kernels.group_advantages(rewards, group_size, backend="triton")


def _eager(rewards, group_size):
    return reference.group_advantages(rewards, group_size)


def _case(rows: int, group_size: int, config: Config, headline: bool) -> Case:
    def make_inputs():
        return {"rewards": randn(rows, config=config), "group_size": group_size}

    return Case(
        op=OP, label=f"N={rows} G={group_size} fp32", make_inputs=make_inputs,
        providers=[
            triton_provider(_triton, config),
            eager_provider(_eager),
            compile_provider(_eager, config),
            no_liger("no standalone group-advantage op"),
        ],
        bytes_moved=8 * rows, series=f"G={group_size}", x=rows, x_name="N (rewards)", headline=headline,
        params={"N": rows, "G": group_size, "dtype": "fp32"},
    )


def cases(config: Config) -> list:
    if config.smoke:
        return [_case(16, 4, config, headline=False), _case(64, 16, config, headline=True)]
    return [_case(rows, group, config, headline=(rows, group) == (16384, 8))
            for group in (4, 8, 16) for rows in (1024, 4096, 16384)]
