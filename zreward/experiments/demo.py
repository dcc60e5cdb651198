"""``zreward demo``: the whole Z-Reward recipe on synthetic data, end to end, in minutes on a CPU.

1. Synthetic text-to-image preferences (``zreward.experiments.synthetic``): shape/colour/count prompts, images with
   controlled alignment, realism, aesthetics and plausibility defects, half-point scores from the defects.
2. GDSO (Algorithm 1) trains a tiny random-init Qwen3.5 teacher on same-prompt pairs with G sampled
   reasoning outputs per candidate.
3. RISD (Algorithm 2) caches the frozen teacher's reasoning-conditioned distributions and distils them into a
   smaller tiny Qwen3.5 student that scores without reasoning.
4. PLCC / SRCC / HPA on held-out prompts before and after each stage, a PNG of the training curves and a
   JSON summary in ``--output-dir``.
5. The trained models as model folders, ``<output-dir>/student`` and ``<output-dir>/teacher``, which
   ``zreward score``, ``zreward serve`` and ``zreward evaluate`` load (``zreward.deploy.model_folder``).

On a GPU (``--device cuda``) the same run uses the fused kernels (backend auto) and Liger's GRPO loss.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from zreward.deploy.model_folder import save_model_folder
from zreward.experiments.synthetic import SyntheticPreferences
from zreward.engines import ENGINES, make_engine
from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer, tiny_teacher
from zreward.metrics import reward_metrics
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import RewardScorer
from zreward.scoring.vocab import ScoreVocab
from zreward.training.gdso import GDSOConfig, GDSOTrainer, teacher_expected_scores
from zreward.training.risd import RISDConfig, RISDTrainer, TeacherCache



@dataclass
class DemoConfig:
    steps: int = 250                # GDSO steps; RISD runs risd_steps_per_gdso_step x as many
    risd_steps_per_gdso_step: int = 2
    train_prompts: int = 24
    eval_prompts: int = 12
    candidates: int = 3
    image_size: int = 128           # 16 visual tokens per image (the tiny processor's maximum)
    spread: int | None = 1          # correlated defects (see zreward.experiments.synthetic)
    seed: int = 0
    device: str = "cpu"
    output_dir: str = "zreward-demo"
    engine: str = "hf"              # samples the teacher's rollouts (zreward.engines); "vllm" needs the vllm extra
    eval_teacher_samples: int = 2
    # lr 1e-3 for both: the random-init models' image-dependent signal at the score position is tiny (the last
    # position attends almost uniformly over ~300 prompt tokens, 16 of them visual); at 3e-3 or 1e-2 AdamW's
    # updates swamp it, the held-out ranking flips sign from one evaluation to the next and the CE stays at ln 9.
    gdso: GDSOConfig = field(default_factory=lambda: GDSOConfig(
        group_size=2, pairs_per_batch=4, steps_per_iteration=10, updates_per_batch=2, max_new_tokens=4,
        beta=0.02, lr=1e-3, alpha_pt=1.0, alpha_pw=2.0))
    risd: RISDConfig = field(default_factory=lambda: RISDConfig(batch_size=8, lr=1e-3, teacher_max_new_tokens=4))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="GDSO -> RISD -> evaluation on synthetic data with tiny models",
                                   description=__doc__.splitlines()[0])
    defaults = DemoConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"GDSO steps (RISD runs {defaults.risd_steps_per_gdso_step}x as many)")
    parser.add_argument("--output-dir", default=defaults.output_dir,
                        help="where the PNG, JSON, caches and model folders go")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--engine", choices=ENGINES, default=defaults.engine,
                        help="what samples the teacher's rollouts (GDSO, its evaluation, the RISD teacher cache); "
                             "vllm: the teacher is the bf16 hybrid variant vLLM's CPU backend runs")
    parser.set_defaults(run=_run_from_args)


def _run_from_args(args) -> int:
    run_demo(DemoConfig(steps=args.steps, output_dir=args.output_dir, seed=args.seed, device=args.device,
                        engine=args.engine))
    return 0


def run_demo(config: DemoConfig, log=print) -> dict:
    """Run the demo; returns (and writes to ``<output_dir>/summary.json``) the metrics of every stage."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    train = SyntheticPreferences(config.train_prompts, config.candidates, config.image_size, seed=config.seed,
                                 spread=config.spread)
    held_out = SyntheticPreferences(config.eval_prompts, config.candidates, config.image_size, seed=config.seed + 1,
                                    spread=config.spread)
    pairs = train.pairs()
    log(f"data: {len(train)} train images ({len(pairs)} same-prompt pairs over {len(DIMENSIONS)} dimensions), "
        f"{len(held_out)} held-out images")

    teacher = tiny_teacher(config.seed, device, config.engine)
    student = tiny_scorer(config.seed + 1, STUDENT_CONFIG, device)
    log(f"teacher {_count(teacher.model) / 1e6:.2f}M params, student {_count(student.model) / 1e6:.2f}M params")

    engine = teacher_engine(config.engine, teacher, config.seed)

    def evaluate_teacher():
        return teacher_metrics(teacher, held_out, device, config.eval_teacher_samples, config.gdso.max_new_tokens,
                               engine)

    def evaluate_student():
        return student_metrics(student, held_out, device)

    stages = {"teacher_before": evaluate_teacher(), "student_before": evaluate_student()}
    _report(log, "teacher before GDSO", stages["teacher_before"])
    _report(log, "student before RISD", stages["student_before"])

    gdso = GDSOTrainer(teacher, train, pairs, config.gdso, engine=engine)
    gdso.train(config.steps, log=lambda m: _progress(log, "gdso", m, config.steps))
    stages["teacher_after"] = evaluate_teacher()
    _report(log, "teacher after GDSO", stages["teacher_after"])

    cache = TeacherCache.build(teacher, train, num_samples=config.risd.teacher_samples,
                               max_new_tokens=config.risd.teacher_max_new_tokens,
                               temperature=config.risd.teacher_temperature, engine=engine)
    engine.close()
    cache.save(out / "teacher_cache")
    log(f"teacher distributions cached in {out / 'teacher_cache'}")
    risd_steps = config.steps * config.risd_steps_per_gdso_step
    risd = RISDTrainer(student, train, cache, config.risd)
    risd.train(risd_steps, log=lambda m: _progress(log, "risd", m, risd_steps))
    stages["student_after"] = evaluate_student()
    _report(log, "student after RISD", stages["student_after"])

    for role, scorer in (("student", student), ("teacher", teacher)):
        save_model_folder(scorer, out / role, role=role)
    log(f"model folders written to {out / 'student'} and {out / 'teacher'}")

    summary = {"config": asdict(config), "device": str(device), "stages": stages,
               "gdso_history": gdso.history, "risd_history": risd.history,
               "runtime_s": round(time.perf_counter() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(summary, out / "training_curves.png")
    log(f"wrote {out / 'summary.json'} and {out / 'training_curves.png'} in {summary['runtime_s']} s")
    return summary


def teacher_engine(name: str, teacher: RewardScorer, seed: int):
    """The engine ``name`` for the tiny teacher; vLLM sampling from ``seed``, with a context for the tiny prompts
    (not the config's 256k, whose KV cache would not fit) and eager execution (compiling graphs takes longer
    than these models run)."""
    options = {"seed": seed, "max_model_len": 2048, "enforce_eager": True} if name == "vllm" else {}
    return make_engine(name, teacher, **options)


@torch.no_grad()
def teacher_metrics(teacher: RewardScorer, data: SyntheticPreferences, device: torch.device, samples: int,
                    max_new_tokens: int, engine="hf") -> dict:
    """``held_out_metrics`` of the teacher's expected scores over ``samples`` reasoning rollouts per row, sampled
    by ``engine`` (``zreward.engines``)."""
    everything = range(len(data))
    scores = teacher_expected_scores(teacher, data.images(everything).to(device), data.prompts(everything),
                                     DIMENSIONS, samples, max_new_tokens, engine=engine)
    return held_out_metrics(scores.cpu(), data)


@torch.no_grad()
def student_metrics(student: RewardScorer, data: SyntheticPreferences, device: torch.device) -> dict:
    """``held_out_metrics`` of the student's one-token expected scores (16 images per call)."""
    chunks = [list(range(i, min(i + 16, len(data)))) for i in range(0, len(data), 16)]
    scores = torch.cat([student.student_scores(data.images(c).to(device), data.prompts(c)).mean for c in chunks])
    return held_out_metrics(scores.cpu(), data)


def held_out_metrics(scores: torch.Tensor, data: SyntheticPreferences) -> dict:
    """Pooled over (image, dimension): PLCC/SRCC of scores, HPA over same-prompt same-dimension pairs;
    plus HPA per dimension."""
    preds, targets, groups = [], [], []
    per_dimension = {}
    for d, dimension in enumerate(DIMENSIONS):
        truth = data.scores(range(len(data)), dimension)
        group = [(item.group, dimension) for item in data.items]
        per_dimension[dimension] = reward_metrics(scores[:, d].tolist(), truth.tolist(), group)["hpa"]
        preds += scores[:, d].tolist()
        targets += truth.tolist()
        groups += group
    metrics = reward_metrics(preds, targets, groups)
    metrics["hpa_per_dimension"] = per_dimension
    return metrics


def _report(log, name: str, metrics: dict) -> None:
    dims = " ".join(f"{d[:5]}={v:.2f}" for d, v in metrics["hpa_per_dimension"].items())
    log(f"{name:22s} PLCC={metrics['plcc']:+.3f} SRCC={metrics['srcc']:+.3f} HPA={metrics['hpa']:.3f} "
        f"({metrics['pairs']} pairs; {dims})")


def _progress(log, stage: str, metrics: dict, total: int) -> None:
    step = metrics["step"]
    if step == 1 or step == total or step % max(1, total // 8) == 0:
        fields = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("split", "step", "grad_norm"))
        log(f"  {stage} step {step}/{total}: {fields}")


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    gdso = summary["gdso_history"]
    steps = [m["step"] for m in gdso]
    for key in ("loss", "ce", "pairwise", "policy"):
        axes[0].plot(steps, [m[key] for m in gdso], label=key)
    axes[0].set(title="GDSO (teacher)", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [m["reward"] for m in gdso], color="tab:green", label="mean reward (Eq. 13)")
    risd = summary["risd_history"]
    twin = axes[1].twinx()
    twin.plot([m["step"] for m in risd], [m["loss"] for m in risd], color="tab:red", label="RISD KL (Eq. 15)")
    axes[1].set(title="GDSO reward / RISD loss", xlabel="step")
    axes[1].legend(loc="upper left")
    twin.legend(loc="upper right")
    stages = summary["stages"]
    names = list(stages)
    for offset, key in enumerate(("plcc", "srcc", "hpa")):
        axes[2].bar([i + 0.27 * (offset - 1) for i in range(len(names))], [stages[n][key] for n in names],
                    width=0.27, label=key.upper())
    axes[2].axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axes[2].set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
    axes[2].set(title="held-out metrics")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())
