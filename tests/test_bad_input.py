"""Bad input that only a GPU would meet: score ids checked on the device (CUDA tensors), out of range or repeated,
and address arithmetic past 2^31 elements.

CUDA ids are not read back to the host (that would be a sync per call), so the kernels must check them
themselves. Here the launchers are called exactly as the ops call them for CUDA ids (the ids as a tensor, plus the
device-side repeated-ids flag), in the interpreter, and the op paths are run with the host check switched off.
"""
import importlib
import math

import pytest
import torch

import zr_kernels._validation as validation
from zr_kernels import SliceKLLoss, cuda_extension_available, linear_score, score_distribution, slice_kl
from zr_kernels._validation import repeated_ids
from zr_kernels.kernels import linear_score as ls_kernels
from zr_kernels.kernels import score_distribution as sd_kernels
from zr_kernels.kernels import slice_kl as kl_kernels
from tests.helpers import DEVICE

GUARD = 64  # elements of sentinel on each side of every gradient buffer a launcher allocates
SENTINEL = 7.0


class _GuardedTorch:
    """``torch`` for a kernel module, except that ``zeros``/``empty`` return views into buffers with sentinel
    elements on both sides, so a write past either end of a launcher's output shows up (the interpreter does not
    fault on one, and a GPU may not either)."""

    def __init__(self):
        self.buffers = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def _guarded(self, fill, *shape, **kwargs):
        numel = math.prod(shape)
        flat = torch.full((numel + 2 * GUARD,), SENTINEL, **kwargs)
        flat[GUARD:GUARD + numel] = fill
        self.buffers.append(flat)
        return flat[GUARD:GUARD + numel].view(*shape)

    def zeros(self, *shape, **kwargs):
        return self._guarded(0.0, *shape, **kwargs)

    def empty(self, *shape, **kwargs):
        return self._guarded(float("nan"), *shape, **kwargs)

    def assert_guards_intact(self):
        assert self.buffers, "no buffer was allocated through the guard"
        for flat in self.buffers:
            assert bool((flat[:GUARD] == SENTINEL).all()) and bool((flat[-GUARD:] == SENTINEL).all()), \
                "a kernel wrote outside its output buffer"


@pytest.fixture
def guarded(monkeypatch):
    guard = _GuardedTorch()
    for module in (sd_kernels, kl_kernels, ls_kernels):
        monkeypatch.setattr(module, "torch", guard)
    return guard


def _cut_logits(rows=4, vocab=10, extra=2):
    """``[rows, vocab]`` logits cut from a wider buffer: the columns past ``vocab`` hold a large logit, so reading
    one (an id of ``vocab``) would show as probability ~1.0."""
    wide = torch.randn(rows, vocab + extra, device=DEVICE)
    wide[:, vocab:] = 50.0
    return wide[:, :vocab]


# ---- ids out of range ----

@pytest.mark.parametrize("bad_id", [10, -1])
def test_score_distribution_kernels_never_touch_an_id_out_of_range(guarded, bad_id):
    logits = _cut_logits()
    ids = torch.tensor([2, 5, bad_id], device=DEVICE)
    values = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    target = torch.tensor([0, 1, 2, 0], device=DEVICE)
    probs, mean, std, nll = sd_kernels.score_distribution_fwd(logits, ids, values, target, 1.0, repeated_ids(ids))
    for out in (probs, mean, std, nll):
        assert bool(out.isnan().all()), "a bad id must give NaN, not a neighbour's logit"
    ones = torch.ones(4, device=DEVICE)
    grad = sd_kernels.score_distribution_bwd(None, ones, ones, ones, probs, mean, std, target, ids, values, 1.0, 10,
                                             torch.float32)
    guarded.assert_guards_intact()
    assert bool(grad[:, [2, 5]].isnan().all())


