"""slice_kl: Triton kernels against the PyTorch reference (three-way rule), TRL and Liger parity, autograd,
torch.library registration and argument checks."""
from __future__ import annotations

import pytest
import torch

import zr_kernels
from zr_kernels import SliceKLLoss, reference, slice_kl
from zr_kernels.kernels import slice_kl as slice_kl_kernels
from tests.helpers import ATOL, DEVICE, DTYPES, assert_three_way, strided_rows

RAN = [("slice_kl", "triton"), ("slice_kl.backward", "triton")]
# (N, K, V, temperature): odd row counts, every block-size regime, V across several BLOCK_V chunks.
SLICE_SHAPES = [(1, 2, 40, 1.0), (7, 5, 64, 0.7), (111, 9, 300, 2.0), (507, 17, 100, 1.3)]
VOCAB_SHAPES = [(1, 2, 32, 1.0), (7, 5, 1000, 0.7), (111, 9, 700, 2.0), (3, 17, 50_000, 1.3)]
MODES = [("slice", 0.0), ("slice", 0.5), ("slice", 1.0), ("vocab", 0.0)]


def _inputs(n, k, v, dtype, *, seed=0):
    """Strided ``[n, v]`` logits, unique ids, and teacher rows with zeros: every third row puts no teacher mass on
    bin 0, where the student logit is -inf (finite in every mode), and one off-slice logit is -inf."""
    torch.manual_seed(seed)
    logits = strided_rows(n, v, dtype)
    ids = torch.randperm(v)[:k].to(DEVICE)
    teacher = torch.softmax(torch.randn(n, k, device=DEVICE) * 2, dim=-1)
    teacher[::3, 0] = 0.0
    teacher = (teacher / teacher.sum(-1, keepdim=True)).to(dtype)
    logits[::3, ids[0]] = float("-inf")
    off_slice = torch.ones(v, dtype=torch.bool, device=DEVICE)
    off_slice[ids] = False
    logits[:, int(off_slice.nonzero()[0])] = float("-inf")
    return logits.requires_grad_(), teacher, ids


def _loss_and_grad(fn, logits, upstream):
    loss = fn(logits)
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    return loss, grad


def _check_three_way(logits, teacher, ids, normalize, beta, temperature, seed=1):
    """Kernel (input dtype) vs reference (input dtype) vs reference (fp64 copies), loss and gradient."""
    dtype = logits.dtype
    upstream = torch.randn(logits.shape[0], device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed))
    with zr_kernels.trace_backends() as ran:
        kernel = _loss_and_grad(lambda x: slice_kl(x, teacher, ids, normalize, beta, temperature, "none",
                                                    backend="triton"), logits, upstream)
    assert ran == RAN
    eager = _loss_and_grad(lambda x: reference.slice_kl(x, teacher, ids, normalize, beta, temperature, "none"),
                           logits, upstream)
    exact_logits = logits.detach().double().requires_grad_()
    exact = _loss_and_grad(lambda x: reference.slice_kl(x, teacher.double(), ids, normalize, beta, temperature,
                                                        "none"), exact_logits, upstream.double())
    assert kernel[0].dtype == torch.float32 and kernel[1].dtype == dtype
    assert_three_way("loss", kernel[0], eager[0], exact[0], ATOL[dtype])
    assert_three_way("grad_logits", kernel[1], eager[1], exact[1], ATOL[dtype])
    return kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SLICE_SHAPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_slice_mode_three_way(shape, beta, dtype):
    n, k, v, temperature = shape
    logits, teacher, ids = _inputs(n, k, v, dtype)
    _, grad = _check_three_way(logits, teacher, ids, "slice", beta, temperature)
    off_slice = torch.ones(v, dtype=torch.bool, device=DEVICE)
    off_slice[ids] = False
    assert not grad[:, off_slice].any(), "slice mode must leave the V - K other columns at zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", VOCAB_SHAPES, ids=str)
def test_vocab_mode_three_way(shape, dtype):
    n, k, v, temperature = shape
    logits, teacher, ids = _inputs(n, k, v, dtype)
    _check_three_way(logits, teacher, ids, "vocab", 0.0, temperature)


@pytest.mark.parametrize("target_programs", [1, 10])
def test_vocab_mode_split_layouts(monkeypatch, target_programs):
    """One program per row block looping over all of V, and rows split over several programs of several chunks."""
    monkeypatch.setattr(slice_kl_kernels, "TARGET_PROGRAMS", target_programs)
    logits, teacher, ids = _inputs(5, 9, 20_000, torch.float32)
    _check_three_way(logits, teacher, ids, "vocab", 0.0, 0.9)


