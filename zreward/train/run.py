"""``zreward train teacher`` and ``zreward train student`` as Python functions: :func:`train_teacher` (GDSO,
Algorithm 1) and :func:`train_student` (RISD, Algorithm 2) take the config dataclass and run one rank of the
training; under ``torchrun`` every rank calls them.

Everything that can be wrong with the config, the data or the model folder is checked before the first step and
raised as a :class:`SetupError` (a ``ValueError``). A run writes under ``output_dir``: ``config.json``, ``log.jsonl``
(train records every step, val records every ``eval_every`` steps), ``curves.png``, ``checkpoints/step-<N>`` and
``checkpoints/best``, and at the end the model folder ``model/``; the student also its teacher cache.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from zreward.train.config import StudentConfig, TeacherConfig, changed_keys, check_config
from zreward.train.data import ImageItems, gdso_pairs, load_run_data
from zreward.train.evaluation import BEST, ValidatedTraining, Validator
from zreward.train.models import build_model, build_scorer, checked_vocab, export_model_folder, resolve_device
from zreward.training.checkpoint import latest_checkpoint, write_json_atomic
from zreward.training.distributed import (DistContext, broadcast_parameters, init_distributed, shard_indices,
                                          wrap_scorer_model)
from zreward.training.gdso import GDSOTrainer, dimension_batches
from zreward.training.risd import RISDTrainer, TeacherCache

MODEL_FOLDER = "model"
CACHE_KEY = "cache_key.json"


class SetupError(ValueError):
    """A problem with a run's config, data or model folder, found before the first step."""


class TeacherTrainer(ValidatedTraining, GDSOTrainer):
    """GDSO with evaluation on the val split and a best checkpoint."""


class StudentTrainer(ValidatedTraining, RISDTrainer):
    """RISD with evaluation on the val split and a best checkpoint."""


@contextlib.contextmanager
def setup_errors():
    """Re-raise a ``ValueError`` of the checks as a :class:`SetupError` with the same message."""
    try:
        yield
    except SetupError:
        raise
    except ValueError as error:
        raise SetupError(str(error)) from error


def train_teacher(config: TeacherConfig, resume: bool = False, log=print, progress: bool = True) -> Path:
    """Train a teacher with GDSO on ``config.data``'s train split; returns the model folder it wrote. ``log``
    gets the run's messages (on rank 0), ``progress`` shows a progress bar."""
    with setup_errors():
        ctx, out, processor, vocab, data = start_run(config, resume)
        pairs = gdso_pairs(data.train, data.index, config.min_gap)
        if not pairs:
            raise ValueError(f"{config.data}: the train split has no same-prompt, same-dimension pairs whose scores "
                             f"differ by more than min_gap = {config.min_gap}")
        batches = len(dimension_batches(pairs, config.pairs_per_batch, config.seed))
        if batches < ctx.world_size:
            raise ValueError(f"{len(pairs)} train pairs make {batches} batches of pairs_per_batch = "
                             f"{config.pairs_per_batch}, fewer than the {ctx.world_size} ranks")
        if config.engine == "vllm" and config.strategy == "fsdp2" and ctx.distributed:
            raise ValueError("engine = 'vllm' syncs whole weights into the engine, and strategy = 'fsdp2' holds "
                             "shards: use strategy = 'ddp' with the vLLM engine")
    log_main(ctx, log, f"data: {len(data.items)} train images, {len(pairs)} pairs (min_gap {config.min_gap}), "
                       f"{len(data.val)} val records")
    scorer = build_scorer(config, processor, vocab, ctx.device)
    broadcast_parameters(scorer.model)
    scorer.model = wrap_scorer_model(scorer.model, ctx, config.strategy)
    reference = None
    if config.beta > 0 and config.strategy == "fsdp2" and ctx.distributed:  # a sharded model cannot be deep-copied
        reference = wrap_scorer_model(build_model(config, ctx.device, trainable=False), ctx, config.strategy)
    engine = config.engine if config.engine == "hf" else _vllm_engine(config, scorer)
    trainer = TeacherTrainer(scorer, data.items, pairs, config, ctx=ctx, engine=engine, reference=reference)

    def teacher_scores(images, prompts, dimension):
        rollouts = trainer.engine.teacher_rollouts(images, prompts, dimension, config.eval_samples,
                                                   config.max_new_tokens, config.sample_temperature)
        return rollouts.scores.mean.mean(1)

    try:
        run_training(trainer, config, out, resume, ctx, data.val, teacher_scores, log, progress)
    finally:
        trainer.engine.close()
    return finish(config, out, "teacher", ctx, log)