@pytest.mark.parametrize("normalize", ["slice", "vocab"])
@pytest.mark.parametrize("bad_id", [10, -1])
def test_slice_kl_kernels_never_touch_an_id_out_of_range(guarded, normalize, bad_id):
    logits = _cut_logits()
    ids = torch.tensor([2, 5, bad_id], device=DEVICE)
    teacher = torch.full((4, 3), 1 / 3, device=DEVICE)
    loss, lse = kl_kernels.slice_kl_fwd(logits, teacher, ids, normalize == "vocab", 0.0, 1.0, repeated_ids(ids))
    assert bool(loss.isnan().all()) and bool(lse.isnan().all())
    grad = kl_kernels.slice_kl_bwd(torch.ones(4, device=DEVICE), logits, teacher, ids, lse, normalize == "vocab",
                                   0.0, 1.0)
    guarded.assert_guards_intact()
    columns = slice(None) if normalize == "vocab" else [2, 5]
    assert bool(grad[:, columns].isnan().all())


def test_linear_score_kernels_never_touch_an_id_out_of_range(guarded):
    hidden = torch.randn(5, 8, device=DEVICE)
    weight = torch.randn(10, 8, device=DEVICE)
    ids = torch.tensor([2, 5, 10], device=DEVICE)
    values = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    probs, mean, std, _ = ls_kernels.linear_score_fwd(hidden, weight, ids, None, values, None, 1.0)
    assert bool(probs.isnan().all()) and bool(mean.isnan().all())
    grad_logits = ls_kernels.linear_score_grad_logits(None, torch.ones(5, device=DEVICE), None, None, probs, mean,
                                                      std, None, values, 1.0)
    grad_weight, _ = ls_kernels.linear_score_grad_weight(grad_logits, hidden, ids, 10, False)
    guarded.assert_guards_intact()
    assert bool(grad_weight[[2, 5]].isnan().all()) and bool((grad_weight[[0, 1, 3, 4, 6, 7, 8, 9]] == 0).all())


# ---- repeated ids ----

def test_repeated_ids_flag():
    assert repeated_ids(torch.tensor([3, 3, 5])).tolist() == [1]
    assert repeated_ids(torch.tensor([5, 1, 9, 1])).tolist() == [1]
    assert repeated_ids(torch.tensor([3, 4, 5])).tolist() == [0]
    assert repeated_ids(torch.tensor([7])).tolist() == [0]


def test_repeated_ids_give_nan_not_a_last_store_wins_gradient(guarded):
    """Autograd through ``logits[..., [3, 3, 5]]`` sums the repeats; a plain store per id writes one of them."""
    logits = torch.randn(4, 10, device=DEVICE, dtype=torch.float64)
    ids = torch.tensor([3, 3, 5], device=DEVICE)
    values = torch.tensor([1.0, 2.0, 3.0], device=DEVICE, dtype=torch.float64)
    probs, mean, std, _ = sd_kernels.score_distribution_fwd(logits, ids, values, None, 1.0, repeated_ids(ids))
    assert bool(probs.isnan().all()) and bool(mean.isnan().all())
    grad = sd_kernels.score_distribution_bwd(None, torch.ones_like(mean), None, None, probs, mean, std, None, ids,
                                             values, 1.0, 10, torch.float64)
    assert bool(grad[:, [3, 5]].isnan().all())
    teacher = torch.full((4, 3), 1 / 3, device=DEVICE)
    for vocab_norm in (False, True):
        loss, lse = kl_kernels.slice_kl_fwd(logits.float(), teacher, ids, vocab_norm, 0.0, 1.0, repeated_ids(ids))
        assert bool(loss.isnan().all())
        grad = kl_kernels.slice_kl_bwd(torch.ones(4, device=DEVICE), logits.float(), teacher, ids, lse, vocab_norm,
                                       0.0, 1.0)
        assert bool(grad[:, [3, 5]].isnan().all())
    guarded.assert_guards_intact()


