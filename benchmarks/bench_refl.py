"""ReFL step cost: time and memory of one reward-backpropagation step (sample, gradient through the last K
denoising steps, VAE decode, student scores for the 4 dimensions, backward into the generator's LoRA).

Four variants: per-step gradient checkpointing on / off, crossed with the fused student path
(``RewardScorer.student_scores``: each image encoded once, its shared prompt prefix run once, the 4 dimension
suffixes from the prefix states, last hidden state, K LM-head rows) / scoring through full logits
(``bench_student_scoring``'s ``naive`` path: one ``model(...)`` pass per dimension, ``[B, L, V]`` logits).
Memory is the CUDA peak on GPU and, everywhere, the bytes autograd keeps saved for backward (activations only,
parameters excluded), which is what checkpointing trades for recomputation, in total and per component
(generator transformer, VAE decoder, scorer vision tower, the rest of the scorer, other).

    python -m benchmarks.bench_refl --smoke                      # CPU: tiny random-weight models
    python -m benchmarks.bench_refl --out benchmarks/results     # GPU: larger random-weight models
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_student_scoring import _naive, _scorer
from benchmarks.saved_memory import SavedBytes
from zreward.experiments.tiny_models import tiny_zimage_pipeline
from zreward.refl import ReFLConfig, ReFLTrainer, ZImageAdapter, student_reward_fn
from zreward.scoring.rubric import DIMENSIONS

PROMPT = "a red cube on a blue sphere"  # the naive path scores this prompt, so both paths see the same text


def _config(smoke: bool, checkpointing: bool) -> ReFLConfig:
    size, steps, grad_steps = (32, 3, 2) if smoke else (512, 8, 4)
    return ReFLConfig(tiny=True, prompts=[PROMPT], height=size, width=size, num_inference_steps=steps,
                      grad_steps=grad_steps, random_start=False, max_sequence_length=64, batch_size=1 if smoke else 2,
                      lora_rank=4 if smoke else 64, lora_alpha=4.0 if smoke else 64.0,
                      gradient_checkpointing=checkpointing)


def _measure(trainer: ReFLTrainer, device: torch.device, reps: int, saved: SavedBytes) -> dict:
    times, peaks = [], []
    for rep in range(reps + 1):  # the first run warms up and is not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        saved.sizes.clear()
        with saved:
            loss, _, _ = trainer.loss([PROMPT] * trainer.config.batch_size, torch.Generator().manual_seed(rep))
        loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        if rep:
            times.append((time.perf_counter() - start) * 1e3)
    return {"step_ms": statistics.median(times), "saved_mib": saved.total / 2**20,
            "saved_mib_by_component": {k: v / 2**20 for k, v in saved.by_component.items()},
            "peak_mib": max(peaks) if peaks else None}


def _labelled(reward_fn, saved: SavedBytes):
    """``reward_fn`` with what it saves attributed to the scorer (its vision tower has a label of its own)."""
    def run(images, prompts):
        with saved.label("scorer text + head"):
            return reward_fn(images, prompts)
    return run


def run(smoke: bool, reps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor, scorer = _scorer("tiny" if smoke else "9b", device.type)
    naive = _naive(model, processor, scorer)
    rewards = {"fused": student_reward_fn(scorer, DIMENSIONS), "full_logits": lambda images, prompts: naive(images)}
    rows = []
    for checkpointing in (True, False):
        for scoring, reward_fn in rewards.items():
            config = _config(smoke, checkpointing)
            pipe = tiny_zimage_pipeline(**({} if smoke else dict(dim=512, n_layers=8, text_dim=256)))
            pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
            adapter = ZImageAdapter(pipe, max_sequence_length=config.max_sequence_length)
            params = [*pipe.transformer.parameters(), *pipe.vae.parameters(), *pipe.text_encoder.parameters(),
                      *model.parameters()]
            saved = SavedBytes(params, {"generator transformer": pipe.transformer, "VAE decoder": pipe.vae.decoder,
                                        "scorer vision": model.model.visual})
            trainer = ReFLTrainer(adapter, _labelled(reward_fn, saved), config)
            rows.append({"gradient_checkpointing": checkpointing, "scoring": scoring,
                         **_measure(trainer, device, reps, saved)})
            del trainer, adapter, pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    config = _config(smoke, True)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "image_size": config.height, "num_inference_steps": config.num_inference_steps,
            "grad_steps": config.grad_steps, "batch_size": config.batch_size, "reps": reps, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"ReFL step on {result['device']} (torch {result['torch']}): {result['image_size']}px, "
             f"{result['num_inference_steps']} steps, gradient through the last {result['grad_steps']}, "
             f"batch {result['batch_size']}, median of {result['reps']}",
             "", "| checkpointing | scoring | step ms | saved for backward MiB | peak MiB |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['scoring']} | {r['step_ms']:.1f} | "
                     f"{r['saved_mib']:.2f} | {peak} |")
    components = sorted({c for r in result["rows"] for c in r["saved_mib_by_component"]})
    lines += ["", "Saved for backward, MiB per component (\"other\": sampling and decoding glue outside the labelled "
              "modules; with checkpointing the generator keeps only each step's inputs, which do not show here)", "",
              "| checkpointing | scoring | " + " | ".join(components) + " |", "|---|---|" + "---|" * len(components)]
    for r in result["rows"]:
        cells = [f"{r['saved_mib_by_component'].get(c, 0.0):.2f}" for c in components]
        on = "on" if r["gradient_checkpointing"] else "off"
        lines.append(f"| {on} | {r['scoring']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_refl", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on whatever device there is (CPU ok)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 2 smoke, 5 otherwise)")
    parser.add_argument("--out", type=Path, help="write refl-<device>.json and .md here")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke for the CPU run")
    result = run(args.smoke, args.reps or (2 if args.smoke else 5))
    table = markdown(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "refl-" + result["device"].replace(" ", "-") + ("-smoke" if args.smoke else "")
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"{stem}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
