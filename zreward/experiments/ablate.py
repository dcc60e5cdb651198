"""``zreward ablate``: the paper's comparisons, in miniature, on the demo's synthetic data and tiny models.

* Teacher (Table 2): SFT on the score token (Eq. 8) vs GRPO (parsed-score rewards, no direct losses) vs GDSO
  (Eq. 14 with expectation rewards).
* Fig. 4: GDSO with rewards from the score distribution's expectation vs from the parsed score.
* Teacher (Table 2): RewardDance-style SFT on post-hoc rationales of the labels + the score token.
* Student (Table 3): RISD (KL to the cached GDSO teacher, Eq. 15) vs SFT on the human scores alone vs on-policy
  distillation from the same teacher (OPD, Eq. 18-19).

The SFT / GRPO / GDSO teacher arms are :class:`~zreward.training.gdso.GDSOTrainer` with other weights or reward
source, the RewardDance-style arm :class:`~zreward.training.rationale_sft.RationaleSFTTrainer` on GDSO's batches; the
SFT and RISD students are :class:`~zreward.training.risd.RISDTrainer`, the SFT one on one-hot human targets, the OPD
student :class:`~zreward.training.opd.OPDTrainer` (see :mod:`zreward.experiments.arms`).
Within a seed all arms see the same data, the same initial model and the same number of optimizer steps and
rollouts. Writes ``ablation.json`` (every per-seed number, the curves and the training histories),
``ablation.md`` and ``ablation.png``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zreward.cli import positive_int, probability
from zreward.engines import ENGINES
from zreward.experiments.arms import (DESCRIPTIONS, REASONING_STUDENT_ARMS, STUDENT_ARMS, TEACHER_ARMS,
                                      TEACHER_FOR_RISD, WRITTEN_REASONING_ARM, rewarddance_task, student_sft_task,
                                      teacher_task, zero_shot_task)
from zreward.experiments.demo import DemoConfig
from zreward.experiments.report import summarise, write_plot, write_table
from zreward.training.gdso import GDSOConfig
from zreward.training.opd import OPDConfig
from zreward.training.risd import RISDConfig

_DEMO = DemoConfig()


@dataclass
class AblationConfig:
    """What ``zreward ablate`` runs: seeds 0..seeds-1, the step budget every arm gets, and the demo's data, models
    and trainer settings (``zreward.experiments.demo``) shared by all arms."""

    seeds: int = 5
    # The arms to train (names of TRAINED_ARMS); the zero-shot rows always come along, and risd and opd come
    # with the gdso teacher they distil. None: all of them.
    arms: tuple[str, ...] | None = None
    # 200 of the demo's 800 GDSO steps: every arm over five seeds took 37 minutes on a 2-core CPU, so the demo's
    # full budget would take about four times that; by step 200 GDSO is past its steepest rise (val HPA about 0.8).
    teacher_steps: int = 200         # batches of every teacher arm (gdso.updates_per_batch optimizer updates each)
    student_steps: int = 200         # steps (= optimizer updates) of every student arm
    eval_every: int = 100            # held-out HPA for the training curves, every this many steps
    device: str = "cpu"
    # One thread per process: the tiny models' ops are too small to split, and on a shared CPU OpenMP threads
    # spin against other processes (0.22 s per GDSO step with 1 thread, 0.7-2.9 s with 2, on a loaded 2-core
    # machine). The cores are used by running arms in parallel worker processes instead.
    threads: int = 1
    workers: int | None = None       # worker processes; None: one per CPU core, at most one per arm (one on CUDA)
    output_dir: str = "zreward-ablate"
    engine: str = "hf"               # samples the GDSO teachers' rollouts and the RISD cache (zreward.engines)
    train_prompts: int = _DEMO.train_prompts
    eval_prompts: int = _DEMO.eval_prompts
    candidates: int = _DEMO.candidates
    image_size: int = _DEMO.image_size
    spread: int | None = _DEMO.spread
    level_choices: tuple[int, ...] = _DEMO.level_choices
    annotators: int = _DEMO.annotators
    annotator_noise: float = _DEMO.annotator_noise
    eval_teacher_samples: int = _DEMO.eval_teacher_samples
    # The demo's trainer settings. Its KL to the reference matters here: on seed 0 the demo's GDSO reached held-out
    # HPA 0.93 in 200 steps, and the same run with beta 0 ended at 0.69 (one-sample evaluations, seed 0).
    gdso: GDSOConfig = field(default_factory=lambda: replace(_DEMO.gdso))
    risd: RISDConfig = field(default_factory=lambda: replace(_DEMO.risd))
    # The OPD student gets RISD's batch and learning rate and the teachers' reasoning budget.
    opd: OPDConfig = field(default_factory=lambda: OPDConfig(batch_size=_DEMO.risd.batch_size, lr=_DEMO.risd.lr,
                                                             max_new_tokens=_DEMO.gdso.max_new_tokens))


TRAINED_ARMS = tuple(name for name in DESCRIPTIONS if not name.endswith("zero_shot"))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ablate", help="SFT / RewardDance / GRPO / GDSO teachers and SFT / OPD / RISD "
                                                  "students, over seeds",
                                   description=__doc__.splitlines()[0])
    defaults = AblationConfig()
    parser.add_argument("--output-dir", default=defaults.output_dir,
                        help="where ablation.json, .md and .png go (default %(default)s)")
    parser.add_argument("--seeds", type=positive_int, default=defaults.seeds, help="seeds 0..N-1 (default %(default)s)")
    parser.add_argument("--teacher-steps", type=positive_int, default=defaults.teacher_steps,
                        help="batches per teacher arm, each of gdso.updates_per_batch optimizer updates "
                             "(default %(default)s)")
    parser.add_argument("--student-steps", type=positive_int, default=defaults.student_steps,
                        help="steps (optimizer updates) per student arm (default %(default)s)")
    parser.add_argument("--eval-every", type=positive_int, default=defaults.eval_every,
                        help="steps between the training-curve evaluations (default %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--threads", type=positive_int, default=defaults.threads,
                        help="torch CPU threads per process (default %(default)s, fastest for these tiny models)")
    parser.add_argument("--workers", type=positive_int, default=defaults.workers,
                        help="arms trained in parallel processes (default: one per CPU core, one on CUDA)")
    parser.add_argument("--engine", choices=ENGINES, default=defaults.engine,
                        help="what samples the GDSO arms' rollouts and the RISD teacher cache (default %(default)s; "
                             "vllm: every teacher is the bf16 hybrid variant vLLM's CPU backend runs)")
    parser.add_argument("--arms", nargs="+", choices=TRAINED_ARMS, default=None,
                        help="train only these arms (default: all; risd and opd need gdso, which they bring along)")
    parser.add_argument("--annotators", type=positive_int, default=defaults.annotators,
                        help="annotators per (image, dimension); the ground truth is their trimmed mean "
                             "(default %(default)s)")
    parser.add_argument("--annotator-noise", type=probability, default=defaults.annotator_noise,
                        help="probability that an annotator scores half a point off (default %(default)s)")
    parser.set_defaults(run=_run_from_args, parser=parser)


def _run_from_args(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        args.parser.error("argument --device: cuda was asked for but torch sees no CUDA device")
    config = AblationConfig(seeds=args.seeds, teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                            eval_every=args.eval_every, device=args.device, threads=args.threads,
                            workers=args.workers, output_dir=args.output_dir, engine=args.engine,
                            arms=tuple(args.arms) if args.arms else None, annotators=args.annotators,
                            annotator_noise=args.annotator_noise)
    result = run_ablation(config)
    print((Path(config.output_dir) / "ablation.md").read_text())
    print(f"wrote {config.output_dir}/ablation.json, ablation.md and ablation.png in {result['runtime_s']} s")
    return 0


def run_ablation(config: AblationConfig, progress: bool = True) -> dict:
    """Run every arm for every seed; returns what ``<output_dir>/ablation.json`` holds."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    selected = _selected_arms(config.arms)
    # Longest tasks first (the RISD teacher's task also trains the RISD and OPD students), so the workers finish
    # together.
    order = sorted((name for name in TEACHER_ARMS if name in selected), key=lambda name: name != TEACHER_FOR_RISD)
    tasks = [(teacher_task, seed, name) for name in order for seed in range(config.seeds)]
    if WRITTEN_REASONING_ARM in selected:
        tasks += [(rewarddance_task, seed) for seed in range(config.seeds)]
    if "student_sft" in selected:
        tasks += [(student_sft_task, seed) for seed in range(config.seeds)]
    workers = config.workers or (1 if config.device == "cuda" else min(os.cpu_count() or 1, len(tasks)))
    teachers = len([name for name in selected if DESCRIPTIONS[name][0] == "teacher"])
    students = len([name for name in selected if name in STUDENT_ARMS])
    total = config.seeds * (teachers * config.teacher_steps + students * config.student_steps)
    threads = torch.get_num_threads()
    with tqdm(total=total, desc="ablate", unit="step", disable=not progress) as bar:
        if workers == 1:
            torch.set_num_threads(config.threads)
            try:
                ticks = _BarTicks(bar)
                parts = [task(config, *args, ticks) for task, *args in tasks]
                parts += [zero_shot_task(config, seed) for seed in range(config.seeds)]
            finally:
                torch.set_num_threads(threads)
        else:
            parts = _run_in_workers(config, workers, tasks, bar)
    result = {"config": asdict(config), "device": str(config.device), "workers": workers,
              "descriptions": {name: DESCRIPTIONS[name] for name in DESCRIPTIONS if name in selected},
              "arms": _assemble(config.seeds, parts, selected)}
    result["summary"] = summarise(result["arms"])
    result["runtime_s"] = round(time.perf_counter() - started, 1)
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    write_table(result, out / "ablation.md")
    write_plot(result, out / "ablation.png")
    return result