def train_student(config: StudentConfig, resume: bool = False, log=print, progress: bool = True) -> Path:
    """Distil the teacher of ``config.teacher_model`` into a student with RISD; returns the model folder. ``log``
    and ``progress`` as for :func:`train_teacher`."""
    with setup_errors():
        ctx, out, processor, vocab, data = start_run(config, resume)
        per_rank = len(shard_indices(len(data.items), ctx, config.seed, 0))
        if per_rank < config.batch_size:
            raise ValueError(f"{len(data.items)} train images give each of the {ctx.world_size} ranks {per_rank}, "
                             f"fewer than batch_size = {config.batch_size}")
    log_main(ctx, log, f"data: {len(data.items)} train images, {len(data.val)} val records")
    cache = teacher_cache(config, data.items, vocab, ctx, log)
    scorer = build_scorer(config, processor, vocab, ctx.device)
    broadcast_parameters(scorer.model)
    scorer.model = wrap_scorer_model(scorer.model, ctx, config.strategy)
    trainer = StudentTrainer(scorer, data.items, cache, config, ctx=ctx)

    def student_scores(images, prompts, dimension):
        return scorer.student_scores(images, prompts, (dimension,)).mean[:, 0]

    run_training(trainer, config, out, resume, ctx, data.val, student_scores, log, progress)
    return finish(config, out, "student", ctx, log)


def start_run(config, resume: bool):
    """What both roles do first: check the config, join the process group, seed, prepare ``output_dir``, check the
    score vocabulary against the base model's tokenizer and read the data. Returns ``(ctx, out, processor, vocab,
    data)``; raises ``ValueError`` on the first problem."""
    check_config(config)
    ctx = init_distributed(resolve_device(config))
    seed_random_streams(config.seed, ctx)
    out = prepare_output(config, resume, ctx)
    processor, vocab = checked_vocab(config.base_model, config.score_texts, config.score_values)
    data = load_run_data(config.data, config.image_size, (vocab.score_min, vocab.score_max))
    return ctx, out, processor, vocab, data


def seed_random_streams(seed: int, ctx: DistContext) -> None:
    """Seed torch, numpy and ``random`` from the config's ``seed``, differently on each rank (their sampling should
    differ): a new run is reproducible; a resumed one restores the streams of its checkpoint."""
    import random

    import numpy as np

    rank_seed = seed * 1_000_003 + ctx.rank
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)


def prepare_output(config, resume: bool, ctx: DistContext) -> Path:
    """``output_dir`` with the run's ``config.json``. A new run refuses a folder that holds another run's
    checkpoints; a resumed one refuses a config that differs from the saved one in anything but step counts and
    intervals."""
    out = Path(config.output_dir)
    saved = out / "config.json"
    if resume and saved.is_file():
        changed = changed_keys(json.loads(saved.read_text()), config)
        if changed:
            raise ValueError(f"--resume with a config that differs from {saved} in {changed}: only "
                             "step counts and intervals may change when resuming")
    elif not resume and latest_checkpoint(out / "checkpoints") is not None:
        raise ValueError(f"{out} holds the checkpoints of a run: pass --resume to continue it, or choose another "
                         "output_dir")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(asdict(config), saved)
    return out


