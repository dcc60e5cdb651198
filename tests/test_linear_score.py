"""linear_score / ScoreHead: the CUDA extension builds and imports; Triton (interpreter on CPU) and, on a GPU,
the CUDA extension against the PyTorch reference (three-way rule), gradients, registration, checks."""
import os
import shutil

import pytest
import torch

from zr_kernels import ScoreHead, linear_score, reference, trace_backends
from tests.helpers import ATOL, DEVICE, DTYPES, assert_three_way, strided_rows

ON_GPU = DEVICE.type == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def _nvcc_present() -> bool:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.exists(os.path.join(h, "bin", "nvcc")) for h in homes)


def _extension():
    try:
        from zr_kernels import _C
    except ImportError as error:
        if os.environ.get("ZR_KERNELS_CUDA") == "0":
            pytest.skip("the CUDA extension was not built: ZR_KERNELS_CUDA=0")
        if not _nvcc_present():
            pytest.skip("the CUDA extension was not built: nvcc is absent")
        pytest.fail(f"nvcc is present but zr_kernels._C does not import (pip install -e . builds it): {error}")
    return _C


def test_extension_is_built_and_imports_without_a_gpu():
    ext = _extension()
    assert ext.MAX_SCORE_ROWS == 32
    for name in ("forward", "grad_logits", "grad_hidden", "weight_splits", "grad_weight"):
        assert callable(getattr(ext, name))
    # Bad sizes are a ValueError before any CUDA call (so this runs without a GPU).
    with pytest.raises(ValueError, match="K = 33"):
        ext.forward(0, 0, 1, 8, 8, 1, 0, 33, 8, 1, 0, 0, 0, 33, 0, 1.0, 0, 0, 0, 0, 0)
    if not torch.cuda.is_available():
        # A CUDA error (here: no usable GPU) is a Python exception, never a process exit.
        with pytest.raises(RuntimeError, match="zr_kernels CUDA error"):
            ext.weight_splits(64, 64, 0)


def _case(rows, dim, vocab, num_bins, dtype, *, lm_head, bias=True, seed=0):
    torch.manual_seed(seed)
    hidden = strided_rows(rows, dim, dtype, scale=1.0)
    weight = (torch.randn(vocab if lm_head else num_bins, dim, device=DEVICE) * dim ** -0.5).to(dtype)
    ids = torch.randperm(vocab, device=DEVICE)[:num_bins] if lm_head else None
    b = (torch.randn(weight.shape[0], device=DEVICE) * 0.5).to(dtype) if bias else None
    values = torch.linspace(1.0, 5.0, num_bins, device=DEVICE)
    return hidden, weight, ids, b, values


