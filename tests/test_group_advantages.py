"""group_advantages: Triton kernel vs the PyTorch reference (three-way rule), properties, TRL parity, checks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zr_kernels import group_advantages, reference, trace_backends
from tests.helpers import ATOL, DEVICE, DTYPES, assert_three_way

SCALES = ("group", "batch", "none")


def _rewards(n, dtype, *, seed=0, strided=False):
    torch.manual_seed(seed)
    full = torch.randn(2 * n if strided else n, device=DEVICE) * 2 + 0.5
    return full.to(dtype)[::2] if strided else full.to(dtype)


def _kernel(*args, **kwargs):
    with trace_backends() as ran:
        out = group_advantages(*args, **kwargs, backend="triton")
    assert ran == ([("group_advantages", "triton")] if out.numel() else [])  # nothing to launch for N = 0
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,group_size,strided", [(1, 1, False), (7, 7, True), (112, 16, False), (111, 1, True),
                                                  (504, 8, True), (508, 4, False), (16, 2, True)])
def test_matches_reference_three_way(dtype, n, group_size, strided):
    rewards = _rewards(n, dtype, strided=strided)
    assert rewards.is_contiguous() == (not strided or n == 1)
    for scale in SCALES:
        for unbiased in (True, False):
            kernel = _kernel(rewards, group_size, scale, unbiased)
            eager = reference.group_advantages(rewards, group_size, scale, unbiased)
            ref32 = reference.group_advantages(rewards.float(), group_size, scale, unbiased)
            assert kernel.dtype == torch.float32 and not kernel.requires_grad
            assert_three_way(f"{scale}/{unbiased}", kernel, eager, ref32, ATOL[dtype] * 10)


def test_large_groups_and_many_batch_partials():
    rewards = _rewards(2 * 4500, torch.float32, strided=True)  # G > one column block, N > one partial block
    for scale in SCALES:
        torch.testing.assert_close(_kernel(rewards, 2250, scale), reference.group_advantages(rewards, 2250, scale))
    torch.testing.assert_close(_kernel(rewards, 3, "batch"), reference.group_advantages(rewards, 3, "batch"))


def test_group_of_one_and_constant_groups_give_exact_zeros_without_nan():
    for scale in SCALES:
        assert torch.equal(_kernel(_rewards(9, torch.float32), 1, scale, True), torch.zeros(9, device=DEVICE))
    constant = torch.full((12,), 0.1, device=DEVICE)
    for scale in SCALES:
        for eps in (0.0, 1e-6):
            assert torch.equal(_kernel(constant, 4, scale, eps=eps), torch.zeros(12, device=DEVICE))
            assert torch.equal(reference.group_advantages(constant, 4, scale, eps=eps), torch.zeros(12, device=DEVICE))


def test_no_gradient_and_empty_input():
    rewards = _rewards(8, torch.float32).requires_grad_()
    assert not _kernel(rewards, 4).requires_grad
    assert not reference.group_advantages(rewards, 4).requires_grad
    assert _kernel(torch.empty(0, device=DEVICE), 4, "batch").shape == (0,)


def test_opcheck_and_compile():
    rewards = _rewards(24, torch.float32)
    for scale in SCALES:
        torch.library.opcheck(torch.ops.zr_kernels.group_advantages.default, (rewards, 4, scale, True, 1e-6))
    compiled = torch.compile(lambda r: group_advantages(r, 4, "batch", backend="triton") * 2, fullgraph=True)
    with trace_backends() as ran:
        out = compiled(rewards)
    assert ("group_advantages", "triton") in ran
    torch.testing.assert_close(out, reference.group_advantages(rewards, 4, "batch") * 2)


def test_trl_grpo_convention():
    """TRL's ``GRPOTrainer._generate_and_score_completions`` (trl/trainer/grpo_trainer.py, the
    ``multi_objective_aggregation == "sum_then_normalize"`` branch): centre by the group mean, divide by
    ``trl.trainer.utils.nanstd`` (Bessel-corrected) of the group or of the whole batch plus 1e-4, or not at all."""
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    group_size = 8
    rewards = _rewards(64, torch.float32)
    grouped = rewards.view(-1, group_size)
    centered = rewards - grouped.mean(1).repeat_interleave(group_size)
    std = {"group": nanstd(grouped, dim=1).repeat_interleave(group_size), "batch": nanstd(rewards).expand_as(rewards)}
    expected = {"group": centered / (std["group"] + 1e-4), "batch": centered / (std["batch"] + 1e-4),
                "none": centered}
    for scale in SCALES:
        torch.testing.assert_close(_kernel(rewards, group_size, scale, True, 1e-4), expected[scale])


# Quarter steps keep every sum and shift exact, so the properties hold up to the rounding of one division
# (arbitrary floats allow groups whose spread is one ulp, where any rounding changes the answer).
_quarters = st.integers(-400, 400).map(lambda i: i / 4)


def _groups(group_size):
    return st.lists(st.lists(_quarters, min_size=group_size, max_size=group_size), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 8).flatmap(_groups), rng=st.randoms(use_true_random=False),
       constant=_quarters, scale=st.sampled_from(SCALES))
def test_properties(groups, rng, constant, scale):
    group_size = len(groups[0])
    rewards = torch.tensor([x for g in groups for x in g], device=DEVICE)
    adv = _kernel(rewards, group_size, scale)

    # A constant group has advantage exactly 0. (Filled from ``rewards``, not from ``flat`` itself: CUDA refuses a
    # fill whose source element overlaps the destination.)
    flat = rewards.clone()
    flat[:group_size] = rewards[0]
    assert torch.all(_kernel(flat, group_size, scale)[:group_size] == 0)

    # Permuting rewards inside a group permutes its advantages.
    perm = torch.arange(rewards.numel(), device=DEVICE)
    for g in range(len(groups)):
        order = list(range(group_size))
        rng.shuffle(order)
        perm[g * group_size:(g + 1) * group_size] = torch.tensor(order, device=DEVICE) + g * group_size
    torch.testing.assert_close(_kernel(rewards[perm], group_size, scale), adv[perm], atol=1e-3, rtol=1e-3)

    # Shifting one group (or, for the batch std, every reward) changes nothing.
    shifted = rewards.clone()
    if scale == "batch":
        shifted += constant
    else:
        shifted[:group_size] += constant
    torch.testing.assert_close(_kernel(shifted, group_size, scale), adv, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rewards=[1.0, 2.0]), TypeError, "rewards"),
    (dict(rewards=torch.ones(4, dtype=torch.int64, device=DEVICE)), TypeError, "rewards"),
    (dict(rewards=torch.ones(2, 2, device=DEVICE)), ValueError, "rewards"),
    (dict(group_size=3), ValueError, "group_size"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(group_size=2.0), TypeError, "group_size"),
    (dict(group_size=True), TypeError, "group_size"),
    (dict(scale="std"), ValueError, "scale"),
    (dict(unbiased=1), TypeError, "unbiased"),
    (dict(eps=-1e-6), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps="1e-6"), TypeError, "eps"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(rewards=torch.ones(4, device=DEVICE), group_size=2)
    args.update(kwargs)
    with pytest.raises(error, match=match), trace_backends() as ran:
        group_advantages(**args)
    assert ran == []
