"""What the interpreter alone does not show: strided score ids, the launch device, the launch record, mixed
precision under autocast, and numpy / 0-d tensor arguments (each case once broke on a GPU or in a trainer)."""
import contextlib

import numpy as np
import pytest
import torch

import zr_kernels._backend as backend_module
from zr_kernels import (ScoreHead, gdso_rewards, group_advantages, linear_score, pairwise_gap, reference,
                        score_distribution, slice_kl, trace_backends)
from zr_kernels.kernels import group_advantages as ga_kernels
from zr_kernels.kernels import linear_score as ls_kernels
from zr_kernels.kernels import pairwise_gap as pg_kernels
from zr_kernels.kernels import score_distribution as sd_kernels
from zr_kernels.kernels import slice_kl as kl_kernels
from tests.helpers import ATOL, DEVICE, assert_three_way

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _strided_ids(ids, device=DEVICE):
    """The ids as column 0 of a ``[K, 2]`` table: a view with stride 2, like ``table[:, 0]``."""
    table = torch.zeros(len(ids), 2, dtype=torch.int64, device=device)
    table[:, 0] = torch.tensor(ids, device=device)
    view = table[:, 0]
    assert view.stride() == (2,)
    return view


# ---- strided score ids: the device-side id path (CUDA ids, and every traced call) ----

def test_strided_ids_under_compile_score_distribution():
    torch.manual_seed(0)
    logits, values = torch.randn(5, 50, device=DEVICE), torch.tensor([1.0, 2.0, 3.0, 4.0], device=DEVICE)
    ids = _strided_ids([3, 7, 11, 20])
    compiled = torch.compile(lambda x, i: score_distribution(x, i, values, backend="triton"), fullgraph=True)
    with trace_backends() as ran:
        out = compiled(logits, ids)
    assert ("score_distribution", "triton") in ran
    ref = reference.score_distribution(logits, ids.contiguous(), values, None, 1.0)
    torch.testing.assert_close(out.probs, ref.probs)
    torch.testing.assert_close(out.mean, ref.mean)


def test_strided_ids_under_compile_slice_kl():
    torch.manual_seed(1)
    logits, teacher = torch.randn(6, 40, device=DEVICE), torch.rand(6, 4, device=DEVICE).softmax(-1)
    ids = _strided_ids([2, 9, 17, 33])
    for normalize in ("slice", "vocab"):
        compiled = torch.compile(lambda x, i: slice_kl(x, teacher, i, normalize, reduction="none", backend="triton"),
                                 fullgraph=True)
        ref = reference.slice_kl(logits, teacher, ids.contiguous(), normalize, 0.0, 1.0, "none")
        torch.testing.assert_close(compiled(logits, ids), ref)


@gpu_only
@pytest.mark.gpu
def test_strided_cuda_ids_eager():
    torch.manual_seed(2)
    logits, values = torch.randn(7, 64, device="cuda"), torch.tensor([1.0, 2.0, 3.0], device="cuda")
    ids = _strided_ids([5, 6, 60], device="cuda")
    out = score_distribution(logits, ids, values, backend="triton")
    torch.testing.assert_close(out.probs, reference.score_distribution(logits, ids.contiguous(), values, None,
                                                                       1.0).probs)
    teacher = torch.rand(7, 3, device="cuda").softmax(-1)
    torch.testing.assert_close(slice_kl(logits, teacher, ids, backend="triton"),
                               reference.slice_kl(logits, teacher, ids.contiguous(), "slice", 0.0, 1.0, "batchmean"))


# ---- the launch device ----

