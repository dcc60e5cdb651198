"""linear_score: the fused score head ``hidden @ W[token_ids].T → softmax → mean/std`` (fwd + bwd).

Three variants: the LM head's K score rows with the head frozen (gradient to ``hidden`` only, the ReFL /
student-scoring case and the headline), the same with the LM head trained (its ``[V, D]`` gradient is
zero-filled off the K rows), and a ``[K, D]`` score head. ``naive`` is the route through full LM-head
logits ``hidden @ W.T`` (``N×V``) that ``model(...).logits`` takes; ``eager`` is the reference, which already
slices the K rows first. With the head frozen the op reads ``hidden`` twice and writes its gradient, so
``bytes_moved`` is ``3·N·D`` elements plus the K rows.
"""
from __future__ import annotations

import torch

import zr_kernels
from benchmarks.harness import (Case, Config, Provider, compile_provider, cuda_ext_provider, dtype_name,
                                eager_provider, no_liger, randn, triton_provider)
from zr_kernels import reference

OP = "linear_score"
NUM_BINS = 9


def _fused(backend: str):
    def run(hidden, weight, values, token_ids):
        return zr_kernels.linear_score(hidden, weight, values, token_ids, backend=backend)
    return run


def _eager(hidden, weight, values, token_ids):
    return reference.linear_score(hidden, weight, values, token_ids)


def _naive(hidden, weight, values, token_ids):
    return reference.score_distribution(hidden @ weight.T, token_ids, values)


def _case(rows: int, dim: int, vocab: int, variant: str, config: Config, headline: bool = False) -> Case:
    """``variant``: ``"frozen"`` (LM-head rows, grad hidden), ``"trained"`` (LM-head rows, grad hidden +
    weight) or ``"head"`` (a ``[K, D]`` score head, grad hidden + weight)."""
    dtype = torch.bfloat16
    head_rows = NUM_BINS if variant == "head" else vocab

    def make_inputs():
        return {
            "hidden": randn(rows, dim, config=config, dtype=dtype, requires_grad=True),
            "weight": randn(head_rows, dim, config=config, dtype=dtype, scale=dim ** -0.5,
                            requires_grad=variant != "frozen"),
            "values": torch.linspace(1.0, 5.0, NUM_BINS, device=config.device),
            "token_ids": None if variant == "head" else torch.randperm(vocab, device=config.device)[:NUM_BINS],
        }

    size = torch.empty((), dtype=dtype).element_size()
    weight_bytes = {"frozen": 2 * NUM_BINS * dim, "trained": 2 * NUM_BINS * dim + vocab * dim,
                    "head": 3 * NUM_BINS * dim}[variant] * size
    naive = (Provider("naive", skip="no LM head to take full logits from in score-head mode") if variant == "head"
             else Provider("naive", _naive))
    title = {"frozen": "LM-head rows, frozen", "trained": "LM-head rows, trained", "head": "score head"}[variant]
    return Case(
        op=OP, label=f"{title} N={rows} D={dim}" + (f" V={vocab}" if variant != "head" else "")
                     + f" {dtype_name(dtype)}",
        make_inputs=make_inputs,
        providers=[
            cuda_ext_provider(_fused("cuda"), config),
            triton_provider(_fused("triton"), config),
            eager_provider(_eager),
            compile_provider(_eager, config),
            no_liger("its fused linear losses span the whole vocabulary and return a loss, not a score distribution"),
            naive,
        ],
        grad=("hidden",) if variant == "frozen" else ("hidden", "weight"),
        bytes_moved=3 * rows * dim * size + weight_bytes, series=title, x=rows, headline=headline,
        params={"N": rows, "D": dim, "V": vocab, "K": NUM_BINS, "variant": variant, "dtype": dtype_name(dtype)},
    )


def cases(config: Config) -> list:
    if config.smoke:
        return [_case(8, 64, 1000, "frozen", config), _case(33, 64, 1000, "frozen", config, headline=True),
                _case(33, 64, 1000, "trained", config), _case(33, 64, 1000, "head", config)]
    dim, vocab = 4096, 248_320
    return ([_case(rows, dim, vocab, "frozen", config, headline=rows == 1024) for rows in (256, 1024, 4096)]
            + [_case(1024, dim, vocab, "trained", config), _case(1024, dim, vocab, "head", config)])
