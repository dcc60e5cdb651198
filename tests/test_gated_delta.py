"""zreward.scoring.gated_delta: the chunked PyTorch gated delta rule against the token-by-token reference, continuation
from a start state, and the choice between fla and PyTorch."""
import pytest
import torch

from zreward.scoring import gated_delta
from zreward.scoring.gated_delta import chunk_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule


def _inputs(batch, length, heads, value_heads, dk, dv, dtype=torch.float32, seed=0, start=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k = rand(batch, length, heads, dk), rand(batch, length, heads, dk)
    v = rand(batch, length, value_heads, dv)
    g = (-3 * torch.rand(batch, length, value_heads, generator=gen)).to(dtype)  # log decay, up to e^-3 per token
    beta = torch.rand(batch, length, value_heads, generator=gen).to(dtype)
    state = rand(batch, value_heads, dk, dv) if start else None
    return [q, k, v, g, beta, state]


@pytest.mark.parametrize("length", [1, 7, 64, 111, 130])
@pytest.mark.parametrize("heads, value_heads", [(2, 2), (1, 3)])
@pytest.mark.parametrize("start", [True, False])
def test_chunked_equals_recurrent(length, heads, value_heads, start):
    inputs = [t if t is None else t.requires_grad_() for t in _inputs(2, length, heads, value_heads, 8, 4,
                                                                        start=start)]
    leaves = [t for t in inputs if t is not None]
    out, state = chunk_gated_delta_rule(*inputs)
    ref_out, ref_state = recurrent_gated_delta_rule(*inputs)
    assert out.shape == (2, length, value_heads, 4) and state.shape == (2, value_heads, 8, 4)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-5)
    grad_out, grad_state = torch.randn_like(out), torch.randn_like(state)
    grads = torch.autograd.grad((out * grad_out).sum() + (state * grad_state).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum() + (ref_state * grad_state).sum(), leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_bf16_in_bf16_out_state_fp32():
    inputs = _inputs(1, 70, 2, 2, 8, 8, dtype=torch.bfloat16)
    out, state = chunk_gated_delta_rule(*inputs)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref_out, _ = recurrent_gated_delta_rule(*[t.float() for t in inputs])
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)


