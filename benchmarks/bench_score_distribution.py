"""score_distribution: K score-token softmax + mean/std/nll from a strided ``logits[:, -1, :]`` view.

The backward writes a dense ``[N, V]`` logits gradient (zero off the K score columns), so fwd+bwd is
bandwidth-bound on that write: ``bytes_moved`` is ``N·V`` gradient elements plus the ``N·K`` logits read.
"""
from __future__ import annotations

import torch

import zr_kernels
from benchmarks.harness import (Case, Config, compile_provider, dtype_name, eager_provider, no_liger, randn,
                                triton_provider)
from zr_kernels import reference

OP = "score_distribution"
NUM_BINS = 9


def _triton(logits, token_ids, values, target):
    return zr_kernels.score_distribution(logits, token_ids, values, target, backend="triton")


def _eager(logits, token_ids, values, target):
    return reference.score_distribution(logits, token_ids, values, target)


def _case(rows: int, vocab: int, dtype: torch.dtype, config: Config, headline: bool) -> Case:
    def make_inputs():
        # A [N, 2, V] buffer viewed at the last position, as a model's logits[:, -1, :] (row stride 2·V).
        view = randn(rows, 2, vocab, config=config, dtype=dtype, scale=3.0)[:, -1, :]
        return {
            "logits": view.detach().requires_grad_(),
            "token_ids": torch.randperm(vocab, device=config.device)[:NUM_BINS],
            "values": torch.linspace(1.0, 5.0, NUM_BINS, device=config.device),
            "target": torch.randint(0, NUM_BINS, (rows,), device=config.device),
        }

    size = torch.empty((), dtype=dtype).element_size()
    return Case(
        op=OP, label=f"N={rows} V={vocab} K={NUM_BINS} {dtype_name(dtype)} view", make_inputs=make_inputs,
        providers=[
            triton_provider(_triton, config),
            eager_provider(_eager),
            compile_provider(_eager, config),
            no_liger("close-set softmax over selected token ids"),
        ],
        grad=("logits",), bytes_moved=rows * vocab * size + rows * NUM_BINS * (size + 4),
        series=f"V={vocab} {dtype_name(dtype)}", x=rows, headline=headline,
        params={"N": rows, "V": vocab, "K": NUM_BINS, "dtype": dtype_name(dtype)},
    )


def cases(config: Config) -> list:
    if config.smoke:
        return [_case(rows, 1000, torch.bfloat16, config, headline=rows == 17) for rows in (8, 17)]
    return [_case(rows, 248_320, torch.bfloat16, config, headline=rows == 8192) for rows in (1024, 4096, 8192, 16384)]
