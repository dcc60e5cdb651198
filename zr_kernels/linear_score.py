"""``linear_score``: the student's score distribution straight from hidden states (paper Eq. 2 / 16).

Only K score tokens of a ~250k-token vocabulary matter, so the fused op multiplies ``hidden [N, D]`` by
the K score rows of the LM head (or of a K-row score head) and never forms ``N × V`` logits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from zr_kernels import reference
from zr_kernels._backend import Kernel, fused_op, note, resolve_backend
from zr_kernels._types import ScoreDist, stats_dtype
from zr_kernels.checks import check_float_tensor, check_positive_float, check_same_device
from zr_kernels._validation import as_token_ids, as_values, check_target
from zr_kernels.kernels import linear_score as triton_launchers
from zr_kernels.kernels import linear_score_cuda as cuda_launchers

MAX_SCORE_ROWS = 32
_LAUNCHERS = {"triton": triton_launchers, "cuda": cuda_launchers}


def _forward(hidden: torch.Tensor, weight: torch.Tensor, ids: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             values: torch.Tensor, target: Optional[torch.Tensor], temperature: float,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _LAUNCHERS[backend].linear_score_fwd(hidden, weight, ids, bias, values, target, temperature)


def _fake(hidden, weight, ids, bias, values, target, temperature, backend):
    n_bins = ids.shape[0] if ids is not None else weight.shape[0]
    row = hidden.new_empty(hidden.shape[0], dtype=values.dtype)
    nll = hidden.new_empty(hidden.shape[0] if target is not None else 0, dtype=values.dtype)
    return hidden.new_empty(hidden.shape[0], n_bins, dtype=values.dtype), row, row.clone(), nll


def _grad_logits(
    grad_probs: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor], grad_std: Optional[torch.Tensor],
    grad_nll: Optional[torch.Tensor], probs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
    target: Optional[torch.Tensor], values: torch.Tensor, temperature: float, backend: str,
) -> torch.Tensor:
    return _LAUNCHERS[backend].linear_score_grad_logits(grad_probs, grad_mean, grad_std, grad_nll, probs, mean, std,
                                                        target, values, temperature)


def _grad_logits_fake(grad_probs, grad_mean, grad_std, grad_nll, probs, mean, std, target, values, temperature,
                      backend):
    return torch.empty_like(probs)


def _grad_hidden(grad_logits: torch.Tensor, weight: torch.Tensor, ids: Optional[torch.Tensor], dim: int,
                 backend: str) -> torch.Tensor:
    return _LAUNCHERS[backend].linear_score_grad_hidden(grad_logits, weight, ids, dim)


def _grad_hidden_fake(grad_logits, weight, ids, dim, backend):
    return grad_logits.new_empty(grad_logits.shape[0], dim, dtype=weight.dtype)


def _grad_weight(grad_logits: torch.Tensor, hidden: torch.Tensor, ids: Optional[torch.Tensor], num_weight_rows: int,
                 with_bias: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _LAUNCHERS[backend].linear_score_grad_weight(grad_logits, hidden, ids, num_weight_rows, with_bias)


def _grad_weight_fake(grad_logits, hidden, ids, num_weight_rows, with_bias, backend):
    return (hidden.new_empty(num_weight_rows, hidden.shape[1]),
            hidden.new_empty(num_weight_rows if with_bias else 0))


def _setup_context(ctx, inputs, output):
    hidden, weight, ids, bias, values, target, temperature, backend = inputs
    probs, mean, std, _ = output
    ctx.save_for_backward(hidden, weight, ids, probs, mean, std, values, target)
    ctx.temperature, ctx.backend, ctx.has_bias = temperature, backend, bias is not None
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros allocated or read


def _backward(ctx, kernels, grad_probs, grad_mean, grad_std, grad_nll):
    hidden, weight, ids, probs, mean, std, values, target = ctx.saved_tensors
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    grad_nll = grad_nll if target is not None else None  # without a target, nll is an empty placeholder
    upstream = (None if g is None else g.to(probs.dtype) for g in (grad_probs, grad_mean, grad_std, grad_nll))
    grad_logits = kernels.grad_logits(*upstream, probs, mean, std, target, values, ctx.temperature, ctx.backend)
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden:
        grad_hidden = kernels.grad_hidden(grad_logits, weight, ids, hidden.shape[1], ctx.backend)
    if need_weight or (ctx.has_bias and need_bias):
        with_bias = ctx.has_bias and need_bias
        grad_weight, grad_bias = kernels.grad_weight(grad_logits, hidden, ids, weight.shape[0], with_bias,
                                                     ctx.backend)
        grad_weight = grad_weight if need_weight else None
        grad_bias = grad_bias if with_bias else None
    return grad_hidden, grad_weight, None, grad_bias, None, None, None, None


_linear_score_route = fused_op("linear_score", _forward, _fake, _setup_context, _backward, {
    "grad_logits": Kernel(_grad_logits, _grad_logits_fake),
    "grad_hidden": Kernel(_grad_hidden, _grad_hidden_fake),
    "grad_weight": Kernel(_grad_weight, _grad_weight_fake),
})


def linear_score(hidden, weight, values, token_ids=None, bias=None, temperature=1.0, target=None, *,
                 backend=None) -> ScoreDist:
    """Score-bin distribution of a linear score head, fused (no ``N × V`` logits).

    Replaces::

        rows = weight if token_ids is None else weight[token_ids]
        b = bias if token_ids is None or bias is None else bias[token_ids]
        logits = torch.nn.functional.linear(hidden, rows, b)            # [N, K]
        score_distribution(logits, range(K), values, target, temperature)

    Args:
        hidden: ``[N, D]`` fp32/bf16/fp16, any strides (e.g. ``hidden_states[:, -1, :]``).
        weight: ``[K, D]`` score head, or ``[V, D]`` LM head with ``token_ids``; same dtype as ``hidden``, except
            under ``torch.autocast``, where hidden, the K score rows and bias are cast to the autocast dtype as
            ``F.linear`` would cast them (fp32 master weights with bf16 activations).
        values: ``[K]`` score of each bin.
        token_ids: optional ``[K]`` unique rows of ``weight`` (the score tokens). A list or CPU tensor is checked
            on the host (ValueError); a CUDA tensor on the device: an id out of range or repeated gives NaN.
        bias: optional, ``[V]`` indexed by ``token_ids`` (LM-head mode) or ``[K]``; same dtype as ``hidden``.
        temperature: divides the K logits before the softmax.
        target: optional ``[N]`` bin index per row; gives ``nll = -log probs[target]`` (the per-row term of
            Eq. 8), computed from the log-sum-exp in the kernel.
        backend: ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"reference"`` (default: env ``ZR_KERNELS_BACKEND``
            or auto: the CUDA extension for CUDA tensors, Triton if it is not built or when a ``target`` is
            given (the extension computes no nll), the reference on CPU).

    At most 32 score rows (K), on every backend. Returns ``ScoreDist(probs [N, K], mean [N], std [N],
    nll [N] | None)`` in fp32 (fp64 for fp64 inputs, which the CUDA extension does not take), differentiable
    w.r.t. ``hidden``, ``weight`` and ``bias``. Bytes: forward reads ``N·D`` hidden elements plus the ``K·D``
    score rows and writes ``4·(N·K + 2N)``; backward writes ``grad_hidden`` (``N·D``), reads hidden again
    for ``grad_weight`` and writes only its K score rows (a ``[V, D]`` zero-filled gradient in LM-head mode;
    nothing when ``weight`` needs no gradient).
    """
    check_float_tensor("hidden", hidden, ndim=2)
    check_float_tensor("weight", weight, ndim=2)
    if bias is not None:
        check_float_tensor("bias", bias, ndim=1)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden, weight, token_ids, bias = _autocast(hidden, weight, token_ids, bias)
    n_rows, dim = hidden.shape
    if not 1 <= dim <= triton_launchers.MAX_DIM:
        raise ValueError(f"hidden must be [N, D] with 1 <= D <= {triton_launchers.MAX_DIM}, got shape "
                         f"{tuple(hidden.shape)}")
    if weight.shape[1] != dim:
        raise ValueError(f"weight must be [K or V, {dim}] (D of hidden), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype} "
                        "(under torch.autocast both are cast to the autocast dtype)")
    check_same_device("hidden", hidden, weight=weight)
    ids = None if token_ids is None else as_token_ids(token_ids, weight.shape[0], hidden.device).contiguous()
    num_bins = weight.shape[0] if ids is None else ids.numel()
    if not 1 <= num_bins <= MAX_SCORE_ROWS:
        what = "token_ids" if ids is not None else "weight"
        raise ValueError(f"{what}: linear_score takes 1 to {MAX_SCORE_ROWS} score rows (K), got K = {num_bins}")
    values = as_values(values, num_bins, hidden.device, stats_dtype(hidden.dtype))
    if bias is not None:
        _check_bias(bias, hidden, weight.shape[0] if ids is not None else num_bins, ids is not None)
    temperature = check_positive_float("temperature", temperature)
    if target is not None:
        check_target(target, (n_rows,), num_bins, hidden.device)
    if backend == "cuda" and hidden.dtype == torch.float64:
        raise TypeError("hidden: backend='cuda' takes float32, bfloat16 or float16 inputs, got float64")
    if backend == "cuda" and target is not None:
        raise ValueError("target: backend='cuda' computes no nll; use backend='triton' (or auto) with a target")
    fused = ("cuda", "triton") if hidden.dtype != torch.float64 and target is None else ("triton",)
    chosen = resolve_backend("linear_score", backend, hidden.device, fused=fused)

    if chosen == "reference":
        note("linear_score", "reference")
        return reference.linear_score(hidden, weight, values, ids, bias, temperature, target)
    needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    probs, mean, std, nll = _linear_score_route(hidden, weight, ids, bias, values, target, temperature, chosen,
                                                needs_grad=needs_grad)
    return ScoreDist(probs, mean, std, nll if target is not None else None)


def _autocast(hidden, weight, token_ids, bias):
    """The inputs as ``F.linear`` sees them under ``torch.autocast``: fp32/bf16/fp16 tensors cast to the autocast
    dtype (fp64 left alone), so fp32 master weights meet 16-bit activations. In LM-head mode only the K score
    rows (and bias entries) are gathered and cast, never the whole ``[V, D]`` head; the gradient still reaches
    the head's rows through the gather. Statistics stay fp32."""
    dtype = torch.get_autocast_dtype(hidden.device.type)
    if token_ids is not None:
        check_same_device("hidden", hidden, weight=weight, bias=bias)
        ids = as_token_ids(token_ids, weight.shape[0], weight.device)
        if bias is not None and bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (one per row of weight, indexed by "
                             f"token_ids), got {tuple(bias.shape)}")
        weight, bias, token_ids = weight[ids], None if bias is None else bias[ids], None

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(hidden), cast(weight), token_ids, cast(bias)