def test_continuing_from_the_state_equals_one_pass():
    """What prefix sharing relies on: a prefix, then the rest from the prefix's final state."""
    q, k, v, g, beta, _ = _inputs(2, 150, 2, 4, 8, 8, start=False)
    whole, final = chunk_gated_delta_rule(q, k, v, g, beta)
    cut = 70
    head, state = chunk_gated_delta_rule(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut])
    tail, final_tail = chunk_gated_delta_rule(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], state)
    torch.testing.assert_close(torch.cat([head, tail], 1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final_tail, final, rtol=1e-5, atol=1e-6)


def test_gradcheck_fp64():
    """Two chunks (67 tokens), grouped values, a start state; fast mode (random directions) keeps it quick."""
    inputs = [t.requires_grad_() for t in _inputs(1, 67, 1, 2, 4, 3, dtype=torch.float64)]
    assert torch.autograd.gradcheck(chunk_gated_delta_rule, inputs, fast_mode=True)


def test_cpu_runs_torch_and_keeps_only_inputs(monkeypatch):
    monkeypatch.delenv(gated_delta.BACKEND_ENV, raising=False)
    assert gated_delta.choose_backend(torch.device("cpu"), needs_grad=True) == "torch"
    inputs = [t.requires_grad_() for t in _inputs(2, 100, 2, 4, 8, 8)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, state = gated_delta_rule(*inputs)
    assert len(saved) == len(inputs) and all(any(s is t for t in inputs) for s in saved)
    ref_out, ref_state = recurrent_gated_delta_rule(*inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(out)
    for with_state in (True, False):  # the suffix pass does not use the final state
        loss = (out * grad_out).sum() + (state.sum() if with_state else 0)
        ref_loss = (ref_out * grad_out).sum() + (ref_state.sum() if with_state else 0)
        grads = torch.autograd.grad(loss, inputs, retain_graph=True)
        for got, want in zip(grads, torch.autograd.grad(ref_loss, inputs, retain_graph=True)):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_no_start_state_and_frozen_inputs():
    q, k, v, g, beta, _ = _inputs(1, 20, 1, 1, 4, 4)
    v.requires_grad_()
    out, _ = gated_delta_rule(q, k, v, g, beta)
    (grad,) = torch.autograd.grad(out.sum(), v)
    (ref,) = torch.autograd.grad(recurrent_gated_delta_rule(q, k, v, g, beta)[0].sum(), v)
    torch.testing.assert_close(grad, ref, rtol=1e-3, atol=1e-4)


def _fake_fla(monkeypatch, blocked):
    """fla replaced by the PyTorch path (recording its calls), its backward check by ``blocked``."""
    calls = []

    def fla(q, k, v, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False):
        calls.append(dict(grad=torch.is_grad_enabled(), initial_state=initial_state,
                          output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel))
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state)

    monkeypatch.setattr(gated_delta, "_fla_chunk", lambda: fla)
    monkeypatch.setattr(gated_delta, "fla_backward_blocked", lambda device: blocked)
    gated_delta._say_once.cache_clear()
    return calls


@pytest.mark.parametrize("backend", ["fla", "fla-forward"])
def test_fla_paths(monkeypatch, backend):
    calls = _fake_fla(monkeypatch, blocked=None)
    monkeypatch.setattr(gated_delta, "choose_backend", lambda device, needs_grad: backend)
    inputs = [t.requires_grad_() for t in _inputs(1, 9, 1, 2, 4, 4)]
    out, state = gated_delta_rule(*inputs)
    # fla-forward: fla's forward without a graph, the gradient from the PyTorch path.
    assert calls == [dict(grad=backend == "fla", initial_state=inputs[-1], output_final_state=True,
                          use_qk_l2norm_in_kernel=True)]
    assert state.dtype == torch.float32
    grads = torch.autograd.grad(out.sum() + state.sum(), inputs)
    ref_out, ref_state = recurrent_gated_delta_rule(*inputs)
    for got, want in zip(grads, torch.autograd.grad(ref_out.sum() + ref_state.sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_fla_backward_blocked_says_one_line(monkeypatch):
    monkeypatch.delenv(gated_delta.BACKEND_ENV, raising=False)
    _fake_fla(monkeypatch, blocked=None)
    assert gated_delta.choose_backend(torch.device("cuda"), needs_grad=True) == "fla"
    _fake_fla(monkeypatch, blocked="fla's backward refuses Triton 3.6.0 on Hopper")
    with pytest.warns(RuntimeWarning, match="refuses Triton 3.6.0 on Hopper; fla runs the forward, the PyTorch"):
        assert gated_delta.choose_backend(torch.device("cuda"), needs_grad=True) == "fla-forward"
    assert gated_delta.choose_backend(torch.device("cuda"), needs_grad=False) == "fla"  # forward-only unaffected
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "fla")
    with pytest.raises(RuntimeError, match="=fla but fla's backward refuses"):
        gated_delta.choose_backend(torch.device("cuda"), needs_grad=True)


def test_fla_missing(monkeypatch):
    monkeypatch.delenv(gated_delta.BACKEND_ENV, raising=False)
    monkeypatch.setattr(gated_delta, "_fla_chunk", lambda: None)
    gated_delta._say_once.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"fla is not installed \(extra \[fla\]\); using the PyTorch"):
        assert gated_delta.choose_backend(torch.device("cuda"), needs_grad=False) == "torch"


def test_backend_env(monkeypatch):
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "torch")
    _fake_fla(monkeypatch, blocked=None)
    assert gated_delta.choose_backend(torch.device("cuda"), needs_grad=False) == "torch"
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "fla")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        gated_delta.choose_backend(torch.device("cpu"), needs_grad=False)
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match=gated_delta.BACKEND_ENV):
        gated_delta.choose_backend(torch.device("cpu"), needs_grad=False)


@pytest.mark.parametrize("capability, version, tilelang, blocked", [
    ((9, 0), "3.6.0", False, True), ((9, 0), "3.7.1", False, False), ((9, 0), "3.6.0", True, False),
    ((8, 0), "3.6.0", False, False), ((9, 0), "3.3.1", False, False),
])
def test_fla_backward_blocked(monkeypatch, capability, version, tilelang, blocked):
    import importlib.util

    import triton

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if tilelang else None) if name == "tilelang" else real_find_spec(name))
    reason = gated_delta.fla_backward_blocked(torch.device("cuda"))
    assert (reason is not None) == blocked
    if blocked:
        assert "Hopper" in reason and version in reason


def test_bad_head_counts():
    q, k, v, g, beta, _ = _inputs(1, 4, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="multiple of q's 2 heads"):
        chunk_gated_delta_rule(q, k, v, g, beta)
