"""``zreward refl --config run.toml``: ReFL training with validation reward curves, plots and checkpoints.

Writes under ``output_dir``: ``config.json`` (the resolved config), ``log.jsonl`` (one record per training step,
``"split": "train"``, and per validation, ``"split": "val"``, with the mean reward of every dimension),
``reward_curves.png`` (validation reward per dimension against steps, as the paper's Figure 5) and
``checkpoints/step-<N>`` (see :meth:`ReFLTrainer.save`). ``--resume`` continues from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch, diffusers and transformers load only when a run starts: `zreward --help` stays fast
    from zreward.refl.config import ReFLConfig
    from zreward.refl.trainer import ReFLTrainer


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("refl", help="ReFL: backpropagate the student reward into a diffusers generator",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run configuration (.toml or .json, see ReFLConfig)")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--max-steps", type=int, help="override the config's max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from zreward.refl.config import ReFLConfig

    config = ReFLConfig.from_file(args.config)
    overrides = {"output_dir": args.output_dir, "max_steps": args.max_steps}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    train(config, resume=args.resume)
    return 0


def train(config: ReFLConfig, resume: bool = False) -> ReFLTrainer:
    """Run (or resume) a ReFL training from ``config``; returns the trainer at the end."""
    from tqdm.auto import tqdm

    from zreward.refl.models import build_adapter, frozen_scorer, student_reward_fn
    from zreward.refl.trainer import ReFLTrainer
    from zreward.training.checkpoint import checkpoint_name, latest_checkpoint, write_json_atomic

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.to_dict(), out / "config.json")
    trainer = ReFLTrainer(build_adapter(config), student_reward_fn(frozen_scorer(config), config.dimensions), config)
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    if checkpoint is not None:
        trainer.load(checkpoint)
    log_path = out / "log.jsonl"
    # Records past the resumed step belong to the interrupted run: drop them so the log reads as one run.
    records = [r for r in read_log(log_path) if r["step"] <= trainer.step] if checkpoint is not None else []
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def log(record: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    if trainer.step == 0:
        log({"split": "val", "step": 0, "rewards": trainer.validate()})
    with tqdm(total=config.max_steps, initial=trainer.step, desc="refl", unit="step") as bar:
        while trainer.step < config.max_steps:
            record = trainer.train_step()
            log({"split": "train", **record})
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            last = trainer.step == config.max_steps
            if trainer.step % config.val_every == 0 or last:
                log({"split": "val", "step": trainer.step, "rewards": trainer.validate()})
                plot_reward_curves(log_path, out / "reward_curves.png")
            if trainer.step % config.save_every == 0 or last:
                trainer.save(out / "checkpoints" / checkpoint_name(trainer.step))
    return trainer


def read_log(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_reward_curves(log_path, png_path) -> None:
    """One panel per reward dimension: mean validation reward against training step (the paper's Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [r for r in read_log(log_path) if r["split"] == "val"]
    names = [k for k in val[0]["rewards"] if k != "aggregate"]
    cols = min(len(names), 2)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    steps = [r["step"] for r in val]
    for ax, name in zip(axes.flat, names):
        ax.plot(steps, [r["rewards"][name] for r in val], marker="o", markersize=3)
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation reward")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
