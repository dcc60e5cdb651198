"""``zreward demo``: the whole Z-Reward recipe on synthetic data, end to end, in minutes on a CPU, through the same
entry points a user runs on real data (``zreward train teacher|student``).

1. Synthetic text-to-image preferences (``zreward.experiments.synthetic``): shape/colour/count prompts, images with
   controlled alignment, realism, aesthetics and plausibility defects, half-point scores from the defects; written
   as PNG files and an annotation JSONL (``<output-dir>/data``: train, val and test splits, the test split from
   other prompts), and tiny random-init Qwen3.5 base models written as model folders (``<output-dir>/base``).
2. ``train_teacher`` (GDSO, Algorithm 1) trains the teacher on same-prompt pairs with G sampled reasoning outputs per
   candidate, evaluating on the val split and keeping the best checkpoint.
3. ``train_student`` (RISD, Algorithm 2) caches the trained teacher's reasoning-conditioned distributions and distils
   them into a smaller student that scores without reasoning.
4. PLCC / SRCC / HPA on the test split before and after each stage, a PNG of the training curves and a JSON summary
   in ``--output-dir``.
5. The trained models as model folders, ``<output-dir>/student`` and ``<output-dir>/teacher``, which
   ``zreward score``, ``zreward serve`` and ``zreward evaluate`` load (``zreward.deploy.model_folder``).

On a GPU (``--device cuda``) the same run uses the fused kernels (backend auto) and Liger's GRPO loss.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from zreward.cli import positive_int
from zreward.deploy.model_folder import load_model_folder
from zreward.engines import ENGINES
from zreward.experiments.files import save_base_model, write_annotations
from zreward.experiments.held_out import student_metrics, teacher_engine, teacher_metrics
from zreward.experiments.synthetic import ANCHOR_LEVELS, SyntheticPreferences
from zreward.experiments.tiny_models import STUDENT_CONFIG, TEACHER_CONFIG, VLLM_TEACHER_CONFIG
from zreward.scoring.rubric import DIMENSIONS
from zreward.train.config import StudentConfig, TeacherConfig
from zreward.train.run import train_student, train_teacher
from zreward.training.base import read_log
from zreward.training.gdso import GDSOConfig
from zreward.training.risd import RISDConfig


@dataclass
class DemoConfig:
    # 800 GDSO steps: at 600 the held-out teacher HPA of one seed in ten runs (5 seeds x 1 and 2 threads) ended at
    # 0.843, and the val HPA of most seeds was still rising; about 5 minutes a seed on a 2-core CPU.
    steps: int = 800                # GDSO steps; RISD runs risd_steps_per_gdso_step x as many
    risd_steps_per_gdso_step: int = 1
    # 150 prompts x 4 candidates = 600 training images (2400 labels), more than the student can memorise in its
    # RISD steps; 20 held-out prompts x 4 candidates give about 380 same-prompt non-tied pairs (HPA's binomial
    # standard error about 0.02 at 0.85).
    train_prompts: int = 150
    eval_prompts: int = 20          # the test split: the held-out figures the demo reports
    val_prompts: int = 8            # the val split: evaluated while training, picks the best checkpoint
    eval_every: int = 200           # GDSO / RISD steps between evaluations on the val split
    final_model: str = "best"       # each stage keeps "best" (highest val HPA, maybe the untrained model) or "last"
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

    def __post_init__(self):
        # The trainers' own step counts and seeds follow the demo's, so that summary.json states what ran: GDSO's
        # steps rounded up to whole reference iterations, RISD's risd_steps_per_gdso_step x as many.
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        iteration = min(self.gdso.steps_per_iteration, self.steps)
        self.gdso = replace(self.gdso, steps_per_iteration=iteration, iterations=-(-self.steps // iteration),
                            seed=self.seed)
        self.risd = replace(self.risd, steps=self.steps * self.risd_steps_per_gdso_step, seed=self.seed)

    def data(self, held_out: bool = False, val: bool = False) -> SyntheticPreferences:
        """The training data (from ``seed``), the held-out test data (from ``seed + 1``, other prompts) or the val
        data (from ``seed + 2``)."""
        prompts, offset = ((self.val_prompts, 2) if val else (self.eval_prompts, 1) if held_out
                           else (self.train_prompts, 0))
        return SyntheticPreferences(prompts, self.candidates, self.image_size, seed=self.seed + offset,
                                    spread=self.spread, annotators=self.annotators,
                                    annotator_noise=self.annotator_noise, level_choices=self.level_choices)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="GDSO -> RISD -> evaluation on synthetic data with tiny models",
                                   description=__doc__.splitlines()[0])
    defaults = DemoConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"GDSO steps (RISD runs {defaults.risd_steps_per_gdso_step}x as many)")
    parser.add_argument("--output-dir", default=defaults.output_dir,
                        help="where the PNG, JSON, caches and model folders go")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the (first) seed")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="run seeds SEED..SEED+N-1, each in <output-dir>/seed-<s>, and print the held-out metrics "
                             "as mean ± sd over them (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--engine", choices=ENGINES, default=defaults.engine,
                        help="what samples the teacher's rollouts (GDSO, its evaluation, the RISD teacher cache); "
                             "vllm: the teacher is the bf16 hybrid variant vLLM's CPU backend runs")
    parser.set_defaults(run=_run_from_args)


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
    torch.manual_seed(config.seed)  # the untrained teacher's sampled reasoning (the runs seed themselves)
    train, held_out = config.data(), config.data(held_out=True)
    data = write_demo_data(config, out / "data")
    log(f"data: {len(train)} train images ({len(train.pairs())} same-prompt pairs over {len(DIMENSIONS)} "
        f"dimensions), {config.val_prompts * config.candidates} val and {len(held_out)} test images in {data}")
    teacher_base, student_base = write_base_models(config, out / "base")

    def evaluate_teacher(folder) -> dict:
        teacher = load_model_folder(folder, device, _teacher_dtype(config), require_metadata=False)
        engine = teacher_engine(config.engine, teacher, config.seed)
        try:
            return teacher_metrics(teacher, held_out, device, config.eval_teacher_samples,
                                   config.gdso.max_new_tokens, engine)
        finally:
            engine.close()

    def evaluate_student(folder) -> dict:
        return student_metrics(load_model_folder(folder, device, require_metadata=False), held_out, device)

    stages = {"teacher_before": evaluate_teacher(teacher_base), "student_before": evaluate_student(student_base)}
    _report(log, "teacher before GDSO", stages["teacher_before"])
    _report(log, "student before RISD", stages["student_before"])

    runs = out / "runs"
    teacher_config = demo_teacher_config(config, teacher_base, data, runs / "teacher")
    teacher = _move(train_teacher(teacher_config, log=_quiet(log), progress=False), out / "teacher")
    gdso_history = _train_records(runs / "teacher")
    for record in gdso_history:
        _progress(log, "gdso", record, teacher_config.iterations * teacher_config.steps_per_iteration)
    stages["teacher_after"] = evaluate_teacher(teacher)
    _report(log, "teacher after GDSO", stages["teacher_after"])

    student_config = demo_student_config(config, student_base, teacher, data, runs / "student")
    student = _move(train_student(student_config, log=_quiet(log), progress=False), out / "student")
    risd_history = _train_records(runs / "student")
    for record in risd_history:
        _progress(log, "risd", record, student_config.steps)
    stages["student_after"] = evaluate_student(student)
    _report(log, "student after RISD", stages["student_after"])
    log(f"model folders written to {student} and {teacher}; training runs (logs, checkpoints, the teacher cache) "
        f"in {runs}")

    summary = {"config": asdict(config), "device": str(device), "stages": stages,
               "gdso_history": gdso_history, "risd_history": risd_history,
               "runtime_s": round(time.perf_counter() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(summary, out / "training_curves.png")
    log(f"wrote {out / 'summary.json'} and {out / 'training_curves.png'} in {summary['runtime_s']} s")
    return summary


def write_demo_data(config: DemoConfig, folder: Path) -> Path:
    """The demo's data as a user has it: PNG files and one annotation JSONL with a train split (``config.data()``),
    a val split and a test split (the held-out prompts). Returns the JSONL."""
    write_annotations(config.data(), folder, {"train": config.train_prompts})
    write_annotations(config.data(val=True), folder, {"val": config.val_prompts}, append=True)
    return write_annotations(config.data(held_out=True), folder, {"test": config.eval_prompts}, append=True)


def write_base_models(config: DemoConfig, folder: Path) -> tuple[Path, Path]:
    """The tiny random-init teacher and student as base model folders (``save_pretrained`` of model, tokenizer and
    image processor), as a user's checkpoints are; the teacher is the variant vLLM's CPU backend runs for
    ``engine = "vllm"``."""
    teacher = TEACHER_CONFIG if config.engine != "vllm" else VLLM_TEACHER_CONFIG
    return (save_base_model(folder / "teacher", seed=config.seed, **teacher),
            save_base_model(folder / "student", seed=config.seed + 1, **STUDENT_CONFIG))


def demo_teacher_config(config: DemoConfig, base: Path, data: Path, output_dir: Path) -> TeacherConfig:
    """``config.gdso`` as a ``zreward train teacher`` config: full fine-tuning in fp32 (bf16 for the vLLM teacher)."""
    return TeacherConfig(**asdict(config.gdso), **_run_keys(config, base, data, output_dir),
                         dtype=_teacher_dtype(config), eval_samples=config.eval_teacher_samples,
                         engine_max_model_len=2048, engine_enforce_eager=True)


def demo_student_config(config: DemoConfig, base: Path, teacher: Path, data: Path, output_dir: Path) -> StudentConfig:
    """``config.risd`` as a ``zreward train student`` config distilling ``teacher``."""
    return StudentConfig(**asdict(config.risd), **_run_keys(config, base, data, output_dir),
                         teacher_model=str(teacher), dtype="float32", teacher_dtype=_teacher_dtype(config),
                         engine_max_model_len=2048, engine_enforce_eager=True)


def _run_keys(config: DemoConfig, base: Path, data: Path, output_dir: Path) -> dict:
    return dict(base_model=str(base), data=str(data), output_dir=str(output_dir), device=config.device,
                engine=config.engine, lora_rank=0, gradient_checkpointing=False, eval_every=config.eval_every,
                save_every=config.eval_every, final_model=config.final_model)


def _teacher_dtype(config: DemoConfig) -> str:
    return "bfloat16" if config.engine == "vllm" else "float32"  # vLLM's CPU backend: linear attention in bf16


def _move(folder: Path, destination: Path) -> Path:
    """The model folder a run wrote, moved to ``destination`` (replacing an earlier demo's)."""
    if destination.exists():
        shutil.rmtree(destination)
    return Path(shutil.move(str(folder), str(destination)))


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_log(run / "log.jsonl") if r["split"] == "train"]


def _quiet(log):
    """The training runs' messages, indented under the demo's."""
    return lambda message: log(f"  {message}")


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
