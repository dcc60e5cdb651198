"""Micro-batching never changes a reward: an image's score distribution is the same scored alone or in any batch
(other images, other sizes, other prompts long and short, so other padding, other dimensions), through
``RewardScorer.student_scores``, ``zreward.deploy.engine.score_images`` and the service's micro-batcher.

Tolerance, fp32 on the CPU: a batch may only change the order of fp32 sums (the BLAS blocking of larger matrices,
where the shared prompt prefix ends), which moves the probabilities (about 0.1 each) by a few 1e-8; measured at
most 3e-8. ``ATOL = 1e-6`` leaves room for other BLAS builds and CPUs, and is still far below what a real leak
between rows changes: another prompt moves this tiny model's probabilities by about 1e-3, another image by about
4e-5 (both checked below, so the comparison can fail).
"""
import numpy as np
import pytest
import torch

from zreward.deploy.batcher import Job, MicroBatcher
from zreward.deploy.engine import Scoring, score_images
from zreward.deploy.images import to_float_chw
from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer
from zreward.scoring.rubric import DIMENSIONS

ATOL = 1e-6
SHORT = "a cat"
LONG = "a lighthouse on a cliff at dusk with seagulls over a stormy sea, " * 6


def _images(count, height=32, width=32, seed=0):
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.fixture(scope="module", params=["full attention", "linear attention"])
def scorer(request):
    # The student's layers, and Qwen3.5's gated delta net, whose recurrent state a padding bug would corrupt.
    return tiny_scorer(5, STUDENT_CONFIG if request.param == "full attention" else {})


@pytest.fixture(scope="module")
def alone(scorer):
    """The target image scored on its own, with a short and with a long prompt (``[D, K]`` probs each)."""
    target = _images(1, seed=1)
    with torch.no_grad():
        return target, {p: scorer.student_scores(target, [p]).probs[0] for p in (SHORT, LONG)}


def test_the_comparison_can_fail(scorer, alone):
    target, probs = alone
    assert (probs[SHORT] - probs[LONG]).abs().max() > 100 * ATOL
    with torch.no_grad():
        other_image = scorer.student_scores(_images(1, seed=2), [SHORT]).probs[0]
    assert (probs[SHORT] - other_image).abs().max() > 10 * ATOL


@pytest.mark.parametrize("prompt, neighbours", [(SHORT, [LONG, "b", SHORT]), (LONG, [SHORT, "", LONG + LONG])],
                         ids=["short among longer", "long among shorter"])
def test_student_scores_do_not_depend_on_the_batch(scorer, alone, prompt, neighbours):
    target, probs = alone
    others = _images(3, seed=3)
    images = torch.cat([others[:1], target, others[1:]])  # the target second: rows before and after it
    with torch.no_grad():
        batch = scorer.student_scores(images, [neighbours[0], prompt, *neighbours[1:]])
        one_dimension = scorer.student_scores(images, [neighbours[0], prompt, *neighbours[1:]], ("aesthetics",))
    _close(batch.probs[1], probs[prompt])
    _close(one_dimension.probs[1, 0], probs[prompt][DIMENSIONS.index("aesthetics")])


STUDENT_ONLY = pytest.mark.parametrize("scorer", ["full attention"], indirect=True)  # the batching above it


@STUDENT_ONLY
def test_score_images_does_not_depend_on_the_batch(scorer, alone):
    target, probs = alone
    images = [*_images(2, 32, 64, seed=4), target[0], *_images(2, seed=5), _images(1, 64, 32, seed=6)[0]]
    prompts = [LONG, SHORT, SHORT, "b", LONG, SHORT]
    dist = score_images(scorer, images, prompts, DIMENSIONS)
    _close(dist.probs[2], probs[SHORT])
    reordered = score_images(scorer, images[::-1], prompts[::-1], ("realism", "plausibility"))
    _close(reordered.probs[3], probs[SHORT][[DIMENSIONS.index("realism"), DIMENSIONS.index("plausibility")]])


@STUDENT_ONLY
def test_the_service_batcher_does_not_change_a_reward(scorer, alone):
    target, probs = alone
    uint8 = (target[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    rng = np.random.default_rng(7)
    others = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in ((32, 32), (32, 64), (32, 32))]
    with torch.no_grad():
        want = scorer.student_scores(to_float_chw(uint8)[None], [SHORT]).probs[0]  # the 8-bit copy, alone
    batcher = MicroBatcher(scorer, max_batch=8, max_wait_s=5.0, max_queue_images=8)
    jobs = [Job(others[:2], [LONG, "b"], Scoring()),
            Job([uint8], [SHORT], Scoring(("realism", "aesthetics"), "min")),
            Job(others[2:], [SHORT], Scoring(("plausibility",)))]
    futures = [batcher.submit(job) for job in jobs]  # queued before the worker starts: one batch
    batcher.start()
    try:
        record = futures[1].result(timeout=60)[0]
    finally:
        batcher.close()
    assert batcher.stats["batches"] == 1 and batcher.stats["images"] == 4
    for dimension in ("realism", "aesthetics"):
        _close(torch.tensor(record["dimensions"][dimension]["probs"]), want[DIMENSIONS.index(dimension)])
    assert record["reward"] == pytest.approx(min(float(want[1] @ scorer.vocab.values),
                                                 float(want[2] @ scorer.vocab.values)), abs=1e-5)
