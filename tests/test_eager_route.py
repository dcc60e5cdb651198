"""The lean eager route of every fused op: no custom-op dispatch in eager mode, unused outputs cost nothing,
constants converted once, and the custom ops (still what torch.compile sees) accept the same arguments."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zr_kernels
from zr_kernels import _validation, reference, trace_backends
from tests.helpers import DEVICE

VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]


class _RecordOps(TorchDispatchMode):
    """Names of the operators that reach the dispatcher inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _calls():
    """(name, fn) pairs: one fused call per op whose outputs reach a scalar loss, on fresh leaves."""
    torch.manual_seed(0)
    logits = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    hidden = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 16, device=DEVICE)
    mu_w = torch.rand(3, 4, device=DEVICE, requires_grad=True)
    mu_l = torch.rand(3, 4, device=DEVICE)
    teacher = torch.softmax(torch.randn(5, 5, device=DEVICE), -1)
    ids = [3, 9, 11, 20, 33]
    return [
        ("score_distribution", lambda: zr_kernels.score_distribution(logits, ids, VALUES, backend="triton").mean.sum()),
        ("pairwise_gap", lambda: zr_kernels.pairwise_gap(mu_w, mu_l, torch.ones(3, device=DEVICE), 4.0,
                                                         backend="triton").loss.sum()),
        ("slice_kl", lambda: zr_kernels.slice_kl(logits, teacher, ids, backend="triton")),
        ("linear_score", lambda: zr_kernels.linear_score(hidden, weight, VALUES, token_ids=ids,
                                                         backend="triton").std.sum()),
    ]


@pytest.mark.parametrize("index", range(4), ids=["score_distribution", "pairwise_gap", "slice_kl", "linear_score"])
def test_eager_forward_and_backward_skip_the_custom_op_dispatch(index):
    name, loss_fn = _calls()[index]
    with _RecordOps() as ops, trace_backends() as ran:
        loss = loss_fn()
        loss.backward()
    assert (name, "triton") in ran and (f"{name}.backward", "triton") in ran  # the kernels did run ...
    assert not [op for op in ops.names if op.startswith("zr_kernels")]       # ... without the custom-op dispatch


def test_forward_only_ops_launch_directly_in_eager():
    rewards = torch.rand(8, device=DEVICE)
    mu = torch.rand(2, 4, device=DEVICE)
    with _RecordOps() as ops, trace_backends() as ran:
        zr_kernels.group_advantages(rewards, 4, backend="triton")
        zr_kernels.gdso_rewards(mu, mu.flip(1), mu[:, 0], mu[:, 1], 1.0, 5.0, 0.5, 0.5, backend="triton")
    assert ran == [("group_advantages", "triton"), ("gdso_rewards", "triton")]
    assert not [op for op in ops.names if op.startswith("zr_kernels")]