def test_vocab_mode_penalises_mass_off_the_slice():
    logits, teacher, ids = _inputs(4, 3, 50, torch.float32)
    teacher = torch.softmax(logits.detach()[:, ids], dim=-1)  # the student's slice matches the teacher exactly
    slice_loss = slice_kl(logits, teacher, ids, "slice", reduction="none", backend="triton")
    vocab_loss = slice_kl(logits, teacher, ids, "vocab", reduction="none", backend="triton")
    assert torch.allclose(slice_loss, torch.zeros_like(slice_loss), atol=1e-6)
    # log q_vocab = log q_slice + log(mass on the slice), so the loss is -log(mass on the slice) per row.
    mass = torch.softmax(logits.detach().float(), -1)[:, ids].sum(-1)
    assert torch.allclose(vocab_loss, -mass.log(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("normalize,beta", [("slice", 0.3), ("vocab", 0.0)])
def test_reductions(reduction, normalize, beta):
    logits, teacher, ids = _inputs(7, 5, 300, torch.float32)
    with zr_kernels.trace_backends() as ran:
        loss = slice_kl(logits, teacher, ids, normalize, beta, 1.0, reduction, backend="triton")
        (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert ran == RAN
    expected = reference.slice_kl(logits, teacher, ids, normalize, beta, 1.0, reduction)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    assert loss.shape == expected.shape == ((7,) if reduction == "none" else ())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    if reduction == "mean" and normalize == "slice":  # the kl_div convention: divide by N·K
        log_q = torch.log_softmax(logits.detach()[:, ids] / 1.0, -1)
        safe = teacher > 0  # kl_div itself gives nan at 0·log 0 where the student logit is -inf
        torch.testing.assert_close(
            slice_kl(logits, teacher, ids, "slice", reduction="mean", backend="triton"),
            torch.nn.functional.kl_div(log_q[safe], teacher[safe], reduction="sum") / teacher.numel())


@pytest.mark.parametrize("normalize,beta,infinite_rows", [
    ("slice", 0.0, [True, False, False, False]),  # teacher mass on a token the student rules out (row 0)
    ("vocab", 0.0, [True, False, False, False]),
    ("slice", 0.5, [False, False, False, False]),  # the generalized JSD is bounded
    ("slice", 1.0, [True, False, True, True]),  # student mass on a token the teacher rules out
])
def test_infinite_losses(normalize, beta, infinite_rows):
    torch.manual_seed(0)
    logits = torch.randn(4, 20, device=DEVICE)
    logits[0, 3] = float("-inf")
    logits = logits.requires_grad_()
    ids = [3, 7, 11]
    teacher = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], device=DEVICE)
    loss = slice_kl(logits, teacher, ids, normalize, beta, reduction="none", backend="triton")
    expected = reference.slice_kl(logits, teacher, ids, normalize, beta, reduction="none")
    torch.testing.assert_close(loss, expected)
    assert torch.isinf(loss).tolist() == infinite_rows
    if beta < 1:  # forward KL keeps a finite gradient (-p on the ruled-out token) even where the loss is +inf
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), logits)[0])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.8, 1.0])
def test_trl_generalized_jsd_parity(beta, reduction):
    gkd = pytest.importorskip("trl.experimental.gkd")
    torch.manual_seed(0)
    temperature = 0.8
    logits = torch.randn(6, 50, device=DEVICE, requires_grad=True)
    ids = torch.tensor([4, 9, 17, 30, 41], device=DEVICE)
    teacher = torch.softmax(torch.randn(6, 5, device=DEVICE), -1)
    loss = slice_kl(logits, teacher, ids, "slice", beta, temperature, reduction, backend="triton")
    # TRL divides the teacher logits by the temperature too; these come back to log(teacher_probs).
    expected = gkd.GKDTrainer.generalized_jsd_loss(logits[:, ids], temperature * teacher.log(), beta=beta,
                                                   temperature=temperature, reduction=reduction)
    if reduction == "none":
        expected = expected.sum(-1)  # TRL keeps [N, K]
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(*(torch.autograd.grad(out.sum(), logits)[0] for out in (loss, expected)))


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_liger_jsd_parity(beta):
    liger = pytest.importorskip("liger_kernel.transformers")
    torch.manual_seed(0)
    logits = torch.randn(6, 30, device=DEVICE, requires_grad=True)
    ids = [2, 5, 11, 29]
    teacher = torch.softmax(torch.randn(6, 4, device=DEVICE), -1)
    loss = slice_kl(logits, teacher, ids, beta=beta, backend="triton")  # batchmean, as LigerJSD
    expected = liger.LigerJSD(beta=beta)(torch.log_softmax(logits[:, ids], -1), teacher.log())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(*(torch.autograd.grad(out, logits)[0] for out in (loss, expected)))