def test_launch_guard_switches_only_to_another_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(backend_module.launch_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(backend_module.launch_guard(torch.device("cuda", 0)), contextlib.nullcontext)
    guard = backend_module.launch_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def _ops_fwd_bwd():
    """One forward + backward of every Triton op on small CPU/GPU inputs."""
    torch.manual_seed(3)
    logits = torch.randn(4, 30, device=DEVICE, requires_grad=True)
    score_distribution(logits, [1, 2, 3], [1.0, 2.0, 3.0], backend="triton").mean.sum().backward()
    slice_kl(logits, torch.rand(4, 3, device=DEVICE).softmax(-1), [1, 2, 3], "vocab", backend="triton").backward()
    mu_w = torch.rand(3, 4, device=DEVICE, requires_grad=True)
    pairwise_gap(mu_w, torch.rand(3, 4, device=DEVICE), torch.rand(3, device=DEVICE), 4.0,
                 backend="triton").loss.sum().backward()
    gdso_rewards(mu_w, mu_w, mu_w[:, 0], mu_w[:, 1], 1.0, 5.0, 1.0, 1.0, backend="triton")
    group_advantages(torch.rand(8, device=DEVICE), 4, "batch", backend="triton")
    hidden = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    linear_score(hidden, weight, [1.0, 2.0, 3.0], backend="triton").mean.sum().backward()


def test_every_launch_goes_through_the_device_guard(monkeypatch):
    seen = []

    def recording_guard(device):
        seen.append(device)
        return contextlib.nullcontext()

    for module in (sd_kernels, kl_kernels, pg_kernels, ga_kernels, ls_kernels):
        monkeypatch.setattr(module, "launch_guard", recording_guard)
    with trace_backends() as ran:
        _ops_fwd_bwd()
    # One guard per launch site that ran (slice_kl's two vocab-mode kernels share one).
    assert len(seen) == len(ran) and all(device == DEVICE for device in seen)


@two_gpus
@pytest.mark.gpu
def test_ops_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    torch.manual_seed(4)
    logits = torch.randn(33, 1000, device="cuda:1", requires_grad=True)
    ids, values = [3, 500, 999], [1.0, 3.0, 5.0]
    out = score_distribution(logits, ids, values, backend="triton")
    out.mean.sum().backward()
    check = logits.detach().clone().requires_grad_()
    ref = reference.score_distribution(check, torch.tensor(ids, device="cuda:1"),
                                       torch.tensor(values, device="cuda:1"), None, 1.0)
    ref.mean.sum().backward()
    torch.testing.assert_close(out.probs, ref.probs)
    torch.testing.assert_close(logits.grad, check.grad)
    hidden, weight = torch.randn(40, 64, device="cuda:1"), torch.randn(3, 64, device="cuda:1")
    for chosen in ("triton", "cuda"):
        torch.testing.assert_close(linear_score(hidden, weight, values, backend=chosen).probs,
                                   reference.linear_score(hidden, weight, torch.tensor(values, device="cuda:1"),
                                                          None, None, 1.0).probs)
    assert torch.cuda.current_device() == 0


# ---- the launch record ----

def test_zero_row_calls_record_no_launch():
    values = [1.0, 2.0]
    with trace_backends() as ran:
        score_distribution(torch.empty(0, 10, device=DEVICE), [1, 2], values, backend="triton")
        slice_kl(torch.empty(0, 10, device=DEVICE), torch.empty(0, 2, device=DEVICE), [1, 2], backend="triton")
        pairwise_gap(torch.empty(0, 3, device=DEVICE), torch.empty(0, 3, device=DEVICE),
                     torch.empty(0, device=DEVICE), 1.0, backend="triton")
        group_advantages(torch.empty(0, device=DEVICE), 2, backend="triton")
        linear_score(torch.empty(0, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE), values, backend="triton")
    assert ran == []


def test_linear_score_backward_records_each_kernel():
    hidden = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    with trace_backends() as ran:
        linear_score(hidden, weight, [1.0, 2.0], backend="triton").mean.sum().backward()
    assert ran == [("linear_score", "triton"), ("linear_score.backward", "triton"),
                   ("linear_score.grad_hidden", "triton"), ("linear_score.grad_weight", "triton")]
    with trace_backends() as ran:  # no weight gradient wanted: its kernels do not run
        linear_score(hidden, weight.detach(), [1.0, 2.0], backend="triton").mean.sum().backward()
    assert ran == [("linear_score", "triton"), ("linear_score.backward", "triton"),
                   ("linear_score.grad_hidden", "triton")]


# ---- mixed precision ----

@pytest.mark.parametrize("chosen", ["triton", "reference", pytest.param("cuda", marks=gpu_only)])
@pytest.mark.parametrize("lm_head", [False, True], ids=["head", "lm_head"])
def test_linear_score_under_autocast_with_fp32_weights(chosen, lm_head):
    torch.manual_seed(5)
    rows, dim, vocab = 6, 24, 40
    ids = [4, 9, 31] if lm_head else None
    hidden = torch.randn(rows, dim, device=DEVICE).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(vocab if lm_head else 3, dim, device=DEVICE, requires_grad=True)
    bias = torch.randn(weight.shape[0], device=DEVICE, requires_grad=True)
    values = [1.0, 3.0, 5.0]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = linear_score(hidden, weight, values, ids, bias, backend=chosen)
    assert out.probs.dtype == torch.float32
    (out.mean.sum() + out.std.sum()).backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == bias.grad.dtype == torch.float32
    # The same as casting by hand (what F.linear does under autocast): the reference in bf16, and in fp32 on the
    # bf16-rounded inputs (the exact products of what the kernel multiplies).
    rows_w = (weight.detach()[ids] if lm_head else weight.detach()).bfloat16()
    rows_b = (bias.detach()[ids] if lm_head else bias.detach()).bfloat16()
    values_t = torch.tensor(values, device=DEVICE)
    eager = reference.linear_score(hidden.detach(), rows_w, values_t, None, rows_b, 1.0)
    exact = reference.linear_score(hidden.detach().float(), rows_w.float(), values_t, None, rows_b.float(), 1.0)
    for name in ("probs", "mean", "std"):
        assert_three_way(name, getattr(out, name), getattr(eager, name), getattr(exact, name), ATOL[torch.bfloat16])
    if lm_head:
        off = torch.ones(vocab, dtype=torch.bool, device=DEVICE)
        off[ids] = False
        assert torch.all(weight.grad[off] == 0) and torch.any(weight.grad[~off] != 0)


def test_score_head_in_an_autocast_trainer_step():
    torch.manual_seed(6)
    head = ScoreHead(16, [1.0, 2.0, 3.0, 4.0], bias=True, device=DEVICE)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    hidden = torch.randn(8, 16, device=DEVICE)
    before = head.weight.detach().clone()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = head(hidden.bfloat16(), backend="triton").mean.mean()
    loss.backward()
    optimizer.step()
    assert head.weight.dtype == torch.float32 and not torch.equal(head.weight, before)


def test_mismatched_dtypes_outside_autocast_still_raise():
    with pytest.raises(TypeError, match="weight.*autocast"):
        linear_score(torch.randn(2, 8, dtype=torch.bfloat16, device=DEVICE), torch.randn(3, 8, device=DEVICE),
                     [1.0, 2.0, 3.0], backend="triton")


# ---- numbers as numeric code passes them ----

SCALARS = [np.float32(0.7), np.float64(0.7), torch.tensor(0.7), torch.tensor(0.7, dtype=torch.float64)]


@pytest.mark.parametrize("temperature", SCALARS, ids=lambda x: type(x).__name__ + str(getattr(x, "dtype", "")))
def test_numpy_and_0d_tensor_floats(temperature):
    torch.manual_seed(7)
    logits = torch.randn(4, 20, device=DEVICE)
    expected = score_distribution(logits, [1, 5, 9], [1.0, 2.0, 3.0], temperature=0.7, backend="triton")
    got = score_distribution(logits, [1, 5, 9], [1.0, 2.0, 3.0], temperature=temperature, backend="triton")
    torch.testing.assert_close(got.probs, expected.probs)
    teacher = torch.rand(4, 3, device=DEVICE).softmax(-1)
    torch.testing.assert_close(slice_kl(logits, teacher, [1, 5, 9], beta=temperature, temperature=temperature,
                                        backend="triton"),
                               slice_kl(logits, teacher, [1, 5, 9], beta=0.7, temperature=0.7, backend="triton"))
    mu = torch.rand(3, 4, device=DEVICE)
    torch.testing.assert_close(pairwise_gap(mu, mu.flip(1), mu[:, 0], temperature, backend="triton").loss,
                               pairwise_gap(mu, mu.flip(1), mu[:, 0], 0.7, backend="triton").loss)
    torch.testing.assert_close(
        gdso_rewards(mu, mu, mu[:, 0], mu[:, 1], np.float64(1.0), torch.tensor(5.0), temperature, np.int64(2),
                     backend="triton"),
        gdso_rewards(mu, mu, mu[:, 0], mu[:, 1], 1.0, 5.0, 0.7, 2.0, backend="triton"))


@pytest.mark.parametrize("group_size", [np.int64(4), np.int32(4), torch.tensor(4)], ids=lambda x: type(x).__name__)
def test_numpy_and_0d_tensor_ints(group_size):
    rewards = torch.rand(8, device=DEVICE)
    torch.testing.assert_close(group_advantages(rewards, group_size, eps=np.float32(1e-6), backend="triton"),
                               group_advantages(rewards, 4, eps=1e-6, backend="triton"))
    logits = torch.randn(2, 12, device=DEVICE)
    torch.testing.assert_close(score_distribution(logits, np.array([1, 4]), [1.0, 2.0], backend="triton").probs,
                               score_distribution(logits, [1, 4], [1.0, 2.0], backend="triton").probs)


@pytest.mark.parametrize("bad", [np.bool_(True), torch.tensor([1.0, 2.0]), torch.tensor(True), "0.5", None])
def test_non_numbers_are_refused_by_name(bad):
    with pytest.raises(TypeError, match="temperature"), trace_backends() as ran:
        score_distribution(torch.randn(2, 5, device=DEVICE), [1, 2], [1.0, 2.0], temperature=bad, backend="triton")
    assert ran == []
    with pytest.raises(TypeError, match="group_size"):
        group_advantages(torch.rand(4, device=DEVICE), torch.tensor(2.0), backend="triton")