def test_repeated_ids_in_linear_score_write_each_weight_row_once(guarded):
    """Two bins with one id would write two different partial sums into one row of ``grad_W`` (on a GPU, two
    blocks racing); the repeat is treated as a bad id instead: NaN outputs, the row written once."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, device=DEVICE)
    weight = torch.randn(10, 8, device=DEVICE)
    bias = torch.randn(10, device=DEVICE)
    ids = torch.tensor([3, 3, 5], device=DEVICE)
    values = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    probs, mean, std, _ = ls_kernels.linear_score_fwd(hidden, weight, ids, bias, values, None, 1.0)
    assert bool(probs.isnan().all()) and bool(mean.isnan().all())
    grad_logits = ls_kernels.linear_score_grad_logits(None, torch.ones(6, device=DEVICE), None, None, probs, mean,
                                                      std, None, values, 1.0)
    grad_weight, grad_bias = ls_kernels.linear_score_grad_weight(grad_logits, hidden, ids, 10, True)
    guarded.assert_guards_intact()
    assert bool(grad_weight[[3, 5]].isnan().all()) and bool(grad_bias[[3, 5]].isnan().all())
    untouched = [0, 1, 2, 4, 6, 7, 8, 9]
    assert bool((grad_weight[untouched] == 0).all()) and bool((grad_bias[untouched] == 0).all())


# ---- the op paths, as they run for CUDA ids ----

@pytest.fixture
def ids_checked_on_device(monkeypatch):
    """Make every op treat tensor ids as CUDA ids: no host check, the device-side checks instead."""
    def on_device(token_ids):
        return isinstance(token_ids, torch.Tensor)

    # the op modules by name: the package's attributes of the same names are the functions
    for name in ("_validation", "score_distribution", "slice_kl"):
        monkeypatch.setattr(importlib.import_module(f"zr_kernels.{name}"), "ids_on_device", on_device)


@pytest.mark.parametrize("ids", [[2, 5, 10], [2, 5, -1], [3, 3, 5]])
def test_ops_give_nan_for_bad_device_ids(ids_checked_on_device, ids):
    torch.manual_seed(1)
    ids = torch.tensor(ids, device=DEVICE)
    logits = torch.randn(2, 3, 10, device=DEVICE, requires_grad=True)
    out = score_distribution(logits, ids, [1.0, 2.0, 3.0], backend="triton")
    assert bool(out.probs.isnan().all())
    out.mean.sum().backward()
    assert not bool(logits.grad.isfinite().all())
    loss_fn = SliceKLLoss(ids, backend="triton")  # the module's ids are a buffer: on the GPU they are CUDA ids
    for normalize in ("slice", "vocab"):
        loss_fn.normalize = normalize
        assert bool(loss_fn(logits[:, -1], torch.full((2, 3), 1 / 3, device=DEVICE)).isnan())


def test_score_distribution_gathered_rows_path_with_a_bad_device_id(ids_checked_on_device):
    """Leading dims that cannot be merged take the gather path, which must not index with a bad id."""
    logits = torch.randn(3, 2, 10, device=DEVICE).transpose(0, 1)
    out = score_distribution(logits, torch.tensor([1, 10, 4], device=DEVICE), [1.0, 2.0, 3.0], backend="triton")
    assert bool(out.probs.isnan().all())


def test_linear_score_op_with_repeated_device_ids():
    hidden = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    out = linear_score(hidden, weight, [1.0, 2.0, 3.0], token_ids=[4, 2, 7], backend="triton")
    assert bool(out.probs.isfinite().all())
    ids = torch.tensor([4, 4, 7], device=DEVICE)
    with pytest.raises(ValueError, match="unique"):  # checked on the host, as a CPU tensor
        linear_score(hidden, weight, [1.0, 2.0, 3.0], token_ids=ids, backend="triton")
    monkeypatched = pytest.MonkeyPatch()
    with monkeypatched.context() as patch:
        patch.setattr(validation, "ids_on_device", lambda token_ids: isinstance(token_ids, torch.Tensor))
        out = linear_score(hidden, weight, [1.0, 2.0, 3.0], token_ids=ids, backend="triton")
    assert bool(out.probs.isnan().all())
    out.mean.sum().backward()
    assert bool(weight.grad[[4, 7]].isnan().all()) and bool((weight.grad[[0, 1, 2, 3, 5, 6, 8, 9]] == 0).all())


# ---- address arithmetic past 2^31 elements ----

def test_weight_gradient_grid_is_clamped():
    for n_rows in (0, 1, 1000, 1025, 2**26, 2**26 + 1, 10**9):
        splits, rows_per_split = ls_kernels.weight_gradient_splits(n_rows)
        assert 1 <= splits <= ls_kernels.MAX_SPLITS
        assert splits * rows_per_split >= n_rows and rows_per_split % ls_kernels.BLOCK_ROWS == 0


def _huge_buffer(numel):
    """An fp16 buffer of ``numel`` elements (several GiB of address space, only the touched pages in memory)."""
    try:
        return torch.empty(numel, dtype=torch.float16)
    except (RuntimeError, MemoryError) as error:  # a machine that does not overcommit memory
        pytest.skip(f"cannot reserve {numel * 2 / 2**30:.1f} GiB of address space: {error}")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="a CPU address-space trick (on a GPU it would need the memory)")
def test_column_offsets_past_2_to_31_elements():
    """A column-major ``W [V, D]`` has column stride V, and column d starts ``d·V`` elements in: past 2^31 for
    D ≥ 8,650 at V = 248,320. With 32-bit column offsets the kernel reads ``d·V − 2^32`` instead. Here a few rows
    with a column stride of 2^30 + 3 (column 2 starts at 2^31 + 6), and the wrapped address filled with 9s."""
    stride, dim, ids = 2**30 + 3, 3, [0, 1]
    origin = 2**31 + 64  # the view starts here, so a wrapped (negative) offset still lands inside the buffer
    buffer = _huge_buffer(origin + (dim - 1) * stride + 64)
    weight = buffer.as_strided((4, dim), (1, stride), origin)
    for d in range(dim):
        weight[ids, d] = torch.tensor([0.5 * (d + 1), -0.25 * (d + 1)], dtype=torch.float16)
    wrapped = origin + (dim - 1) * stride - 2**32
    buffer[wrapped:wrapped + 2] = 9.0
    hidden = torch.ones(2, dim, dtype=torch.float16)
    out = linear_score(hidden, weight, [1.0, 2.0], token_ids=ids, backend="triton")
    expected = torch.softmax(hidden.float() @ weight[ids].float().T, -1)
    torch.testing.assert_close(out.probs, expected, atol=1e-3, rtol=1e-3)


# ---- on a GPU: the same through the ops with real CUDA ids ----

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("ids", [[2, 5, 50], [2, -1, 5], [7, 3, 7]])
def test_cuda_ids_through_every_op(ids):
    torch.manual_seed(2)
    ids = torch.tensor(ids, device="cuda")
    logits = torch.randn(6, 50, device="cuda", requires_grad=True)
    out = score_distribution(logits, ids, [1.0, 2.0, 3.0])
    out.mean.sum().backward()
    torch.cuda.synchronize()
    assert bool(out.probs.isnan().all()) and not bool(logits.grad.isfinite().all())
    teacher = torch.full((6, 3), 1 / 3, device="cuda")
    for normalize in ("slice", "vocab"):
        assert bool(SliceKLLoss(ids, normalize).cuda()(logits, teacher).isnan())
    hidden = torch.randn(6, 16, device="cuda")
    for backend in ("triton", "cuda"):
        if backend == "cuda" and not cuda_extension_available():
            continue
        weight = torch.randn(50, 16, device="cuda", requires_grad=True)
        dist = linear_score(hidden, weight, [1.0, 2.0, 3.0], token_ids=ids, backend=backend)
        dist.mean.sum().backward()
        torch.cuda.synchronize()
        assert bool(dist.probs.isnan().all())
        valid = [i for i in set(ids.tolist()) if 0 <= i < 50]
        others = [i for i in range(50) if i not in valid]
        assert bool(weight.grad[valid].isnan().all()) and bool((weight.grad[others] == 0).all())
