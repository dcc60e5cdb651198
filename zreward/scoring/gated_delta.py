"""The gated delta rule of Qwen3.5's linear-attention layers, with a start state, on the best kernel that can run.

Per value head, with ``q``/``k`` L2-normalised, ``q`` scaled by ``dk ** -0.5``, and the state ``S [dk, dv]``:

    S <- exp(g_t) * S
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t = S^T q_t

``gated_delta_rule`` runs it from ``initial_state`` (the state a shared prompt prefix ended in) and returns the
final state too. Implementations, picked per call (``ZREWARD_GATED_DELTA_BACKEND`` = ``auto`` | ``torch`` |
``fla``, default ``auto``):

* ``fla``: ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` (Triton; the ``[fla]`` extra), CUDA tensors only.
  fla refuses the backward on Hopper with Triton >= 3.4.0 and < 3.7.1 unless tilelang is installed (its issue
  #640). ``auto`` then keeps fla for the forward and differentiates the PyTorch path in the backward
  (``"fla-forward"``), saying so once; forward-only calls are unaffected.
* ``torch``: :func:`chunk_gated_delta_rule`, chunks of 64 tokens, each chunk's triangular system solved in one
  batched ``solve_triangular`` (the WY form), then one state update per chunk.
* :func:`recurrent_gated_delta_rule`: the token-by-token definition above; the reference the tests compare to.

Except under fla's own autograd, only the inputs are kept for the backward, which recomputes the chunk
intermediates (they are fp32 and O(T * 64) per head: most of a layer's activation memory otherwise).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "fla")
BACKEND_ENV = "ZREWARD_GATED_DELTA_BACKEND"
CHUNK = 64


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    # The eps and form of transformers' and fla's l2norm, so the paths agree to rounding.
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _prepare(q, k, v, g, beta):
    """``[N, HV, T, d]`` q (normalised, scaled), k (normalised), v; ``[N, HV, T]`` g and beta; all in fp32, or
    fp64 for fp64 inputs (gradcheck)."""
    heads, value_heads = q.shape[2], v.shape[2]
    if value_heads % heads:
        raise ValueError(f"v must have a multiple of q's {heads} heads, got {value_heads}")
    if value_heads != heads:  # grouped values: each q/k head serves value_heads // heads consecutive value heads
        q, k = (x.repeat_interleave(value_heads // heads, dim=2) for x in (q, k))
    dtype = torch.promote_types(v.dtype, torch.float32)
    q, k, v, g, beta = (x.transpose(1, 2).to(dtype) for x in (q, k, v, g, beta))
    return _l2norm(q) * q.shape[-1] ** -0.5, _l2norm(k), v, g, beta


def _start_state(initial_state, q, v) -> torch.Tensor:
    if initial_state is None:
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    return initial_state.to(v.dtype)


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the recurrence token by token. Same arguments and outputs as :func:`gated_delta_rule`."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    state = _start_state(initial_state, q, v)
    outs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        read = (state * k[:, :, t, :, None]).sum(-2)
        state = state + k[:, :, t, :, None] * (beta[:, :, t, None] * (v[:, :, t] - read))[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outs, 1).to(out_dtype), state


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence in chunks of ``CHUNK`` tokens; same arguments and outputs as :func:`gated_delta_rule`.

    Within a chunk, with ``G`` the cumulative log decay from the chunk start and ``S0`` the start state, the values
    written are ``U = (I + A)^-1 (beta*V - (beta*exp(G)*K) S0)`` with ``A[i, j] = beta_i exp(G_i - G_j) k_i.k_j``
    for ``j < i``: one unit-lower-triangular solve per chunk, batched over all chunks, independent of ``S0``.
    Then per chunk ``O = (exp(G)*Q) S0 + (QK^T * decay) U`` and ``S = exp(G_end) S0 + (exp(G_end - G)*K)^T U``.
    """
    out_dtype, length = v.dtype, q.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    state = _start_state(initial_state, q, v)
    pad = -length % CHUNK

    def chunks(x):  # [N, HV, T(, d)] -> [N, HV, chunks, CHUNK(, d)], zero-padded: a zero token changes nothing
        x = torch.nn.functional.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(*x.shape[:2], -1, CHUNK, *x.shape[3:])

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    cum = g.cumsum(-1)
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    # exp(G_i - G_j) where j <= i, 0 above the diagonal (masked before exp: G_i - G_j > 0 there can overflow).
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    a = (k @ k.transpose(-1, -2)) * decay * beta[..., None]  # only its strictly lower part is read below
    values = torch.linalg.solve_triangular(a, v * beta[..., None], upper=False, unitriangular=True)
    keys = torch.linalg.solve_triangular(a, k * (beta * cum.exp())[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay
    q_from_start = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()
    outs = []
    for c in range(q.shape[2]):
        written = values[:, :, c] - keys[:, :, c] @ state
        outs.append(q_from_start[:, :, c] @ state + scores[:, :, c] @ written)
        state = state * chunk_decay[:, :, c, None, None] + k_to_end[:, :, c].transpose(-1, -2) @ written
    out = torch.stack(outs, 2).flatten(2, 3)[:, :, :length]
    return out.transpose(1, 2).to(out_dtype), state


@functools.cache
def _fla_chunk():
    """fla's chunked kernel, or None when fla is not installed (imported only for CUDA tensors: on a CPU-only
    machine its import warns that Triton has no GPU)."""
    if importlib.util.find_spec("fla") is None:
        return None
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    return fla_chunk


def fla_backward_blocked(device: torch.device) -> str | None:
    """Why fla cannot run the backward on ``device`` (its Hopper + Triton check, issue #640), or None."""
    import triton
    from packaging.version import Version

    hopper = torch.cuda.get_device_capability(device)[0] == 9
    if hopper and Version("3.4.0") <= Version(triton.__version__) < Version("3.7.1") \
            and importlib.util.find_spec("tilelang") is None:
        return f"fla's backward refuses Triton {triton.__version__} on Hopper (needs >= 3.7.1 or tilelang)"
    return None


@functools.cache
def _say_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def choose_backend(device: torch.device, needs_grad: bool) -> str:
    """``"fla"``, ``"fla-forward"`` (fla forward, PyTorch backward) or ``"torch"`` for a call on ``device``."""
    requested = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return "torch"
    if device.type != "cuda" or _fla_chunk() is None:
        missing = "fla runs on CUDA tensors only" if device.type != "cuda" else "fla is not installed (extra [fla])"
        if requested == "fla":
            raise RuntimeError(f"{BACKEND_ENV}=fla but {missing}")
        _say_once(f"gated delta rule: {missing}; using the PyTorch chunked path")
        return "torch"
    blocked = fla_backward_blocked(device) if needs_grad else None
    if blocked is None:
        return "fla"
    if requested == "fla":
        raise RuntimeError(f"{BACKEND_ENV}=fla but {blocked}")
    _say_once(f"gated delta rule: {blocked}; fla runs the forward, the PyTorch chunked path the backward")
    return "fla-forward"


def _fla_forward(q, k, v, g, beta, initial_state):
    out, state = _fla_chunk()(q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=True,
                              use_qk_l2norm_in_kernel=True)
    return out, state.float()


class _RecomputedBackward(torch.autograd.Function):
    """``forward_fn``'s outputs, keeping only the inputs; the backward re-runs :func:`chunk_gated_delta_rule` on them
    and differentiates that. Saves the fp32 chunk intermediates (most of a gated-delta layer's activation memory)
    and lets fla's forward pair with a PyTorch backward where fla's own backward cannot run."""

    @staticmethod
    def forward(ctx, forward_fn, q, k, v, g, beta, initial_state):
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        with torch.no_grad():
            return forward_fn(q, k, v, g, beta, initial_state)

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        inputs = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = chunk_gated_delta_rule(*inputs)
        pairs = [(o, g) for o, g in zip(outputs, (grad_out, grad_state)) if g is not None]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (None, *(next(grads) if t is not None and t.requires_grad else None for t in inputs))


def gated_delta_rule(q, k, v, g, beta, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [N, T, HV, dv] in v's dtype, final state [N, HV, dk, dv] fp32)``.

    ``q``, ``k``: ``[N, T, H, dk]`` (normalised here); ``v``: ``[N, T, HV, dv]`` with ``HV`` a multiple of ``H``;
    ``g`` (log decay, <= 0) and ``beta``: ``[N, T, HV]``; ``initial_state``: ``[N, HV, dk, dv]`` or None (zeros).
    Differentiable w.r.t. all of them; only the inputs are kept for the backward.
    """
    tensors = (q, k, v, g, beta) + (() if initial_state is None else (initial_state,))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    backend = choose_backend(q.device, needs_grad)
    if backend == "fla":  # fla's own autograd (it recomputes in its backward too)
        return _fla_forward(q, k, v, g, beta, initial_state)
    forward_fn = _fla_forward if backend == "fla-forward" else chunk_gated_delta_rule
    if not needs_grad:
        return forward_fn(q, k, v, g, beta, initial_state)
    return _RecomputedBackward.apply(forward_fn, q, k, v, g, beta, initial_state)
