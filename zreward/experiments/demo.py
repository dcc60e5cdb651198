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

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from zreward.deploy.model_folder import save_model_folder
from zreward.experiments.synthetic import ANCHOR_LEVELS, SyntheticPreferences
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
    steps: int = 600                # GDSO steps; RISD runs risd_steps_per_gdso_step x as many
    risd_steps_per_gdso_step: int = 1
    # 150 prompts x 4 candidates = 600 training images (2400 labels), more than the student can memorise in its
    # RISD steps; 20 held-out prompts x 4 candidates give about 380 same-prompt non-tied pairs (HPA's binomial
    # standard error about 0.02 at 0.85).
    train_prompts: int = 150
    eval_prompts: int = 20
    candidates: int = 4
    image_size: int = 64            # 16 visual tokens per image with the tiny models' 8-pixel patches
    spread: int | None = None       # independent defects per dimension (see zreward.experiments.synthetic)
    level_choices: tuple[int, ...] = ANCHOR_LEVELS  # each defect at one of the rubric's five anchors
    annotators: int = 1             # clean labels: one annotation per (image, dimension), no noise
    annotator_noise: float = 0.0
    seed: int = 0
    device: str = "cpu"
    output_dir: str = "zreward-demo"
    engine: str = "hf"              # samples the teacher's rollouts (zreward.engines); "vllm" needs the vllm extra
    eval_teacher_samples: int = 2
    # P = 8 pairs (16 images) per batch and one update per batch: in measured runs the held-out HPA grew with the
    # number of distinct images a step sees, and a second update on the same rollouts cost a second backward for
    # little gain.
    gdso: GDSOConfig = field(default_factory=lambda: GDSOConfig(
        group_size=2, pairs_per_batch=8, steps_per_iteration=10, updates_per_batch=1, max_new_tokens=4,
        beta=0.02, lr=1e-3, alpha_pt=1.0, alpha_pw=2.0))
    risd: RISDConfig = field(default_factory=lambda: RISDConfig(batch_size=8, lr=1e-3, teacher_max_new_tokens=4))

    def data(self, held_out: bool = False) -> SyntheticPreferences:
        """The training data (from ``seed``) or the held-out data (from ``seed + 1``, other prompts)."""
        return SyntheticPreferences(self.eval_prompts if held_out else self.train_prompts, self.candidates,
                                    self.image_size, seed=self.seed + int(held_out), spread=self.spread,
                                    annotators=self.annotators, annotator_noise=self.annotator_noise,
                                    level_choices=self.level_choices)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="GDSO -> RISD -> evaluation on synthetic data with tiny models",
                                   description=__doc__.splitlines()[0])
    defaults = DemoConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"GDSO steps (RISD runs {defaults.risd_steps_per_gdso_step}x as many)")
    parser.add_argument("--output-dir", default=defaults.output_dir,
                        help="where the PNG, JSON, caches and model folders go")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the (first) seed")
    parser.add_argument("--seeds", type=_positive_int, default=1,
                        help="run seeds SEED..SEED+N-1, each in <output-dir>/seed-<s>, and print the held-out metrics "
                             "as mean ± sd over them (default %(default)s)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--engine", choices=ENGINES, default=defaults.engine,
                        help="what samples the teacher's rollouts (GDSO, its evaluation, the RISD teacher cache); "
                             "vllm: the teacher is the bf16 hybrid variant vLLM's CPU backend runs")
    parser.set_defaults(run=_run_from_args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _run_from_args(args) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig(steps=args.steps, output_dir=args.output_dir, seed=args.seed, device=args.device,
                        engine=args.engine)
    if args.seeds == 1:
        run_demo(config)
    else:
        run_demo_seeds(config, args.seeds)
    return 0


def run_demo_seeds(config: DemoConfig, seeds: int, log=print) -> dict:
    """``run_demo`` for seeds ``config.seed .. config.seed + seeds - 1``, each in ``<output_dir>/seed-<s>``; writes
    ``<output_dir>/seeds.json`` (every seed's stages and the mean ± sample sd of each metric over seeds) and logs
    the table. Returns what the file holds."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    runs = []
    for seed in range(config.seed, config.seed + seeds):
        log(f"=== seed {seed}")
        summary = run_demo(replace(config, seed=seed, output_dir=str(out / f"seed-{seed}")), log)
        runs.append({"seed": seed, "stages": summary["stages"], "runtime_s": summary["runtime_s"]})
    result = {"config": asdict(config), "seeds": [run["seed"] for run in runs], "runs": runs,
              "mean_sd": {stage: {key: _mean_sd([run["stages"][stage][key] for run in runs]) for key in SEED_METRICS}
                          for stage in runs[0]["stages"]},
              "threads": torch.get_num_threads(), "runtime_s": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(result, indent=1))
    log(f"held-out metrics over seeds {result['seeds'][0]}..{result['seeds'][-1]} (mean ± sd, "
        f"{result['threads']} torch thread(s), {result['runtime_s'] / 60:.1f} min):")
    for stage, stats in result["mean_sd"].items():
        log(f"  {stage:15s} " + "  ".join(f"{key.upper()} {stat['mean']:+.3f} ± {stat['sd']:.3f}"
                                         for key, stat in stats.items()))
    return result


SEED_METRICS = ("hpa", "plcc", "srcc")


def _mean_sd(values) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def run_demo(config: DemoConfig, log=print) -> dict:
    """Run the demo; returns (and writes to ``<output_dir>/summary.json``) the metrics of every stage."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    train, held_out = config.data(), config.data(held_out=True)
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

    gdso = GDSOTrainer(teacher, train, pairs, replace(config.gdso, seed=config.seed), engine=engine)
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
    risd = RISDTrainer(student, train, cache, replace(config.risd, seed=config.seed))
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
    """Four panels, each stage on its own x axis: GDSO's losses and its mean reward against GDSO steps, RISD's KL
    against RISD steps, and the held-out metrics before and after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    gdso = summary["gdso_history"]
    steps = [m["step"] for m in gdso]
    for key in ("loss", "ce", "pairwise", "policy"):
        axes[0].plot(steps, [m[key] for m in gdso], label=key, linewidth=0.8)
    axes[0].set(title="GDSO (teacher): Eq. 14 and its parts", xlabel="GDSO step")
    axes[0].legend()
    axes[1].plot(steps, [m["reward"] for m in gdso], color="tab:green", linewidth=0.8)
    axes[1].set(title="GDSO: mean reward (Eq. 13)", xlabel="GDSO step")
    risd = summary["risd_history"]
    axes[2].plot([m["step"] for m in risd], [m["loss"] for m in risd], color="tab:red", linewidth=0.8)
    axes[2].set(title="RISD (student): KL to the teacher (Eq. 15)", xlabel="RISD step", yscale="log")
    stages = summary["stages"]
    names = list(stages)
    for offset, key in enumerate(("plcc", "srcc", "hpa")):
        axes[3].bar([i + 0.27 * (offset - 1) for i in range(len(names))], [stages[n][key] for n in names],
                    width=0.27, label=key.upper())
    axes[3].axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axes[3].set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
    axes[3].set(title="held-out metrics")
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())