def _run_in_workers(config: AblationConfig, workers: int, tasks, bar) -> list[dict]:
    """The tasks on ``workers`` spawned processes (spawn: safe with CUDA and with torch's threads), each step
    reported through a queue to the progress bar."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads,
                                                           initargs=(config.threads,)) as pool:
        ticks = manager.Queue()
        futures: list[Future] = [pool.submit(task, config, *args, ticks) for task, *args in tasks]
        futures += [pool.submit(zero_shot_task, config, seed) for seed in range(config.seeds)]
        while True:
            done, pending = wait(futures, timeout=0.5)
            while True:
                try:
                    bar.update(ticks.get_nowait())
                except queue.Empty:
                    break
            failed = [future for future in done if future.exception() is not None]
            if failed:  # stop at the first failure, with its traceback; tasks already running finish first
                for future in pending:
                    future.cancel()
                failed[0].result()
            if not pending:
                return [future.result() for future in futures]


class _BarTicks:
    """The ``put`` of a tick queue, straight onto the progress bar (tasks run in this process)."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, steps: int) -> None:
        self.bar.update(steps)


def _selected_arms(arms) -> set[str]:
    """The rows a run produces for ``AblationConfig.arms``: those arms, the zero-shot rows, and with gdso the
    students distilled from it."""
    if arms is None:
        return set(DESCRIPTIONS)
    unknown = sorted(set(arms) - set(TRAINED_ARMS))
    if unknown or not arms:
        raise ValueError(f"arms must be a non-empty subset of {TRAINED_ARMS}, got {tuple(arms)}")
    selected = set(arms) | {"teacher_zero_shot", "student_zero_shot"}
    if selected & {"risd", "opd"}:
        selected.add(TEACHER_FOR_RISD)
    if TEACHER_FOR_RISD in selected:
        selected |= {"risd", "opd"}
    return selected


def _assemble(seeds: int, parts: list[dict], selected: set[str]) -> dict[str, list[dict]]:
    """``{arm: [entry of seed 0, 1, ...]}`` in table order; every trained arm's curve starts from its role's
    zero-shot point (a reasoning student's from its own), and the zero-shot teacher's output tokens are those of
    the first training batch."""
    arms = {name: [None] * seeds for name in DESCRIPTIONS if name in selected}
    for part in parts:
        for name, entry in part.items():
            arms[name][entry["seed"]] = entry
    for name, (role, _) in DESCRIPTIONS.items():
        if name not in selected or name.endswith("zero_shot") or name in REASONING_STUDENT_ARMS:
            continue
        for seed, entry in enumerate(arms[name]):
            entry["curve"] = arms[f"{role}_zero_shot"][seed]["curve"] + entry["curve"]
    sampler = next((name for name in (TEACHER_FOR_RISD, *TEACHER_ARMS) if name in selected), None)
    for seed, entry in enumerate(arms["teacher_zero_shot"]):
        # sampled reasoning of the first training batch, which the initial teacher samples (None: no GDSO arm ran)
        entry["tokens_per_score"] = arms[sampler][seed]["history"][0]["completion_tokens"] + 1 if sampler else None
    return arms