def _check_bias(bias, hidden: torch.Tensor, length: int, lm_head: bool) -> None:
    if bias.shape[0] != length:
        what = "one per row of weight, indexed by token_ids" if lm_head else "one per score row"
        raise ValueError(f"bias must have shape ({length},) ({what}), got {tuple(bias.shape)}")
    if bias.dtype != hidden.dtype:
        raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    check_same_device("hidden", hidden, bias=bias)


class ScoreHead(nn.Module):
    """A K-row linear score head: ``linear_score(hidden, self.weight, self.values, bias=self.bias)``.

    ``weight [K, D]`` (and ``bias [K]``) are parameters, ``values [K]`` a buffer. Build one from a language
    model's LM head with :meth:`from_lm_head`, which copies the score tokens' rows.
    """

    def __init__(self, dim: int, values, bias: bool = False, temperature: float = 1.0, *, device=None, dtype=None):
        super().__init__()
        values = torch.as_tensor(values, dtype=torch.float32, device=device).detach().clone()
        if values.dim() != 1 or not 1 <= values.numel() <= MAX_SCORE_ROWS:
            raise ValueError(f"values must be 1-D with 1 to {MAX_SCORE_ROWS} scores, got shape {tuple(values.shape)}")
        self.temperature = check_positive_float("temperature", temperature)
        self.weight = nn.Parameter(torch.empty(values.numel(), dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(values.numel(), device=device, dtype=dtype)) if bias else None
        self.register_buffer("values", values)
        bound = 1 / math.sqrt(dim)  # nn.Linear's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_lm_head(cls, lm_head: nn.Linear, token_ids, values, temperature: float = 1.0) -> "ScoreHead":
        """A head whose rows (and bias entries) are copies of ``lm_head``'s rows for ``token_ids``."""
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"lm_head must be a torch.nn.Linear, got {type(lm_head).__name__}")
        weight = lm_head.weight
        ids = as_token_ids(token_ids, weight.shape[0], weight.device)
        if not isinstance(values, torch.Tensor):
            values = list(values)
        if len(values) != ids.numel():
            raise ValueError(f"values must hold one score per token id ({ids.numel()}), got {len(values)}")
        head = cls(weight.shape[1], values, bias=lm_head.bias is not None, temperature=temperature,
                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight[ids])
            if lm_head.bias is not None:
                head.bias.copy_(lm_head.bias[ids])
        return head

    def forward(self, hidden: torch.Tensor, target: torch.Tensor | None = None, *,
                backend: str | None = None) -> ScoreDist:
        return linear_score(hidden, self.weight, self.values, bias=self.bias, temperature=self.temperature,
                            target=target, backend=backend)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, bins={self.weight.shape[0]}, bias={self.bias is not None}"
