"""slice_kl: the RISD distillation loss over the K score tokens, in slice and vocabulary mode.

Vocabulary mode streams all ``N·V`` student logits forward and again backward and writes the ``[N, V]``
gradient, so ``bytes_moved`` is ``3·N·V`` logits elements (plus the teacher): the op should run near copy
bandwidth. Slice mode reads only the K score columns but still writes the zero-filled ``[N, V]`` gradient.

Liger has no fused slice KL; its routes are the ones a Liger user would write: ``LigerKLDIVLoss`` / ``LigerJSD``
on the log-softmax of the gathered K logits (slice mode), and ``LigerKLDIVLoss`` over the whole vocabulary on a
full fp32 log-softmax with the teacher scattered into ``[N, V]`` (vocabulary mode). ``naive`` is the plain
PyTorch route: a full fp32 log-softmax, gathered, into ``F.kl_div``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import zr_kernels
from benchmarks.harness import (Case, Config, Provider, compile_provider, dtype_name, eager_provider, liger_provider,
                                randn, triton_provider)
from zr_kernels import reference

OP = "slice_kl"
NUM_BINS = 9


def _providers(normalize: str, beta: float, config: Config) -> list:
    def triton(student_logits, teacher_probs, token_ids):
        return zr_kernels.slice_kl(student_logits, teacher_probs, token_ids, normalize, beta, backend="triton")

    def eager(student_logits, teacher_probs, token_ids):
        return reference.slice_kl(student_logits, teacher_probs, token_ids, normalize, beta)

    def naive(student_logits, teacher_probs, token_ids):
        log_q = torch.log_softmax(student_logits.float(), dim=-1)[:, token_ids]
        return F.kl_div(log_q, teacher_probs, reduction="batchmean")

    def liger():
        from liger_kernel.transformers.functional import liger_jsd, liger_kl_div

        def slice_route(student_logits, teacher_probs, token_ids):
            log_q = torch.log_softmax(student_logits[:, token_ids].float(), dim=-1)
            if beta == 0:
                return liger_kl_div(log_q, teacher_probs, reduction="batchmean")
            return liger_jsd(log_q, teacher_probs.log(), beta=beta)

        def vocab_route(student_logits, teacher_probs, token_ids):
            log_q = torch.log_softmax(student_logits.float(), dim=-1)
            teacher = log_q.new_zeros(log_q.shape).index_copy_(1, token_ids, teacher_probs)
            return liger_kl_div(log_q, teacher, reduction="batchmean")

        return vocab_route if normalize == "vocab" else slice_route

    providers = [triton_provider(triton, config), eager_provider(eager), compile_provider(eager, config),
                 liger_provider(liger, config)]
    if normalize == "vocab":
        providers.append(Provider("naive", naive))
    return providers


def _case(rows: int, vocab: int, normalize: str, beta: float, config: Config, headline: bool = False) -> Case:
    dtype = torch.bfloat16

    def make_inputs():
        return {
            "student_logits": randn(rows, vocab, config=config, dtype=dtype, scale=3.0, requires_grad=True),
            "teacher_probs": torch.randn(rows, NUM_BINS, device=config.device).softmax(-1),
            "token_ids": torch.randperm(vocab, device=config.device)[:NUM_BINS],
        }

    size = torch.empty((), dtype=dtype).element_size()
    logits_passes = 3 if normalize == "vocab" else 1  # vocab: read fwd, read bwd, write grad; slice: write grad
    kind = f"{normalize}" + (f" beta={beta:g}" if beta else "")
    return Case(
        op=OP, label=f"{kind} N={rows} V={vocab} K={NUM_BINS} {dtype_name(dtype)}", make_inputs=make_inputs,
        providers=_providers(normalize, beta, config), grad=("student_logits",),
        bytes_moved=logits_passes * rows * vocab * size + 2 * rows * NUM_BINS * 4,
        series=f"{kind} {dtype_name(dtype)}", x=rows, headline=headline,
        params={"N": rows, "V": vocab, "K": NUM_BINS, "normalize": normalize, "beta": beta,
                "dtype": dtype_name(dtype)},
    )


def cases(config: Config) -> list:
    if config.smoke:
        return [_case(8, 1000, "vocab", 0.0, config), _case(17, 1000, "vocab", 0.0, config, headline=True),
                _case(8, 1000, "slice", 0.0, config), _case(8, 1000, "slice", 0.5, config)]
    vocab = 248_320
    return ([_case(rows, vocab, "vocab", 0.0, config, headline=rows == 8192) for rows in (1024, 4096, 8192)]
            + [_case(rows, vocab, "slice", 0.0, config) for rows in (1024, 8192)]
            + [_case(8192, vocab, "slice", 0.5, config)])