def test_no_graph_is_recorded_without_gradients():
    logits = torch.randn(4, 30, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        dist = zr_kernels.score_distribution(logits, [1, 2, 3], [1.0, 2.0, 3.0], backend="triton")
    assert dist.mean.grad_fn is None and not dist.probs.requires_grad
    dist = zr_kernels.score_distribution(logits.detach(), [1, 2, 3], [1.0, 2.0, 3.0], backend="triton")
    assert dist.mean.grad_fn is None


@pytest.mark.parametrize("used", [("probs",), ("mean",), ("std",), ("nll",), ("mean", "nll"), ("probs", "std")])
def test_score_distribution_gradient_of_a_subset_of_outputs(used):
    """Outputs that do not reach the loss get no gradient buffer: the kernel skips them and stays exact."""
    torch.manual_seed(1)
    logits = torch.randn(7, 50, device=DEVICE) * 2
    ids, target = [0, 7, 13, 21, 49], torch.randint(0, 5, (7,), device=DEVICE)
    upstream = {"probs": torch.randn(7, 5, device=DEVICE), "mean": torch.randn(7, device=DEVICE),
                "std": torch.randn(7, device=DEVICE), "nll": torch.randn(7, device=DEVICE)}

    def grad(fn):
        x = logits.clone().requires_grad_()
        dist = fn(x, ids, VALUES, target)._asdict()
        sum((dist[name] * upstream[name]).sum() for name in used).backward()
        return x.grad

    fused = grad(lambda *a: zr_kernels.score_distribution(*a, backend="triton"))
    torch.testing.assert_close(fused, grad(reference.score_distribution), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("used", [("probs",), ("mean",), ("std",), ("mean", "std")])
def test_linear_score_gradient_of_a_subset_of_outputs(used):
    torch.manual_seed(2)
    hidden, weight, bias = torch.randn(6, 24, device=DEVICE), torch.randn(30, 24, device=DEVICE), torch.randn(30, device=DEVICE)
    ids = [2, 5, 8, 13, 29]
    upstream = {"probs": torch.randn(6, 5, device=DEVICE), "mean": torch.randn(6, device=DEVICE),
                "std": torch.randn(6, device=DEVICE)}

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        dist = fn(leaves[0], leaves[1], VALUES, ids, leaves[2])._asdict()
        sum((dist[name] * upstream[name]).sum() for name in used).backward()
        return [t.grad for t in leaves]

    fused = grads(lambda *a: zr_kernels.linear_score(*a, backend="triton"))
    for got, want in zip(fused, grads(reference.linear_score)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_broadcast_upstream_gradients_are_read_through_their_strides():
    """``.sum()`` / ``.mean()`` hand the backward one value broadcast over the rows (stride 0): no copy is made,
    and the gradients equal the reference's."""
    torch.manual_seed(4)
    logits, target = torch.randn(9, 30, device=DEVICE) * 2, torch.randint(0, 5, (9,), device=DEVICE)
    mu_w, mu_l = torch.rand(6, 4, device=DEVICE) * 4 + 1, torch.rand(6, 4, device=DEVICE) * 4 + 1
    teacher = torch.softmax(torch.randn(9, 5, device=DEVICE), -1)
    ids = [1, 4, 9, 16, 25]

    def losses(module, **backend):
        return {
            "score_distribution": lambda x: sum(o.sum() for o in module.score_distribution(x, ids, VALUES, target,
                                                                                           **backend)),
            "slice_kl": lambda x: module.slice_kl(x, teacher, ids, reduction="mean", **backend),
            "pairwise_gap": lambda x: module.pairwise_gap(x[:6, :4] + mu_w, mu_l, mu_w[:, 0], 4.0, **backend).loss.mean(),
        }

    for name, fused in losses(zr_kernels, backend="triton").items():
        grads, traces = [], []
        for fn in (fused, losses(reference)[name]):
            x = logits.clone().requires_grad_()
            with trace_backends() as ran:
                fn(x).backward()
            grads.append(x.grad)
            traces.append(ran)
        assert (f"{name}.backward", "triton") in traces[0]
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5, msg=name)


def test_constant_ids_and_values_are_converted_once_and_still_checked():
    logits = torch.randn(2, 30, device=DEVICE)
    first = _validation.as_token_ids([4, 5, 6], 30, DEVICE)
    assert _validation.as_token_ids([4, 5, 6], 30, DEVICE) is first             # cached, no new copy
    assert _validation.as_token_ids(torch.tensor([4, 5, 6]), 30, DEVICE) is first
    with pytest.raises(ValueError, match="token_ids must lie in"):  # the range check is per call, not cached
        zr_kernels.score_distribution(logits, [4, 5, 30], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="token_ids must be unique"):
        zr_kernels.score_distribution(logits, [4, 5, 5], [1.0, 2.0, 3.0])
    values = torch.tensor([1.0, 2.0, 3.0])
    other_device = DEVICE.type == "cpu"  # on a GPU, CPU values are the cached case; on a CPU, lists are
    first_values = _validation.as_values(values if not other_device else [1.0, 2.0, 3.0], 3, DEVICE, torch.float32)
    values[0] = 9.0  # a changed constant is a new constant: the cache is keyed by content
    changed = _validation.as_values(values if not other_device else [9.0, 2.0, 3.0], 3, DEVICE, torch.float32)
    assert first_values.tolist() == [1.0, 2.0, 3.0] and changed.tolist() == [9.0, 2.0, 3.0]


def test_backward_custom_ops_accept_absent_gradients():
    """The backward ops registered for torch.compile take None for an unused output's gradient."""
    torch.manual_seed(3)
    logits = torch.randn(4, 20, device=DEVICE)
    ids, values = torch.tensor([1, 4, 9], device=DEVICE), torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    probs, mean, std, _ = torch.ops.zr_kernels.score_distribution(logits, ids, values, None, 1.0, None)
    grad_mean = torch.randn(4, device=DEVICE)
    args = (None, grad_mean, None, None, probs, mean, std, None, ids, values, 1.0, 20, torch.float32)
    torch.library.opcheck(torch.ops.zr_kernels.score_distribution_backward.default, args)
    bwd = torch.ops.zr_kernels.linear_score_grad_logits.default
    torch.library.opcheck(bwd, (None, grad_mean, None, None, probs, mean, std, None, values, 1.0, "triton"))


_GRAPH_STEPS = {  # fwd of each op on a [5, 40] leaf x, reduced to a scalar loss
    "score_distribution": lambda x: zr_kernels.score_distribution(x, [3, 9, 11], [1.0, 2.0, 3.0]).mean.sum(),
    "pairwise_gap": lambda x: zr_kernels.pairwise_gap(x[:, :4], x[:, 4:8], x[:, 8].detach(), 4.0).loss.sum(),
    "slice_kl": lambda x: zr_kernels.slice_kl(x, x.new_full((5, 3), 1 / 3), [3, 9, 11]),
    "linear_score": lambda x: zr_kernels.linear_score(x[:, :16], x.new_ones(3, 16), [1.0, 2.0, 3.0]).mean.sum(),
    "group_advantages": lambda x: (zr_kernels.group_advantages(x[:, 0].detach(), 5) * x[:, 0]).sum(),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", sorted(_GRAPH_STEPS))
def test_cuda_graph_capture_of_forward_and_backward(name):
    """fwd+bwd captured once in a CUDA graph, replayed on new input values: the eager gradient of those values."""
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)

    def step():
        x.grad = None
        _GRAPH_STEPS[name](x).backward()
        return x.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compiles kernels, caches the constant ids
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_values = torch.randn(5, 40, device=DEVICE)
    with torch.no_grad():
        x.copy_(new_values)
    graph.replay()
    torch.cuda.synchronize()
    eager_x = new_values.clone().requires_grad_()
    _GRAPH_STEPS[name](eager_x).backward()
    torch.testing.assert_close(captured, eager_x.grad)