def run_training(trainer, config, out: Path, resume: bool, ctx: DistContext, val_records, score_fn, log,
                 progress: bool) -> None:
    """Evaluation, checkpoints, log and curves around ``trainer.train``."""
    checkpoints = out / "checkpoints"
    if val_records and config.eval_every:
        trainer.validator = Validator(val_records, config.image_size, config.eval_batch_size, ctx, score_fn,
                                      config.seed)
    trainer.eval_every, trainer.checkpoint_dir = config.eval_every, checkpoints
    if resume:
        path = trainer.resume(checkpoints)
        log_main(ctx, log, f"resumed from {path}" if path else f"no checkpoint in {checkpoints}: starting afresh")
    log_path, png = out / "log.jsonl", out / "curves.png"

    def replot(record: dict) -> None:
        if record["split"] == "val" and ctx.is_main:
            plot_curves(log_path, png)

    trainer.train(trainer.default_steps(), log=replot, log_file=log_path, checkpoint_dir=checkpoints,
                  save_every=config.save_every, progress=progress and ctx.is_main)
    if ctx.is_main and trainer.validator is None:  # else the last step's evaluation has just plotted
        plot_curves(log_path, png)


def finish(config, out: Path, role: str, ctx: DistContext, log) -> Path:
    """Rank 0 writes the model folder from the best checkpoint (``final_model = "best"``, when there is one) or
    the last; every rank returns its path, the others without waiting for it (writing a large model on the CPU
    can outlast a collective's timeout)."""
    checkpoints = out / "checkpoints"
    best = checkpoints / BEST
    source = best if config.final_model == "best" and best.is_dir() else latest_checkpoint(checkpoints)
    folder = out / MODEL_FOLDER
    if ctx.is_main:
        export_model_folder(config, source, folder, role)
        log(f"model folder {folder} written from {source}")
    return folder