def _run(fn, hidden, weight, ids, bias, values, temperature, upstream, target=None):
    """Outputs (nll too with a target), then the gradients of hidden, weight (and bias) for a random upstream
    gradient of each output."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(leaves[0], leaves[1], values, ids, leaves[2] if bias is not None else None, temperature, target)
    assert (out.nll is None) == (target is None)
    outputs = list(out[:3]) + ([out.nll] if target is not None else [])
    loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(outputs, upstream))
    return outputs + list(torch.autograd.grad(loss, leaves))


# Every kernel of a forward + backward with gradients for hidden, weight and bias, in launch order.
BACKWARD_TRACE = ("linear_score", "linear_score.backward", "linear_score.grad_hidden", "linear_score.grad_weight")


def _check_against_reference(backend, rows, dim, vocab, num_bins, dtype, lm_head, bias=True, with_target=False):
    hidden, weight, ids, b, values = _case(rows, dim, vocab, num_bins, dtype, lm_head=lm_head, bias=bias)
    upstream = [torch.randn(rows, num_bins, device=DEVICE), torch.randn(rows, device=DEVICE),
                torch.randn(rows, device=DEVICE), torch.randn(rows, device=DEVICE)]
    target = torch.randint(0, num_bins, (rows,), device=DEVICE) if with_target else None
    fused = lambda *a: linear_score(*a, backend=backend)  # noqa: E731
    with trace_backends() as ran:
        kernel = _run(fused, hidden, weight, ids, b, values, 0.7, upstream, target)
    assert ran == [(op, backend) for op in BACKWARD_TRACE]
    eager = _run(reference.linear_score, hidden, weight, ids, b, values, 0.7, upstream, target)
    as64 = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = _run(reference.linear_score, as64(hidden), as64(weight), ids, as64(b), values, 0.7, upstream, target)
    names = ("probs", "mean", "std") + (("nll",) if with_target else ()) + ("grad_hidden", "grad_weight", "grad_bias")
    outputs = 4 if with_target else 3
    for i, (name, k, e, r) in enumerate(zip(names, kernel, eager, ref)):
        assert_three_way(name, k, e, r, ATOL[dtype] * (1 if i < outputs else 10))
    grad_weight = kernel[outputs + 1]
    assert kernel[outputs].dtype == grad_weight.dtype == dtype
    if lm_head:
        off_rows = torch.ones(vocab, dtype=torch.bool, device=DEVICE)
        off_rows[ids] = False
        assert torch.all(grad_weight[off_rows] == 0)
        if bias:
            assert torch.all(kernel[outputs + 2][off_rows] == 0)


SHAPES = [(1, 4095, 9, 9, False), (7, 64, 50, 5, True), (111, 33, 300, 17, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim,vocab,num_bins,lm_head", SHAPES)
def test_triton_matches_reference_three_way(dtype, rows, dim, vocab, num_bins, lm_head):
    _check_against_reference("triton", rows, dim, vocab, num_bins, dtype, lm_head)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim,vocab,num_bins,lm_head", SHAPES)
def test_triton_nll_matches_reference_three_way(dtype, rows, dim, vocab, num_bins, lm_head):
    _check_against_reference("triton", rows, dim, vocab, num_bins, dtype, lm_head, with_target=True)


def test_nll_is_exact_where_the_probability_underflows():
    # A 200-nat logit gap: p[target] underflows to 0 in fp32, so -log(p) would be inf; the log-sum-exp is exact.
    hidden = torch.tensor([[1.0, 0.0]], device=DEVICE)
    weight = torch.tensor([[200.0, 0.0], [0.0, 0.0]], device=DEVICE)
    out = linear_score(hidden, weight, [1.0, 2.0], target=torch.tensor([1], device=DEVICE), backend="triton")
    assert out.probs[0, 1] == 0 and torch.allclose(out.nll, torch.tensor([200.0], device=DEVICE))


def test_triton_without_bias_and_several_weight_splits():
    # More rows than one weight-gradient split holds, so the fixed-order partial sum is exercised.
    _check_against_reference("triton", 1030, 16, 40, 3, torch.float32, lm_head=True, bias=False)


def test_weight_gradient_is_deterministic():
    hidden, weight, ids, b, values = _case(1030, 16, 40, 3, torch.float32, lm_head=True)
    grads = []
    for _ in range(2):
        w = weight.clone().requires_grad_()
        linear_score(hidden, w, values, ids, b, backend="triton").mean.sum().backward()
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


def test_only_the_gradients_asked_for_are_computed():
    hidden, weight, ids, b, values = _case(5, 20, 30, 4, torch.float32, lm_head=True)
    h = hidden.detach().requires_grad_()
    out = linear_score(h, weight, values, ids, b, backend="triton")
    out.mean.sum().backward()
    assert h.grad is not None and weight.grad is None and b.grad is None
    bias_only = b.detach().requires_grad_()
    linear_score(hidden, weight, values, ids, bias_only, backend="triton").std.sum().backward()
    ref_bias = b.detach().requires_grad_()
    reference.linear_score(hidden, weight, values, ids, ref_bias).std.sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(bias_only.grad, ref_bias.grad)


def test_gradcheck_fp64():
    torch.manual_seed(3)
    hidden = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ids = torch.tensor([5, 0, 3], device=DEVICE)

    target = torch.tensor([2, 0, 1], device=DEVICE)

    def fn(h, w, b):
        out = linear_score(h, w, [1.0, 2.5, 5.0], ids, b, 1.3, target, backend="triton")
        return out.probs, out.mean, out.std, out.nll

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=gpu_only)])
def test_opcheck(backend):
    hidden = strided_rows(5, 24, torch.float32)
    weight = torch.randn(30, 24, device=DEVICE)
    bias = torch.randn(30, device=DEVICE)
    ids = torch.tensor([3, 7, 11, 29], device=DEVICE)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], device=DEVICE)
    op = torch.ops.zr_kernels.linear_score.default
    torch.library.opcheck(op, (hidden, weight, ids, bias, values, None, 1.0, backend))
    torch.library.opcheck(op, (hidden, weight[:4], None, None, values, None, 0.5, backend))
    if backend == "triton":  # the CUDA extension takes no target
        target = torch.tensor([0, 3, 1, 2, 2], device=DEVICE)
        torch.library.opcheck(op, (hidden, weight, ids, bias, values, target, 1.0, backend))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=gpu_only)])
def test_score_head_from_lm_head_under_compile(backend):
    torch.manual_seed(4)
    lm_head = torch.nn.Linear(24, 30, device=DEVICE)
    ids = [3, 7, 11, 29]
    head = ScoreHead.from_lm_head(lm_head, ids, [1.0, 2.0, 3.0, 4.0])
    assert torch.equal(head.weight, lm_head.weight[ids]) and torch.equal(head.bias, lm_head.bias[ids])
    hidden = strided_rows(5, 24, torch.float32)
    compiled = torch.compile(lambda x: head(x, backend=backend), fullgraph=True)
    x = hidden.clone().requires_grad_()
    with trace_backends() as ran:
        out = compiled(x)
        (out.mean.sum() + out.std.sum()).backward()
    assert ran == [(op, backend) for op in BACKWARD_TRACE]
    ref = reference.linear_score(hidden, lm_head.weight, head.values, ids, lm_head.bias)
    torch.testing.assert_close(out.probs, ref.probs)
    assert x.grad is not None and head.weight.grad.shape == (4, 24) and head.bias.grad.shape == (4,)


def test_score_head_nll_under_compile():
    torch.manual_seed(5)
    head = ScoreHead(24, [1.0, 2.0, 3.0, 4.0], bias=True, device=DEVICE)
    hidden = strided_rows(6, 24, torch.float32)
    target = torch.tensor([0, 3, 1, 2, 2, 1], device=DEVICE)
    compiled = torch.compile(lambda x, t: head(x, t, backend="triton").nll.mean(), fullgraph=True)
    x = hidden.clone().requires_grad_()
    with trace_backends() as ran:
        compiled(x, target).backward()
    assert ran == [(op, "triton") for op in BACKWARD_TRACE]
    y = hidden.clone().requires_grad_()
    ref = reference.linear_score(y, head.weight.detach(), head.values, None, head.bias.detach(), 1.0, target)
    ref.nll.mean().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_score_head_init_and_plain_call():
    head = ScoreHead(16, [1.0, 3.0, 5.0], bias=True, temperature=0.5, device=DEVICE)
    assert head.weight.shape == (3, 16) and head.bias.shape == (3,) and head.values.dtype == torch.float32
    hidden = torch.randn(4, 16, device=DEVICE)
    out = head(hidden)
    ref = reference.linear_score(hidden, head.weight, head.values, bias=head.bias, temperature=0.5)
    torch.testing.assert_close(out.mean, ref.mean)
    with pytest.raises(ValueError, match="values"):
        ScoreHead(16, list(range(33)))
    with pytest.raises(TypeError, match="lm_head"):
        ScoreHead.from_lm_head(torch.nn.Embedding(4, 4), [0], [1.0])


def test_auto_is_reference_on_cpu_and_cuda_backend_needs_cuda_tensors():
    # About CPU tensors on purpose, on every machine (a GPU one included).
    hidden, weight, values = torch.randn(2, 8, device="cpu"), torch.randn(3, 8, device="cpu"), [1.0, 2.0, 3.0]
    with trace_backends() as ran:
        linear_score(hidden, weight, values)
    assert ran == [("linear_score", "reference")]
    with pytest.raises(ValueError, match="CUDA tensors"):
        linear_score(hidden, weight, values, backend="cuda")


def test_empty_rows():
    out = linear_score(torch.randn(0, 10, device=DEVICE), torch.randn(3, 10, device=DEVICE), [1.0, 2.0, 3.0],
                       backend="triton")
    assert out.probs.shape == (0, 3) and out.mean.shape == (0,) and out.std.shape == (0,)


# Argument checks run before any device work, so this table stays on the CPU on every machine.
GOOD = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), values=[1.0, 2.0, 3.0], token_ids=[1, 2, 3])
BAD_INPUTS = [
    (dict(hidden=torch.randn(4, 8, 2)), ValueError, "hidden"),
    (dict(hidden=torch.randint(0, 5, (4, 8))), TypeError, "hidden"),
    (dict(hidden=torch.randn(4, 0), weight=torch.randn(10, 0)), ValueError, "hidden"),
    (dict(weight=torch.randn(10, 7)), ValueError, "weight"),
    (dict(weight=torch.randn(10)), ValueError, "weight"),
    (dict(weight=torch.randn(10, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(weight=torch.randn(10, 8).bfloat16()), TypeError, "weight"),
    (dict(weight=torch.randn(33, 8), values=list(range(33)), token_ids=None), ValueError, "32"),
    (dict(weight=torch.randn(40, 8), values=list(range(33)), token_ids=list(range(33)), backend="cuda"),
     ValueError, "32"),
    (dict(token_ids=[1, 2, 10]), ValueError, "token_ids"),
    (dict(token_ids=[1, 1, 2]), ValueError, "unique"),
    (dict(token_ids=torch.tensor([1.0, 2.0, 3.0])), TypeError, "token_ids"),
    (dict(values=[1.0, 2.0]), ValueError, "values"),
    (dict(bias=torch.randn(3)), ValueError, "bias"),
    (dict(bias=torch.randn(10, 1)), ValueError, "bias"),
    (dict(bias=torch.randn(10).half()), TypeError, "bias"),
    (dict(bias=torch.randn(3), token_ids=None, weight=torch.randn(4, 8), values=[1.0, 2.0, 3.0, 4.0]),
     ValueError, "bias"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(hidden=torch.randn(4, 8, dtype=torch.float64), weight=torch.randn(10, 8, dtype=torch.float64),
          backend="cuda"), TypeError, "float64"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
    (dict(target=torch.tensor([0, 1, 2, 3])), ValueError, "target"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0, 0.0])), TypeError, "target"),
    (dict(target=[0, 1, 2, 0]), TypeError, "target"),
    (dict(target=torch.tensor([0, 1, 2, 0]), backend="cuda"), ValueError, "target"),
]


@pytest.mark.parametrize("override,error,word", BAD_INPUTS, ids=[f"{e.__name__}-{w}" for _, e, w in BAD_INPUTS])
def test_bad_inputs_raise_before_launch(override, error, word):
    kwargs = {**GOOD, **override}
    with trace_backends() as ran, pytest.raises(error, match=word):
        linear_score(**kwargs)
    assert ran == []


# GPU only: the CUDA extension itself (on a GPU machine the whole file runs; the tests above then run natively).

@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim,vocab,num_bins,lm_head", SHAPES + [
    (1, 1, 5, 1, False), (507, 8192, 2000, 32, True), (300, 257, 40, 8, False), (2049, 4096, 1000, 16, True),
])
def test_cuda_matches_reference_three_way(dtype, rows, dim, vocab, num_bins, lm_head):
    _extension()
    _check_against_reference("cuda", rows, dim, vocab, num_bins, dtype, lm_head)
    _check_against_reference("cuda", rows, dim, vocab, num_bins, dtype, lm_head, bias=False)


@gpu_only
def test_cuda_large_batch_deterministic_and_close_to_triton():
    _extension()
    hidden, weight, ids, b, values = _case(65536, 512, 1000, 9, torch.bfloat16, lm_head=True)
    results = []
    for backend in ("cuda", "cuda", "triton"):
        w = weight.clone().requires_grad_()
        out = linear_score(hidden, w, values, ids, b, backend=backend)
        out.mean.sum().backward()
        results.append((out.mean, w.grad))
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], results[2][0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(results[0][1].float(), results[2][1].float(), atol=2e-2, rtol=2e-2)


@gpu_only
def test_cuda_out_of_range_ids_give_nan_not_a_fault():
    _extension()
    hidden = torch.randn(4, 64, device=DEVICE)
    weight = torch.randn(10, 64, device=DEVICE)
    ids = torch.tensor([1, 2, 99], device=DEVICE)  # CUDA ids are not range-checked (no host sync)
    out = linear_score(hidden, weight, [1.0, 2.0, 3.0], ids, backend="cuda")
    assert torch.isnan(out.mean).all()
    torch.cuda.synchronize()
