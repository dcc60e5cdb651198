"""pairwise_gap / gdso_rewards: Triton kernels vs the PyTorch reference (three-way rule), gradients, checks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zr_kernels import PairwiseGapLoss, gdso_rewards, pairwise_gap, reference, trace_backends
from tests.helpers import ATOL, DEVICE, DTYPES, assert_three_way

RANGE = 4.0  # S_max - S_min for scores in [1, 5]


def _scores(pairs, group_size, dtype, *, seed=0, layout="contiguous"):
    """``mu_w, mu_l [P, G]`` in [1, 5] and ``gap [P]``; ``layout`` picks how the ``[P, G]`` views are strided."""
    torch.manual_seed(seed)

    def scores(*shape):
        return (1 + 4 * torch.rand(*shape, device=DEVICE)).to(dtype)

    if layout == "sliced":  # every other column of a [P, 2G] tensor
        mu_w, mu_l = scores(pairs, 2 * group_size)[:, ::2], scores(pairs, 2 * group_size)[:, ::2]
    elif layout == "transposed":  # a column-major [P, G] and the middle columns of a [P, G + 3]
        mu_w, mu_l = scores(group_size, pairs).t(), scores(pairs, group_size + 3)[:, 1:group_size + 1]
    else:
        mu_w, mu_l = scores(pairs, group_size), scores(pairs, group_size)
    gap = torch.rand(2 * pairs, device=DEVICE)[::2] * 2
    return mu_w, mu_l, gap


def _outputs_and_grads(fn, mu_w, mu_l, gap, upstream):
    w, l = mu_w.detach().requires_grad_(), mu_l.detach().requires_grad_()
    out = fn(w, l, gap, RANGE)
    grad_w, grad_l = torch.autograd.grad((out.loss * upstream).sum(), (w, l))
    return list(out) + [grad_w, grad_l]


def _triton(*args):
    return pairwise_gap(*args, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pairs,group_size,layout", [(1, 1, "contiguous"), (7, 2, "sliced"), (111, 4, "transposed"),
                                                     (507, 8, "sliced"), (13, 16, "contiguous")])
def test_matches_reference_three_way(dtype, pairs, group_size, layout):
    mu_w, mu_l, gap = _scores(pairs, group_size, dtype, layout=layout)
    assert layout == "contiguous" or not (mu_w.is_contiguous() and mu_l.is_contiguous())
    upstream = torch.randn(pairs, device=DEVICE)
    with trace_backends() as ran:
        kernel = _outputs_and_grads(_triton, mu_w, mu_l, gap, upstream)
    assert ran == [("pairwise_gap", "triton"), ("pairwise_gap.backward", "triton")]
    eager = _outputs_and_grads(reference.pairwise_gap, mu_w, mu_l, gap, upstream)
    ref32 = _outputs_and_grads(reference.pairwise_gap, mu_w.float(), mu_l.float(), gap, upstream)
    for name, k, e, r in zip(("loss", "reward_w", "reward_l", "grad_mu_w", "grad_mu_l"), kernel, eager, ref32):
        assert_three_way(name, k, e, r, ATOL[dtype])
    assert kernel[0].dtype == kernel[1].dtype == torch.float32 and kernel[3].dtype == kernel[4].dtype == dtype
    assert not kernel[1].requires_grad and not kernel[2].requires_grad

    s_l = torch.rand(pairs, device=DEVICE) * 3 + 1
    s_w = s_l + gap
    with trace_backends() as ran:
        rewards = gdso_rewards(mu_w, mu_l, s_w, s_l, 1.0, 5.0, 0.3, 0.7, backend="triton")
    assert ran == [("gdso_rewards", "triton")]
    eager = reference.gdso_rewards(mu_w, mu_l, s_w, s_l, 1.0, 5.0, 0.3, 0.7)
    ref32 = reference.gdso_rewards(mu_w.float(), mu_l.float(), s_w, s_l, 1.0, 5.0, 0.3, 0.7)
    for name, k, e, r in zip(("r_w", "r_l"), rewards, eager, ref32):
        assert_three_way(name, k, e, r, ATOL[dtype])
        assert k.dtype == torch.float32 and not k.requires_grad


def test_large_group_loops_over_chunks():
    mu_w, mu_l, gap = _scores(3, 300, torch.float32, layout="sliced")
    upstream = torch.randn(3, device=DEVICE)
    kernel = _outputs_and_grads(_triton, mu_w, mu_l, gap, upstream)
    ref = _outputs_and_grads(reference.pairwise_gap, mu_w, mu_l, gap, upstream)
    for k, r in zip(kernel, ref):
        torch.testing.assert_close(k, r)


def test_requires_grad_combinations_and_gap_gets_no_gradient():
    mu_w, mu_l, gap = _scores(5, 4, torch.float32)
    gap = gap.clone().requires_grad_()
    for w_grad, l_grad in ((True, False), (False, True)):
        w, l = mu_w.clone().requires_grad_(w_grad), mu_l.clone().requires_grad_(l_grad)
        _triton(w, l, gap, RANGE).loss.sum().backward()
        ref_w, ref_l = mu_w.clone().requires_grad_(w_grad), mu_l.clone().requires_grad_(l_grad)
        reference.pairwise_gap(ref_w, ref_l, gap, RANGE).loss.sum().backward()
        for t, r in ((w, ref_w), (l, ref_l)):
            assert (t.grad is None) == (r.grad is None)
            if t.grad is not None:
                torch.testing.assert_close(t.grad, r.grad)
    assert gap.grad is None
    assert not _triton(mu_w, mu_l, gap, RANGE).loss.requires_grad


def test_ties_have_zero_subgradient_like_the_reference():
    # Integer scores and gaps on a fixed pattern, not drawn from the device's random stream (which differs
    # between CPU and CUDA): 21 of the 144 d_ik = (mu_w_i - mu_l_k) - gap are exactly 0, at least one per pair,
    # and the others take both signs.
    pair = torch.arange(9, device=DEVICE)[:, None]
    sample = torch.arange(4, device=DEVICE)
    mu_w = (1 + (sample + pair) % 5).float()
    mu_l = (1 + (2 * sample + pair) % 5).float()
    gap = (pair[:, 0] % 5 - 2).float()
    d = mu_w[:, :, None] - mu_l[:, None, :] - gap[:, None, None]
    assert (d == 0).sum() == 21 and bool((d == 0).any(2).any(1).all()) and (d > 0).any() and (d < 0).any()
    upstream = torch.randn(9, device=DEVICE)
    kernel = _outputs_and_grads(_triton, mu_w, mu_l, gap, upstream)
    ref = _outputs_and_grads(reference.pairwise_gap, mu_w, mu_l, gap, upstream)
    for k, r in zip(kernel, ref):
        torch.testing.assert_close(k, r)
    # A single tie: loss 0, rewards 1, gradient 0 (not ±1/(G² R)).
    one = _outputs_and_grads(_triton, torch.tensor([[3.0]], device=DEVICE), torch.tensor([[2.0]], device=DEVICE),
                             torch.tensor([1.0], device=DEVICE), torch.ones(1, device=DEVICE))
    assert [t.item() for t in one[1:]] == [1.0, 1.0, 0.0, 0.0] and one[0].detach().item() == 0.0


def test_gradcheck_fp64():
    mu_w, mu_l, gap = (t.double() for t in _scores(3, 3, torch.float32, seed=4))
    mu_w.requires_grad_()
    mu_l.requires_grad_()
    assert (mu_w.detach()[:, :, None] - mu_l.detach()[:, None, :] - gap[:, None, None]).abs().min() > 1e-3
    assert torch.autograd.gradcheck(lambda w, l: _triton(w, l, gap.double(), RANGE).loss, (mu_w, mu_l))


def test_opcheck_and_compile():
    mu_w, mu_l, gap = _scores(6, 4, torch.float32, layout="sliced")
    s_w, s_l = gap + 2, torch.full_like(gap, 2.0)
    torch.library.opcheck(torch.ops.zr_kernels.pairwise_gap.default, (mu_w.requires_grad_(), mu_l, gap, RANGE))
    torch.library.opcheck(torch.ops.zr_kernels.gdso_rewards.default,
                          (mu_w.detach(), mu_l, s_w, s_l, RANGE, 0.5, 0.5))

    def step(w, l):
        out = pairwise_gap(w, l, gap, RANGE, backend="triton")
        r_w, r_l = gdso_rewards(w, l, s_w, s_l, 1.0, 5.0, 0.5, 0.5, backend="triton")
        return out.loss.mean() * 2, r_w + r_l

    compiled = torch.compile(step, fullgraph=True)
    w = mu_w.detach().clone().requires_grad_()
    with trace_backends() as ran:
        loss, rewards = compiled(w, mu_l)
        loss.backward()
    assert {("pairwise_gap", "triton"), ("gdso_rewards", "triton"), ("pairwise_gap.backward", "triton")} <= set(ran)
    ref_w = mu_w.detach().clone().requires_grad_()
    ref_loss = reference.pairwise_gap(ref_w, mu_l, gap, RANGE).loss.mean() * 2
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(w.grad, ref_w.grad)
    torch.testing.assert_close(rewards, sum(reference.gdso_rewards(mu_w, mu_l, s_w, s_l, 1.0, 5.0, 0.5, 0.5)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_module(reduction):
    mu_w, mu_l, gap = _scores(7, 4, torch.float32)
    module = PairwiseGapLoss(RANGE, reduction, backend="triton")
    per_pair = reference.pairwise_gap(mu_w, mu_l, gap, RANGE).loss
    expected = {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": per_pair}[reduction]
    torch.testing.assert_close(module(mu_w, mu_l, gap), expected)
    assert "reduction" in repr(module)


_quarter_scores = st.integers(4, 20).map(lambda i: i / 4)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), pairs=st.integers(1, 3), group_size=st.integers(1, 5))
def test_swapping_sides_keeps_loss_and_swaps_rewards(data, pairs, group_size):
    grid = st.lists(_quarter_scores, min_size=pairs * group_size, max_size=pairs * group_size)
    mu_w = torch.tensor(data.draw(grid), device=DEVICE).view(pairs, group_size)
    mu_l = torch.tensor(data.draw(grid), device=DEVICE).view(pairs, group_size)
    gap = torch.tensor(data.draw(st.lists(st.integers(-16, 16).map(lambda i: i / 4), min_size=pairs,
                                          max_size=pairs)), device=DEVICE)
    upstream = torch.randn(pairs, device=DEVICE)
    out = _outputs_and_grads(_triton, mu_w, mu_l, gap, upstream)
    swapped = _outputs_and_grads(_triton, mu_l, mu_w, -gap, upstream)
    # Quarter steps keep every difference exact, so the swap is exact up to the order of the sums.
    for a, b in zip(out, [swapped[0], swapped[2], swapped[1], swapped[4], swapped[3]]):
        torch.testing.assert_close(a, b)


def _rand(*shape, **kwargs):
    return torch.rand(*shape, device=kwargs.pop("device", DEVICE), **kwargs)


# A device other than the test device that still fails the check before any kernel runs.
_OTHER_DEVICE = "cpu" if DEVICE.type == "cuda" else "meta"


def _bad_cases():
    ok = dict(mu_w=_rand(3, 4), mu_l=_rand(3, 4), gap=_rand(3), score_range=RANGE)
    cases = [
        (dict(mu_w=_rand(3, 4, 1)), ValueError, "mu_w"),
        (dict(mu_l=_rand(12)), ValueError, "mu_l"),
        (dict(mu_l=_rand(3, 5)), ValueError, "mu_l"),
        (dict(mu_l=_rand(2, 4)), ValueError, "mu_l"),
        (dict(gap=_rand(4)), ValueError, "gap"),
        (dict(gap=_rand(3, 1)), ValueError, "gap"),
        (dict(mu_w=_rand(3, 0), mu_l=_rand(3, 0)), ValueError, "group size"),
        (dict(mu_w=_rand(1, 5000), mu_l=_rand(1, 5000), gap=_rand(1)), ValueError, "group size"),
        (dict(mu_w=torch.ones(3, 4, dtype=torch.int64, device=DEVICE)), TypeError, "mu_w"),
        (dict(mu_l=[[1.0] * 4] * 3), TypeError, "mu_l"),
        (dict(gap=torch.ones(3, dtype=torch.int32, device=DEVICE)), TypeError, "gap"),
        (dict(mu_l=_rand(3, 4, device=_OTHER_DEVICE)), ValueError, "mu_l"),
        (dict(gap=_rand(3, device=_OTHER_DEVICE)), ValueError, "gap"),
        (dict(score_range=0.0), ValueError, "score_range"),
        (dict(score_range=-4.0), ValueError, "score_range"),
        (dict(score_range=torch.tensor([4.0, 4.0])), TypeError, "score_range"),
        (dict(score_range=True), TypeError, "score_range"),
        (dict(score_range="4"), TypeError, "score_range"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]
    return [(dict(ok, **case), error, match) for case, error, match in cases]


@pytest.mark.parametrize("args,error,match", _bad_cases())
def test_bad_arguments_pairwise_gap(args, error, match):
    with pytest.raises(error, match=match), trace_backends() as ran:
        pairwise_gap(**{"backend": "triton", **args})
    assert ran == []


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(s_w=_rand(4)), ValueError, "s_w"),
    (dict(s_l=_rand(3, 1)), ValueError, "s_l"),
    (dict(s_l=torch.ones(3, dtype=torch.int64, device=DEVICE)), TypeError, "s_l"),
    (dict(s_w=_rand(3, device=_OTHER_DEVICE)), ValueError, "s_w"),
    (dict(mu_l=_rand(3, 2)), ValueError, "mu_l"),
    (dict(score_max=1.0), ValueError, "score_max"),
    (dict(score_max=0.5), ValueError, "score_max"),
    (dict(score_min="1"), TypeError, "score_min"),
    (dict(lambda_pt=float("nan")), ValueError, "lambda_pt"),
    (dict(lambda_pw=None), TypeError, "lambda_pw"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_arguments_gdso_rewards(kwargs, error, match):
    args = dict(mu_w=_rand(3, 4), mu_l=_rand(3, 4), s_w=_rand(3), s_l=_rand(3), score_min=1.0, score_max=5.0,
                lambda_pt=0.5, lambda_pw=0.5, backend="triton")
    args.update(kwargs)
    with pytest.raises(error, match=match), trace_backends() as ran:
        gdso_rewards(**args)
    assert ran == []


def test_bad_loss_module_arguments():
    with pytest.raises(ValueError, match="reduction"):
        PairwiseGapLoss(RANGE, "batchmean")
    with pytest.raises(ValueError, match="score_range"):
        PairwiseGapLoss(0.0)