@pytest.mark.parametrize("normalize,beta", MODES)
def test_gradcheck_fp64(normalize, beta):
    torch.manual_seed(0)
    logits = torch.randn(2, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 3, device=DEVICE, dtype=torch.float64), -1)
    ids = [0, 5, 6]
    args = (teacher, ids, normalize, beta, 0.9, "none")
    assert torch.autograd.gradcheck(lambda x: reference.slice_kl(x, *args), (logits,))
    # The kernels compute in fp32, so their finite differences need a coarser step and tolerance.
    assert torch.autograd.gradcheck(lambda x: slice_kl(x, *args, backend="triton").double(), (logits,),
                                    eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("normalize,beta", MODES)
def test_opcheck(normalize, beta):
    logits, teacher, ids = _inputs(5, 3, 40, torch.float32)
    args = (logits, teacher, ids, normalize == "vocab", beta, 0.9, None)
    torch.library.opcheck(torch.ops.zr_kernels.slice_kl.default, args)
    # ids checked on the device come with their repeated-ids flag
    torch.library.opcheck(torch.ops.zr_kernels.slice_kl.default, args[:-1] + (torch.zeros(1, dtype=torch.int32),))
    with torch.no_grad():
        _, lse = torch.ops.zr_kernels.slice_kl.default(*args)
    torch.library.opcheck(torch.ops.zr_kernels.slice_kl_backward.default,
                          (torch.randn(5, device=DEVICE), logits.detach(), teacher, ids, lse) + args[3:6])


def test_torch_compile_fullgraph():
    logits, teacher, ids = _inputs(7, 5, 300, torch.bfloat16)

    def both_modes(x):
        return (slice_kl(x, teacher, ids, "slice", 0.5, 0.9, backend="triton")
                + slice_kl(x, teacher, ids, "vocab", 0.0, 0.9, "mean", backend="triton"))

    compiled = torch.compile(both_modes, fullgraph=True)
    with zr_kernels.trace_backends() as ran:
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
    assert sorted(set(ran)) == RAN and len(ran) == 4
    expected = both_modes(logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0])


def test_module_and_backends():
    logits, teacher, ids = _inputs(7, 5, 64, torch.float32)
    loss_fn = SliceKLLoss(ids.tolist(), beta=0.5, temperature=0.8, reduction="sum", backend="triton")
    assert "beta=0.5" in repr(loss_fn) and loss_fn.token_ids.tolist() == ids.tolist()
    torch.testing.assert_close(loss_fn(logits, teacher), slice_kl(logits, teacher, ids, "slice", 0.5, 0.8, "sum",
                                                                  backend="triton"))
    expected_backend = "triton" if DEVICE.type == "cuda" else "reference"
    with zr_kernels.trace_backends() as ran:
        slice_kl(logits, teacher, ids, backend="auto")
    assert ran == [("slice_kl", expected_backend)]
    teacher.requires_grad_()  # used as given: no gradient flows to the teacher
    slice_kl(logits, teacher, ids, backend="triton").backward()
    assert teacher.grad is None and logits.grad is not None
    empty = slice_kl(logits[:0], teacher[:0], ids, reduction="none", backend="triton")
    assert empty.shape == (0,)


def _bad_inputs():
    x = torch.randn(4, 10, device=DEVICE)
    p = torch.softmax(torch.randn(4, 3, device=DEVICE), -1)
    ids = [1, 4, 7]
    other = "meta" if DEVICE.type == "cpu" else "cpu"
    return [
        ("student_logits", TypeError, (x.long(), p, ids), {}),
        ("student_logits", ValueError, (x[0], p, ids), {}),
        ("teacher_probs", TypeError, (x, p.long(), ids), {}),
        ("teacher_probs", ValueError, (x, p[:3], ids), {}),
        ("teacher_probs", ValueError, (x, p, [1, 4]), {}),
        ("teacher_probs", ValueError, (x, p.to(other), ids), {}),
        ("token_ids", TypeError, (x, p, torch.tensor([1.0, 4.0, 7.0], device=DEVICE)), {}),
        ("token_ids", ValueError, (x, p, [1, 4, 10]), {}),
        ("token_ids", ValueError, (x, p, [1, 4, 4]), {}),
        ("normalize", ValueError, (x, p, ids), {"normalize": "full"}),
        ("beta", ValueError, (x, p, ids), {"beta": 1.5}),
        ("beta", ValueError, (x, p, ids), {"beta": -0.1}),
        ("beta", TypeError, (x, p, ids), {"beta": "0.5"}),
        ("beta", ValueError, (x, p, ids), {"beta": 0.5, "normalize": "vocab"}),
        ("temperature", ValueError, (x, p, ids), {"temperature": 0.0}),
        ("temperature", ValueError, (x, p, ids), {"temperature": -1.0}),
        ("reduction", ValueError, (x, p, ids), {"reduction": "elementwise_mean"}),
        ("backend", ValueError, (x, p, ids), {"backend": "cuda"}),
    ]


@pytest.mark.parametrize("name,error,args,kwargs", _bad_inputs(),
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(_bad_inputs())])
def test_bad_inputs(name, error, args, kwargs):
    with zr_kernels.trace_backends() as ran, pytest.raises(error, match=name):
        slice_kl(*args, **{"backend": "triton", **kwargs})
    assert ran == []
