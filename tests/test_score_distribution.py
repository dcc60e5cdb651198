"""score_distribution: Triton kernel vs the PyTorch reference (three-way rule), gradients, checks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zr_kernels
from zr_kernels import reference, score_distribution, trace_backends
from tests.helpers import ATOL, DEVICE, DTYPES, assert_three_way, strided_rows

VALUES9 = [1.0 + 0.5 * i for i in range(9)]


def _case(rows, vocab, num_bins, dtype, *, seed=0, strided=True):
    torch.manual_seed(seed)
    if strided:
        logits = strided_rows(rows, vocab, dtype)
    else:
        logits = (torch.randn(rows, vocab, device=DEVICE) * 3).to(dtype)
    ids = torch.randperm(vocab, device=DEVICE)[:num_bins]
    values = torch.linspace(1.0, 5.0, num_bins, device=DEVICE)
    target = torch.randint(0, num_bins, (rows,), device=DEVICE)
    return logits, ids, values, target


def _outputs_and_grads(fn, logits, ids, values, target, temperature, upstream):
    x = logits.detach().requires_grad_()
    out = fn(x, ids, values, target, temperature)
    loss = sum((o * u).sum() for o, u in zip(out, upstream))
    loss.backward()
    return list(out) + [x.grad]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab,num_bins", [(1, 32, 2), (7, 64, 5), (111, 300, 9), (507, 100, 17)])
def test_matches_reference_three_way(dtype, rows, vocab, num_bins):
    logits, ids, values, target = _case(rows, vocab, num_bins, dtype)
    temperature = 0.7
    upstream = [torch.randn(rows, num_bins, device=DEVICE)] + [torch.randn(rows, device=DEVICE) for _ in range(3)]
    triton_fn = lambda *a: score_distribution(*a, backend="triton")  # noqa: E731
    with trace_backends() as ran:
        kernel = _outputs_and_grads(triton_fn, logits, ids, values, target, temperature, upstream)
    assert ran == [("score_distribution", "triton"), ("score_distribution.backward", "triton")]
    eager = _outputs_and_grads(reference.score_distribution, logits, ids, values, target, temperature, upstream)
    ref32 = _outputs_and_grads(reference.score_distribution, logits.float(), ids, values, target, temperature,
                               upstream)
    for name, k, e, r in zip(("probs", "mean", "std", "nll", "grad_logits"), kernel, eager, ref32):
        assert_three_way(name, k, e, r, ATOL[dtype] * (10 if name == "grad_logits" else 1))
    assert kernel[-1].dtype == dtype
    off_slice = torch.ones(vocab, dtype=torch.bool, device=DEVICE)
    off_slice[ids] = False
    assert torch.all(kernel[-1][:, off_slice] == 0)


def test_leading_dims_and_strided_3d_view():
    torch.manual_seed(1)
    full = torch.randn(4, 6, 5, 40, device=DEVICE)
    logits = full[:, ::2, -1, :]  # [4, 3, 40]: leading dims cannot merge without a copy
    ids, values = [0, 5, 17, 39], [1.0, 2.0, 3.0, 4.0]
    target = torch.randint(0, 4, (4, 3), device=DEVICE)
    with trace_backends() as ran:
        out = score_distribution(logits, ids, values, target, backend="triton")
    assert ("score_distribution", "triton") in ran
    ref = reference.score_distribution(logits, ids, values, target)
    assert out.probs.shape == (4, 3, 4) and out.mean.shape == (4, 3) and out.nll.shape == (4, 3)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_neg_inf_logits_on_and_off_the_slice():
    logits = torch.randn(3, 20, device=DEVICE)
    ids = [2, 4, 6, 8]
    logits[:, 0] = float("-inf")  # off the slice: ignored
    logits[0, 4] = float("-inf")  # one score token impossible: probability 0
    target = torch.tensor([1, 0, 2], device=DEVICE)  # row 0 targets the impossible bin: nll = inf
    x1 = logits.clone().requires_grad_()
    out = score_distribution(x1, ids, VALUES9[:4], target, backend="triton")
    x2 = logits.clone().requires_grad_()
    ref = reference.score_distribution(x2, ids, VALUES9[:4], target)
    assert out.probs[0, 1] == 0 and torch.isinf(out.nll[0])
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    (out.mean.sum() + out.std.sum()).backward()
    (ref.mean.sum() + ref.std.sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_one_hot_distribution_has_zero_std_and_finite_gradient():
    logits = torch.zeros(2, 10, device=DEVICE)
    logits[:, 3] = 1e4
    x = logits.requires_grad_()
    out = score_distribution(x, [1, 3, 5], [1.0, 2.0, 3.0], backend="triton")
    assert torch.all(out.std == 0)
    out.std.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gradcheck_fp64():
    torch.manual_seed(2)
    logits = torch.randn(3, 12, dtype=torch.float64, device=DEVICE, requires_grad=True)
    target = torch.tensor([0, 2, 1], device=DEVICE)

    def fn(x):
        out = score_distribution(x, [1, 4, 7], [1.0, 2.5, 5.0], target, 1.3, backend="triton")
        return out.probs, out.mean, out.std, out.nll

    assert torch.autograd.gradcheck(fn, (logits,), atol=1e-5, rtol=1e-4)


def test_opcheck_and_compile():
    logits = strided_rows(5, 30, torch.float32).requires_grad_(False)
    ids = torch.tensor([3, 1, 29], device=DEVICE)
    values = torch.tensor([1.0, 3.0, 5.0], device=DEVICE)
    target = torch.tensor([0, 1, 2, 0, 1], device=DEVICE)
    torch.library.opcheck(torch.ops.zr_kernels.score_distribution.default, (logits, ids, values, target, 1.0, None))
    # ids checked on the device come with their repeated-ids flag
    torch.library.opcheck(torch.ops.zr_kernels.score_distribution.default,
                          (logits, ids, values, target, 1.0, torch.zeros(1, dtype=torch.int32, device=DEVICE)))

    compiled = torch.compile(
        lambda x: score_distribution(x, ids, values, target, backend="triton"), fullgraph=True)
    x = logits.clone().requires_grad_()
    with trace_backends() as ran:
        out = compiled(x)
        out.nll.sum().backward()
    assert ("score_distribution", "triton") in ran and ("score_distribution.backward", "triton") in ran
    ref = reference.score_distribution(logits, ids, values, target)
    torch.testing.assert_close(out.nll, ref.nll)


def test_auto_backend_follows_the_device_and_env_override(monkeypatch):
    # CPU tensors take the reference on every machine, a GPU one included.
    with trace_backends() as ran:
        score_distribution(torch.randn(2, 10, device="cpu"), [0, 1], [1.0, 2.0])
    assert ran == [("score_distribution", "reference")]
    logits = torch.randn(2, 10, device=DEVICE)
    with trace_backends() as ran:
        score_distribution(logits, [0, 1], [1.0, 2.0])
    assert ran == [("score_distribution", "triton" if DEVICE.type == "cuda" else "reference")]
    # The env var picks the kernel for test-device tensors (on CPU through the interpreter the suite runs under).
    monkeypatch.setenv(zr_kernels.BACKEND_ENV_VAR, "triton")
    with trace_backends() as ran:
        score_distribution(logits, [0, 1], [1.0, 2.0])
    assert ran == [("score_distribution", "triton")]


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    # About CPU tensors on purpose (a GPU machine runs it too): Triton needs CUDA or the interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        score_distribution(torch.randn(2, 10, device="cpu"), [0, 1], [1.0, 2.0], backend="triton")


def test_empty_rows():
    out = score_distribution(torch.randn(0, 10, device=DEVICE), [0, 1], [1.0, 2.0], backend="triton")
    assert out.probs.shape == (0, 2) and out.mean.shape == (0,)


# Argument checks run before any device work, so this table stays on the CPU on every machine.
GOOD = dict(logits=torch.randn(4, 10), token_ids=[1, 2, 3], values=[1.0, 2.0, 3.0])
BAD_INPUTS = [
    (dict(logits=torch.randint(0, 5, (4, 10))), TypeError, "logits"),
    (dict(logits=[[1.0, 2.0]]), TypeError, "logits"),
    (dict(logits=torch.tensor(1.0)), ValueError, "logits"),
    (dict(token_ids=[1, 1, 3]), ValueError, "unique"),
    (dict(token_ids=[1, 2, 10]), ValueError, "token_ids"),
    (dict(token_ids=[-1, 2, 3]), ValueError, "token_ids"),
    (dict(token_ids=torch.tensor([1.0, 2.0, 3.0])), TypeError, "token_ids"),
    (dict(token_ids=torch.tensor([[1, 2, 3]])), ValueError, "token_ids"),
    (dict(token_ids=[]), ValueError, "token_ids"),
    (dict(values=[1.0, 2.0]), ValueError, "values"),
    (dict(values=torch.tensor([1, 2, 3])), TypeError, "values"),
    (dict(values="abc"), TypeError, "values"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    (dict(target=torch.tensor([0, 1, 2, 3])), ValueError, "target"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0, 0.0])), TypeError, "target"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend="fast"), ValueError, "backend"),
]


@pytest.mark.parametrize("override,error,word", BAD_INPUTS, ids=[f"{e.__name__}-{w}" for _, e, w in BAD_INPUTS])
def test_bad_inputs_raise_before_launch(override, error, word):
    kwargs = {**GOOD, **override}
    with trace_backends() as ran, pytest.raises(error, match=word):
        score_distribution(**kwargs)
    assert ran == []


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(2, 9), st.floats(0.25, 4.0), st.integers(0, 2**16))
def test_probabilities_are_a_distribution_and_mean_in_range(rows, num_bins, temperature, seed):
    torch.manual_seed(seed)
    logits = torch.randn(rows, 16, device=DEVICE) * 5
    ids = torch.randperm(16, device=DEVICE)[:num_bins]
    values = torch.linspace(1.0, 5.0, num_bins, device=DEVICE)
    out = score_distribution(logits, ids, values, temperature=temperature, backend="triton")
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(rows, device=DEVICE))
    assert torch.all((out.mean >= 1.0 - 1e-5) & (out.mean <= 5.0 + 1e-5))
    assert torch.all(out.std <= 2.0 + 1e-5)
