"""On-policy distillation (Eq. 18-19): the loss against hand-computed values, the trajectory log-probs against the
scorer's own recomputation, and the trainer on tiny models."""
import copy

import pytest
import torch

from zreward.training.opd import OPDConfig, OPDTrainer, opd_advantages, opd_loss, trajectory_logprobs

# A 3-token trajectory (two reasoning tokens, then the score token): log-probs under the teacher and the student.
TEACHER = torch.tensor([[-1.0, -0.5, -2.0]])
STUDENT = torch.tensor([[-1.5, -0.5, -1.0]])


def test_eq_18_19_on_a_three_token_trajectory():
    advantages = opd_advantages(TEACHER, STUDENT, torch.ones(1, 3))
    # Eq. 18 by hand: A = log pi_T - log pi_old = (-1.0 + 1.5, -0.5 + 0.5, -2.0 + 1.0)
    assert advantages.tolist() == [[0.5, 0.0, -1.0]]
    logprobs = STUDENT.clone().requires_grad_()
    loss = opd_loss(logprobs, advantages, torch.ones(1, 3))
    # Eq. 19 by hand: -(1/3) (0.5 * -1.5 + 0 * -0.5 + -1.0 * -1.0) = -(1/3) (0.25)
    assert loss.item() == pytest.approx(-0.25 / 3)
    loss.backward()
    # d/d log pi_t = -A_t / T: the teacher's preferred token is pushed up, the dispreferred one down
    assert logprobs.grad[0].tolist() == pytest.approx([-0.5 / 3, 0.0, 1.0 / 3])


def test_padding_is_masked_and_trajectories_are_averaged():
    teacher = torch.cat([TEACHER, torch.tensor([[-0.2, -3.0, 7.0]])])
    student = torch.cat([STUDENT, torch.tensor([[-1.2, -1.0, 5.0]])])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second trajectory has two tokens
    advantages = opd_advantages(teacher, student, mask)
    assert advantages[1].tolist() == pytest.approx([1.0, -2.0, 0.0])
    # second row by hand: -(1/2) (1.0 * -1.2 + -2.0 * -1.0) = -0.4; mean with the first row's -0.25/3
    assert opd_loss(student, advantages, mask).item() == pytest.approx((-0.25 / 3 - 0.4) / 2)


def test_advantages_carry_no_gradient():
    old = STUDENT.clone().requires_grad_()
    advantages = opd_advantages(TEACHER, old, torch.ones(1, 3))
    assert not advantages.requires_grad
    logprobs = STUDENT.clone().requires_grad_()
    opd_loss(logprobs, TEACHER - logprobs, torch.ones(1, 3)).backward()  # an undetached A is detached inside
    assert logprobs.grad[0].tolist() == pytest.approx([-0.5 / 3, 0.0, 1.0 / 3])


@pytest.mark.parametrize("call, named", [
    (lambda: opd_advantages(TEACHER, STUDENT[:, :2], torch.ones(1, 3)), "old_logprobs"),
    (lambda: opd_loss(STUDENT, TEACHER, torch.ones(1, 2)), "mask"),
    (lambda: opd_loss(STUDENT[0], TEACHER[0], torch.ones(3)), "logprobs"),
])
def test_bad_shapes_name_the_argument(call, named):
    with pytest.raises(ValueError, match=named):
        call()


@pytest.fixture(scope="module")
def tiny():
    from zreward.experiments.synthetic import SyntheticPreferences
    from zreward.experiments.tiny_models import tiny_scorer

    return tiny_scorer, SyntheticPreferences(2, 2, 32, seed=0)


def test_trajectory_logprobs_match_the_scorers_recomputation(tiny):
    build, data = tiny
    scorer = build(1, {"hidden_size": 32, "intermediate_size": 64, "layer_types": ["full_attention"] * 2})
    torch.manual_seed(0)
    rollouts = scorer.teacher_rollouts(data.images([0, 1, 2]), data.prompts([0, 1, 2]), "realism", 1, 3)
    bins = torch.tensor([0, 4, 8])
    with torch.no_grad():
        logprobs, mask = trajectory_logprobs(scorer, rollouts, bins)
        reference, _ = scorer.rollout_forward(rollouts)
    lengths = rollouts.completion_mask.sum(1)
    assert mask.sum(1).tolist() == (lengths + 1).tolist()  # the reasoning tokens, then the score token
    for n, length in enumerate(lengths.tolist()):
        expected = reference[n][rollouts.completion_mask[n].bool()]
        torch.testing.assert_close(logprobs[n, :length], expected, rtol=1e-5, atol=1e-5)
        # the score token: the close-set log-prob over the K score tokens, as the scorer reads the score there
        score = rollouts.scores.probs[n, 0, bins[n]].log()
        torch.testing.assert_close(logprobs[n, lengths.max().item()], score, rtol=1e-4, atol=1e-5)


def test_trainer_learns_only_from_teacher_student_differences(tiny):
    build, data = tiny
    small = {"hidden_size": 32, "intermediate_size": 64, "layer_types": ["full_attention"] * 2}
    config = OPDConfig(batch_size=2, max_new_tokens=2, lr=1e-3)
    student = build(1, small)
    twin = build(1, small)  # the same weights: every advantage is 0, so nothing moves
    initial = copy.deepcopy(student.model.state_dict())
    torch.manual_seed(0)
    metrics = OPDTrainer(student, twin, data, config, dimensions=("realism",)).step()
    assert metrics["loss"] == 0.0 and metrics["reverse_kl"] == 0.0 and metrics["grad_norm"] == 0.0
    assert all(torch.equal(v, initial[k]) for k, v in student.model.state_dict().items())

    teacher = build(0, {"hidden_size": 48, "intermediate_size": 96, "layer_types": ["full_attention"] * 2})
    torch.manual_seed(0)
    trainer = OPDTrainer(student, teacher, data, config, dimensions=("realism",))
    history = trainer.train(2)
    assert [m["step"] for m in history] == [1, 2]
    assert all(1 <= m["output_tokens"] <= config.max_new_tokens + 1 for m in history)
    assert all(0.0 < m["score_token_share"] <= 1.0 for m in history)
    assert any(not torch.equal(v, initial[k]) for k, v in student.model.state_dict().items())


def test_teacher_with_other_score_tokens_is_refused(tiny):
    build, data = tiny
    small = {"hidden_size": 32, "intermediate_size": 64, "layer_types": ["full_attention"] * 2}
    student, teacher = build(1, small), build(1, small)
    teacher.vocab = copy.copy(teacher.vocab)
    teacher.vocab.token_ids = list(reversed(teacher.vocab.token_ids))
    with pytest.raises(ValueError, match="teacher score tokens"):
        OPDTrainer(student, teacher, data, OPDConfig(batch_size=2))