def teacher_cache(config: StudentConfig, items: ImageItems, vocab, ctx: DistContext, log) -> TeacherCache:
    """The teacher's distributions for every train image and dimension (Algorithm 2, line 6), built once.

    The cache in ``teacher_cache_dir`` is reused while its key (the teacher folder's files, the images and prompts,
    the teacher_* keys) matches. Otherwise each rank builds the part of the images it is dealt (contiguous
    shares, a part folder each, itself reused when a build is resumed), then rank 0 joins the parts. The ranks
    wait for each other by watching the folder, not in a collective, whose timeout a build of hours would outlast.
    """
    directory = Path(config.teacher_cache_dir or Path(config.output_dir) / "teacher_cache")
    key = cache_key(config, items)
    if _key_matches(directory, key):
        log_main(ctx, log, f"teacher cache {directory} reused")
        return TeacherCache.load(directory)
    parts = [(directory / f"part-{r:05d}-of-{ctx.world_size:05d}",
              {**key, "share": [r * len(items) // ctx.world_size, (r + 1) * len(items) // ctx.world_size]})
             for r in range(ctx.world_size)]
    part, part_key = parts[ctx.rank]
    start, stop = part_key["share"]
    if not _key_matches(part, part_key):
        from zreward.deploy.model_folder import load_model_folder

        teacher = load_model_folder(config.teacher_model, ctx.device, config.teacher_dtype or config.dtype,
                                    config.attn_implementation, require_metadata=False)
        if teacher.vocab.texts != vocab.texts or not torch.equal(teacher.vocab.values, vocab.values):
            raise SetupError(f"teacher {config.teacher_model} scores with {teacher.vocab.texts} = "
                             f"{teacher.vocab.values.tolist()}, the student with {vocab.texts} = "
                             f"{vocab.values.tolist()}: distillation needs the same score bins")
        log_main(ctx, log, f"building the teacher cache: {len(items)} images x {len(config.dimensions)} dimensions "
                           f"over {ctx.world_size} rank(s)")
        engine = config.engine if config.engine == "hf" else _vllm_engine(config, teacher)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(config.seed * 1_000_003 + ctx.rank)
                shard = TeacherCache.build(teacher, items.subset(range(start, stop)), config.dimensions,
                                           config.teacher_samples, config.teacher_max_new_tokens,
                                           config.teacher_temperature, config.teacher_batch_size, engine=engine)
        finally:
            if not isinstance(engine, str):
                engine.close()
        shard.save(part)
        write_json_atomic(part_key, part / CACHE_KEY)
        del teacher, shard
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    if ctx.is_main:
        wait_for(lambda: all(_key_matches(*p) for p in parts), "the other ranks' teacher cache parts")
        built = [TeacherCache.load(folder) for folder, _ in parts]
        reasoning = {d: [texts for b in built for texts in b.reasoning[d]] for d in config.dimensions}
        TeacherCache(torch.cat([b.probs for b in built]), config.dimensions, items.prompts(range(len(items))),
                     reasoning, vocab.values.clone()).save(directory)
        write_json_atomic(key, directory / CACHE_KEY)
        for folder, _ in parts:
            shutil.rmtree(folder)
        log(f"teacher cache written to {directory}")
    wait_for(lambda: _key_matches(directory, key), f"rank 0 to join the teacher cache in {directory}")
    return TeacherCache.load(directory)


def wait_for(condition, what: str, poll_seconds: float = 2.0) -> None:
    """Sleep until ``condition()`` holds (files another rank writes); a note every ten minutes of waiting."""
    waited = 0.0
    while not condition():
        time.sleep(poll_seconds)
        waited += poll_seconds
        if waited % 600 < poll_seconds:
            print(f"still waiting for {what} ({waited / 60:.0f} min)", flush=True)


def cache_key(config: StudentConfig, items: ImageItems) -> dict:
    """What a teacher cache depends on: the teacher folder's files (size and modification time), every train
    image (prompt, path, size, modification time), the dimensions and the teacher_* sampling keys."""
    teacher = Path(config.teacher_model).resolve()
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(teacher.iterdir()) if p.is_file()}
    digest = hashlib.sha256()
    for item in items.items:
        stat = item.image.stat()
        digest.update(json.dumps([item.prompt, str(item.image.resolve()), stat.st_size, stat.st_mtime_ns]).encode())
    return {"teacher_model": str(teacher), "teacher_files": files, "items": digest.hexdigest(),
            "num_items": len(items), "image_size": config.image_size, "dimensions": list(config.dimensions),
            "teacher_samples": config.teacher_samples, "teacher_max_new_tokens": config.teacher_max_new_tokens,
            "teacher_temperature": config.teacher_temperature, "dtype": config.teacher_dtype or config.dtype,
            "seed": config.seed,
            "score_texts": list(config.score_texts), "score_values": list(config.score_values)}


def _key_matches(directory: Path, key: dict) -> bool:
    file = directory / CACHE_KEY
    return file.is_file() and json.loads(file.read_text()) == key


def _vllm_engine(config, scorer):
    from zreward.engines import make_engine

    options = {"seed": config.seed, "gpu_memory_utilization": config.engine_memory_fraction,
               "enforce_eager": config.engine_enforce_eager}
    if config.engine_max_model_len:
        options["max_model_len"] = config.engine_max_model_len
    return make_engine("vllm", scorer, **options)


def log_main(ctx: DistContext, log, message: str) -> None:
    if ctx.is_main and log is not None:
        log(message)


def plot_curves(log_path, png_path) -> None:
    """Training loss (and its parts) and the val metrics against the step, from the run's log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zreward.training.base import read_log

    records = read_log(log_path)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    keys = [k for k in ("loss", "policy", "ce", "pairwise", "mean_abs_gap") if train and k in train[0]]
    for key in keys:
        axes[0].plot([r["step"] for r in train], [r[key] for r in train], label=key)
    axes[0].set(title="training", xlabel="step")
    for key in ("plcc", "srcc", "hpa", "margin_hpa"):
        axes[1].plot([r["step"] for r in val], [r[key] for r in val], marker="o", markersize=3, label=key)
    axes[1].set(title="val split", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
