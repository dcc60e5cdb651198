"""HF versus vLLM on the same model, side by side: teacher rollouts in tokens/s and student scoring in images/s.

    python -m benchmarks.bench_engines [--model qwen3-vl|qwen3.5] [--prompts 4] [--group 8] [--new-tokens 64]
                                       [--batch 16] [--repeats 3] [--output results.json]

Rollouts: ``--prompts`` images x ``--group`` samples of exactly ``--new-tokens`` reasoning tokens each
(``min_new_tokens`` holds the stop tokens back), then the score distribution after the answer prefix; tokens/s
counts the sampled reasoning tokens. Student scoring: ``--batch`` images x the four dimensions, no gradient (HF:
the scorer's shared-prefix path; vLLM: one request per image and dimension, prefix caching on). Every repeat
uses new images, so no engine reuses an earlier repeat's vision features or caches; the figure is the median
of ``--repeats`` after one warm-up. The models are the tiny engine-test configs (random weights), on whatever
device torch and vLLM pick; the vLLM column needs vLLM installed (README: "Inference engines (vLLM)").
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zreward.experiments.tiny_models import ENGINE_QWEN3_VL_CONFIG, ENGINE_QWEN35_CONFIG, tiny_qwen3_vl, tiny_qwen35
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import RewardScorer
from zreward.scoring.vocab import ScoreVocab

MODELS = ("qwen3-vl", "qwen3.5")


def build_scorer(model: str, device: str) -> RewardScorer:
    """The tiny engine-test model: Qwen3-VL in fp32, Qwen3.5 in bf16 (the CPU build of vLLM runs its linear
    attention in bf16 only)."""
    if model == "qwen3-vl":
        net, processor = tiny_qwen3_vl(seed=0, **ENGINE_QWEN3_VL_CONFIG)
    elif model == "qwen3.5":
        net, processor = tiny_qwen35(seed=0, **ENGINE_QWEN35_CONFIG)
        net = net.to(torch.bfloat16)
    else:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return RewardScorer(net.to(device), processor, ScoreVocab.from_tokenizer(processor.tokenizer))


def _images(n: int, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 64, 64), generator=g).float() / 255).to(device=device, dtype=dtype)


def _median_seconds(run, repeats: int) -> tuple[float, object]:
    result = run(0)  # warm-up
    times = []
    for repeat in range(1, repeats + 1):
        started = time.perf_counter()
        result = run(repeat)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def measure(engine, scorer: RewardScorer, prompts: int, group: int, new_tokens: int, batch: int,
            repeats: int) -> dict:
    """Rollout tokens/s and student images/s of ``engine`` (an :class:`~zreward.engines.InferenceEngine`)."""
    dtype, device = scorer.lm_head_weight().dtype, scorer.lm_head_weight().device
    texts = [f"prompt {i}: a red cube on a blue sphere" for i in range(max(prompts, batch))]

    def rollouts(repeat):
        return engine.teacher_rollouts(_images(prompts, 1000 + repeat, dtype, device), texts[:prompts], "realism",
                                       group, new_tokens, min_new_tokens=new_tokens)

    def scores(repeat):
        return engine.student_scores(_images(batch, 2000 + repeat, dtype, device), texts[:batch], DIMENSIONS)

    with torch.no_grad():
        rollout_s, sampled = _median_seconds(rollouts, repeats)
        score_s, _ = _median_seconds(scores, repeats)
    tokens = int(sampled.completion_mask.sum())
    return {"rollout_seconds": rollout_s, "rollout_tokens": tokens, "rollout_tokens_per_s": tokens / rollout_s,
            "score_seconds": score_s, "score_images": batch, "score_images_per_s": batch / score_s}


def run(model: str = "qwen3-vl", prompts: int = 4, group: int = 8, new_tokens: int = 64, batch: int = 16,
        repeats: int = 3, device: str = "cpu", engines=("hf", "vllm"), vllm_options: dict | None = None) -> dict:
    """``{"settings": ..., "<engine>": measure(...) + {"start_seconds", "sync_seconds"}}`` for each of
    ``engines``."""
    from zreward.engines import make_engine

    scorer = build_scorer(model, device)
    results = {"settings": {"model": model, "prompts": prompts, "group": group, "new_tokens": new_tokens,
                            "batch": batch, "repeats": repeats, "device": device,
                            "dtype": str(scorer.lm_head_weight().dtype).removeprefix("torch.")}}
    for name in engines:
        started = time.perf_counter()
        options = (vllm_options or {}) if name == "vllm" else {}
        engine = make_engine(name, scorer, **options)
        start_seconds = time.perf_counter() - started
        try:
            results[name] = {"start_seconds": start_seconds,
                             **measure(engine, scorer, prompts, group, new_tokens, batch, repeats)}
            started = time.perf_counter()
            engine.sync_weights(scorer.model)  # what GDSO pays per optimizer step (vLLM: reload, resets, probe)
            results[name]["sync_seconds"] = time.perf_counter() - started
        finally:
            engine.close()
    return results


def markdown(results: dict) -> str:
    """The side-by-side table of :func:`run`'s results."""
    engines = [name for name in ("hf", "vllm") if name in results]
    lines = ["| | " + " | ".join(engines) + (" | vLLM / HF |" if len(engines) == 2 else " |"),
             "|---|" + "---:|" * (len(engines) + (len(engines) == 2))]
    for key, label, digits in (("rollout_tokens_per_s", "rollout tokens/s", 0),
                               ("score_images_per_s", "student images/s", 1), ("start_seconds", "engine start (s)", 2),
                               ("sync_seconds", "weight sync (s)", 3)):
        row = [results[name][key] for name in engines]
        ratio = ([f"{row[1] / row[0]:.2f}x" if key.endswith("per_s") else ""] if len(row) == 2 else [])
        lines.append(f"| {label} | " + " | ".join(f"{v:.{digits}f}" for v in row) + "".join(f" | {r}" for r in ratio)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="qwen3-vl")
    parser.add_argument("--prompts", type=int, default=4, help="images per rollout batch")
    parser.add_argument("--group", type=int, default=8, help="G samples per image")
    parser.add_argument("--new-tokens", type=int, default=64, help="reasoning tokens per sample")
    parser.add_argument("--batch", type=int, default=16, help="images per student-scoring batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engines", nargs="+", choices=("hf", "vllm"), default=["hf", "vllm"])
    parser.add_argument("--max-model-len", type=int, default=2048, help="vLLM's context length")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("prompts", "group", "new_tokens", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    results = run(args.model, args.prompts, args.group, args.new_tokens, args.batch, args.repeats, args.device,
                  args.engines, {"max_model_len": args.max_model_len})
    print(json.dumps(results["settings"]))
    print(markdown(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
