"""The arms of ``zreward ablate``, as tasks: each builds one seed's data and fresh models and trains one arm.

A task depends only on ``(config, seed)`` and its arm (it seeds torch itself), so tasks can run in any order,
in this process or in worker processes, with the same results. Each returns ``{arm name: entry}``; an entry
holds the held-out metrics, output tokens per score, the held-out HPA curve ``[[step, hpa], ...]`` and the
trainer's history.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from zreward.experiments.demo import DemoConfig
from zreward.experiments.held_out import student_metrics, teacher_engine, teacher_metrics
from zreward.experiments.rationales import label_rationales, reasoning_probe
from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer, tiny_teacher
from zreward.training.gdso import GDSOTrainer
from zreward.training.opd import OPDTrainer
from zreward.training.rationale_sft import RationaleSFTConfig, RationaleSFTTrainer
from zreward.training.risd import RISDTrainer, TeacherCache

# GDSOConfig overrides of each teacher arm: every teacher arm is the GDSO trainer.
TEACHER_ARMS = {
    "sft": {"policy_weight": 0.0, "alpha_pw": 0.0},                           # Eq. 8 only
    "grpo": {"alpha_pt": 0.0, "alpha_pw": 0.0, "reward_source": "parsed"},    # Eq. 4 on parsed-score rewards
    "gdso": {},                                                               # Eq. 14
    "gdso_parsed": {"reward_source": "parsed"},                               # Fig. 4: Eq. 14, parsed rewards
}
# The teacher arm that is not a GDSO setting: SFT on written rationale + score (RationaleSFTTrainer).
WRITTEN_REASONING_ARM = "rewarddance"
STUDENT_ARMS = ("student_sft", "opd", "risd")
# Student arms that reason at inference: evaluated, and counted in output tokens, as the teachers are.
REASONING_STUDENT_ARMS = ("opd",)
TEACHER_FOR_RISD = "gdso"  # the teacher that RISD and OPD distil
# Role and a one-line description of every row of the results, in table order.
DESCRIPTIONS = {
    "teacher_zero_shot": ("teacher", "nothing: the initial teacher"),
    "sft": ("teacher", "CE on the score token after the sampled reasoning (Eq. 8)"),
    "rewarddance": ("teacher", "SFT on a post-hoc rationale of the label + the score token"),
    "grpo": ("teacher", "policy gradient on parsed-score rewards (Eq. 4, 7, 10, 13)"),
    "gdso": ("teacher", "Eq. 14: expectation rewards + CE + score-gap loss"),
    "gdso_parsed": ("teacher", "Eq. 14 with parsed-score rewards (Fig. 4)"),
    "student_zero_shot": ("student", "nothing: the initial student"),
    "student_sft": ("student", "CE on the human score, no teacher"),
    "opd": ("student", f"on-policy distillation from the {TEACHER_FOR_RISD} teacher (Eq. 18-19)"),
    "risd": ("student", f"KL to the cached {TEACHER_FOR_RISD} teacher (Eq. 15)"),
}


class _Seed:
    """One seed's data, fresh models and held-out evaluation (the demo's conventions: train data and teacher
    from ``seed``, held-out data and student from ``seed + 1``)."""

    def __init__(self, config, seed: int):
        self.config, self.seed, self.device = config, seed, torch.device(config.device)
        data = DemoConfig(seed=seed, train_prompts=config.train_prompts, eval_prompts=config.eval_prompts,
                          candidates=config.candidates, image_size=config.image_size, spread=config.spread,
                          level_choices=config.level_choices, annotators=config.annotators,
                          annotator_noise=config.annotator_noise)
        self.train, self.held_out = data.data(), data.data(held_out=True)

    def teacher(self):
        return tiny_teacher(self.seed, self.device, self.config.engine)

    def student(self):
        return tiny_scorer(self.seed + 1, STUDENT_CONFIG, self.device)

    def teacher_metrics(self, scorer, samples: int, max_new_tokens: int | None = None) -> dict:
        return teacher_metrics(scorer, self.held_out, self.device, samples,
                               max_new_tokens or self.config.gdso.max_new_tokens)

    def student_metrics(self, scorer) -> dict:
        return student_metrics(scorer, self.held_out, self.device)

    def student_arm(self, student, targets: TeacherCache, ticks) -> dict:
        """``student`` trained by RISD on ``targets`` (a teacher's distributions or one-hot human scores)."""
        torch.manual_seed(self.seed)
        trainer = RISDTrainer(student, self.train, targets, replace(self.config.risd, seed=self.seed))
        curve, metrics = _train(trainer, self.config.student_steps, self.config.eval_every,
                                lambda: self.student_metrics(student), ticks)
        return entry(self.seed, metrics, 1, curve, trainer.history)

    def opd_arm(self, teacher, ticks) -> dict:
        """A fresh student distilled on its own reasoning-and-score samples by the frozen ``teacher`` (Eq. 18-19),
        evaluated with its own reasoning, as the teachers are; its curve starts from its own step-0 point (the
        initial student reasoning, not the zero-shot student's direct answer)."""
        student, max_new_tokens = self.student(), self.config.opd.max_new_tokens
        torch.manual_seed(self.seed)
        initial = [0, self.teacher_metrics(student, 1, max_new_tokens)["hpa"]]
        trainer = OPDTrainer(student, teacher, self.train, replace(self.config.opd, seed=self.seed))
        curve, _ = _train(trainer, self.config.student_steps, self.config.eval_every,
                          lambda: self.teacher_metrics(student, 1, max_new_tokens), ticks)
        metrics = self.teacher_metrics(student, self.config.eval_teacher_samples, max_new_tokens)
        tokens = sum(m["output_tokens"] for m in trainer.history) / len(trainer.history)
        return entry(self.seed, metrics, tokens, [initial] + curve, trainer.history)


def zero_shot_task(config, seed: int) -> dict:
    """The initial teacher and student, evaluated as the trained arms are; their one-point curve is the step-0
    point of every arm of the same role (the teacher's with one reasoning sample, as the curves use)."""
    run = _Seed(config, seed)
    teacher, student = run.teacher(), run.student()
    torch.manual_seed(seed)
    initial_student = run.student_metrics(student)
    return {
        # output tokens are filled in from the first training batch, which the initial teacher samples
        "teacher_zero_shot": entry(seed, run.teacher_metrics(teacher, config.eval_teacher_samples), None,
                                   [[0, run.teacher_metrics(teacher, 1)["hpa"]]]),
        "student_zero_shot": entry(seed, initial_student, 1, [[0, initial_student["hpa"]]]),
    }


def teacher_task(config, seed: int, name: str, ticks) -> dict:
    """One teacher arm; the RISD teacher's task also caches its distributions and trains the RISD student."""
    run = _Seed(config, seed)
    teacher = run.teacher()
    torch.manual_seed(seed)
    engine = teacher_engine(config.engine, teacher, seed)
    trainer = GDSOTrainer(teacher, run.train, run.train.pairs(), replace(config.gdso, seed=seed, **TEACHER_ARMS[name]),
                          engine=engine)
    curve, _ = _train(trainer, config.teacher_steps, config.eval_every, lambda: run.teacher_metrics(teacher, 1), ticks)
    reasoning = sum(m["completion_tokens"] for m in trainer.history) / len(trainer.history)
    out = {name: entry(seed, run.teacher_metrics(teacher, config.eval_teacher_samples), reasoning + 1, curve,
                       trainer.history)}
    if name == TEACHER_FOR_RISD:
        risd = config.risd
        cache = TeacherCache.build(teacher, run.train, num_samples=risd.teacher_samples,
                                   max_new_tokens=risd.teacher_max_new_tokens, temperature=risd.teacher_temperature,
                                   engine=engine)
        out["risd"] = run.student_arm(run.student(), cache, ticks)
        out["opd"] = run.opd_arm(teacher, ticks)
    engine.close()
    return out


def rewarddance_task(config, seed: int, ticks) -> dict:
    """The teacher fine-tuned on post-hoc rationales of its labels + the score token, on GDSO's batches with the
    GDSO arms' optimizer settings and updates; evaluated with the reasoning it samples itself. Its output tokens,
    and how often its reasoning is a rationale and the rationale of the image's label (``reasoning_probe``), come
    from one sampled reasoning per held-out (image, dimension)."""
    run = _Seed(config, seed)
    teacher = run.teacher()
    gdso = config.gdso
    sft = RationaleSFTConfig(pairs_per_batch=gdso.pairs_per_batch, updates_per_batch=gdso.updates_per_batch,
                             lr=gdso.lr, weight_decay=gdso.weight_decay, max_grad_norm=gdso.max_grad_norm,
                             logprob_chunk=gdso.logprob_chunk, seed=seed)
    torch.manual_seed(seed)
    trainer = RationaleSFTTrainer(teacher, run.train, run.train.pairs(), label_rationales(run.train), sft)
    curve, _ = _train(trainer, config.teacher_steps, config.eval_every, lambda: run.teacher_metrics(teacher, 1), ticks)
    metrics = run.teacher_metrics(teacher, config.eval_teacher_samples)
    probe = reasoning_probe(teacher, run.held_out, run.device, gdso.max_new_tokens)
    metrics.update(rationale_format=probe["rationale_format"], rationale_match=probe["rationale_match"])
    return {WRITTEN_REASONING_ARM: entry(seed, metrics, probe["tokens_per_score"], curve, trainer.history)}


def student_sft_task(config, seed: int, ticks) -> dict:
    """The student trained on one-hot human scores: RISD's trainer without a teacher."""
    run = _Seed(config, seed)
    student = run.student()
    targets = TeacherCache.from_human_scores(run.train, student.vocab)
    return {"student_sft": run.student_arm(student, targets, ticks)}


def _train(trainer, steps: int, every: int, evaluate, ticks) -> tuple[list[list[float]], dict]:
    """``steps`` optimizer steps, a tick per step; returns the held-out HPA curve (from step ``every``) and the
    last evaluation's metrics."""
    curve = []
    for step in range(1, steps + 1):
        trainer.step()
        ticks.put(1)
        if step % every == 0 or step == steps:
            metrics = evaluate()
            curve.append([step, metrics["hpa"]])
    return curve, metrics


def entry(seed: int, metrics: dict, tokens_per_score, curve=None, history=None) -> dict:
    return {"seed": seed, "metrics": metrics, "tokens_per_score": tokens_per_score, "curve": curve or [],
            "history": history or []}
