"""PyTorch twin of ``zr_kernels.slice_kl`` (same signature, no fusion)."""
from __future__ import annotations

import torch

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def kl_rows(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``Σ_k a_k (log a_k − log b_k)`` per row with ``0·log 0 = 0``: terms with ``a_k = 0`` are dropped, and so
    are their gradients (a plain product would give ``0·∞ = nan`` there, forward or backward)."""
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(-1)


def reduce_rows(per_row: torch.Tensor, reduction: str, num_bins: int) -> torch.Tensor:
    """``torch.nn.functional.kl_div`` reductions of a ``[N]`` per-row loss over ``[N, K]`` elements."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    mean = per_row.mean()  # one op for the default "batchmean": this runs on every fused call too
    return mean if reduction == "batchmean" else mean / num_bins


def slice_kl(student_logits, teacher_probs, token_ids, normalize="slice", beta=0.0, temperature=1.0,
             reduction="batchmean") -> torch.Tensor:
    """KL(teacher ‖ student) (``beta=0``), KL(student ‖ teacher) (``beta=1``) or TRL's generalized JSD over the
    K score tokens, in fp32 (fp64 for fp64 logits); the gradient flows to ``student_logits`` only."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64, device=student_logits.device)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp64 stays fp64 (gradcheck, ground truth)
    p = teacher_probs.detach().to(dtype)
    if normalize == "slice":
        log_q = torch.log_softmax(student_logits[:, ids].to(dtype) / temperature, dim=-1)
    else:
        log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)[:, ids]
    log_p = p.log()
    if beta == 0:
        per_row = kl_rows(p, log_p, log_q)
    elif beta == 1:
        per_row = kl_rows(log_q.exp(), log_q, log_p)
    else:
        q = log_q.exp()
        m = (1 - beta) * q + beta * p
        # m == 0 only where p == q == 0, whose terms kl_rows drops; log 1 keeps their gradient finite.
        log_m = torch.where(m > 0, m, 1.0).log()
        per_row = beta * kl_rows(p, log_p, log_m) + (1 - beta) * kl_rows(q, log_q, log_m)
    return reduce_rows(per_row, reduction, ids.numel())
