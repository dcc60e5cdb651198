"""``zreward refl --config run.toml``: ReFL training with validation reward curves, plots and checkpoints.

Writes under ``output_dir``: ``config.json`` (the resolved config), ``log.jsonl`` (one record per training step,
``"split": "train"``, and per validation, ``"split": "val"``, with the mean reward of every dimension),
``reward_curves.png`` (validation reward per dimension against steps, as the paper's Figure 5) and
``checkpoints/step-<N>`` (see :meth:`ReFLTrainer.save`). ``--resume`` continues from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    """Run (or resume) a ReFL training from ``config``; returns the trainer at the end. Under ``torchrun`` every
    rank runs this; rank 0 writes the log, the plot and the shared checkpoint files."""
    from zreward.refl.models import build_adapter, frozen_scorer, resolve_device, student_reward_fn
    from zreward.refl.trainer import ReFLTrainer
    from zreward.training.checkpoint import write_json_atomic
    from zreward.training.distributed import init_distributed

    ctx = init_distributed(resolve_device(config))
    out = Path(config.output_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config.to_dict(), out / "config.json")
    reward_fn = student_reward_fn(frozen_scorer(config), config.dimensions)
    trainer = ReFLTrainer(build_adapter(config), reward_fn, config, ctx=ctx)
    if resume:
        trainer.resume(out / "checkpoints")
    log_path = out / "log.jsonl"

    def replot(record: dict) -> None:
        if record["split"] == "val" and ctx.is_main:
            plot_reward_curves(log_path, out / "reward_curves.png")

    trainer.train(config.max_steps, log=replot, log_file=log_path, checkpoint_dir=out / "checkpoints",
                  save_every=config.save_every, progress=True)
    return trainer


def plot_reward_curves(log_path, png_path) -> None:
    """One panel per reward dimension: mean validation reward against training step (the paper's Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zreward.training.base import read_log

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
