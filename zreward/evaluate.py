"""``zreward evaluate``: student scores of a saved model on an annotation file, metrics per dimension.

The model folder is a zreward model folder (``zreward.deploy.model_folder``, as ``zreward demo`` writes), or
what ``save_pretrained`` writes for a Qwen-VL ``...ForConditionalGeneration`` plus its tokenizer and image
processor. Prints a table (PLCC, SRCC, HPA, margin HPA per dimension and pooled) and
writes the same numbers, with the per-record predictions, as JSON with ``--output``.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from zreward.data import Annotation, by_dimension, load_annotations, load_image
from zreward.deploy.model_folder import load_model_folder
from zreward.metrics import reward_metrics
from zreward.scoring.scorer import RewardScorer

COLUMNS = ("n", "pairs", "plcc", "srcc", "hpa", "margin_hpa")


@torch.no_grad()
def predict(scorer: RewardScorer, records: list[Annotation], batch_size: int = 8,
            progress: bool = True) -> list[float]:
    """Student expected score (Eq. 16) of each record, batched by dimension and image size (read from the file
    headers); only one batch of images is in memory at a time."""
    from PIL import Image

    batches = defaultdict(list)
    for index, record in enumerate(records):
        with Image.open(record.image) as image:
            batches[(record.dimension, image.size)].append(index)
    device = scorer.lm_head_weight().device
    predictions = [math.nan] * len(records)
    with tqdm(total=len(records), desc="scoring", unit="image", disable=not progress) as bar:
        for (dimension, _), indices in batches.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                pixels = torch.stack([load_image(records[i].image) for i in chunk]).to(device)
                dist = scorer.student_scores(pixels, [records[i].prompt for i in chunk], (dimension,))
                for i, mean in zip(chunk, dist.mean[:, 0].tolist()):
                    predictions[i] = mean
                bar.update(len(chunk))
    return predictions


def record_metrics(records: list[Annotation], predictions: list[float]) -> dict:
    """``{dimension | "all": reward_metrics}`` of ``predictions`` (one per record) against the records' ground
    truths, HPA pairs within (prompt, dimension)."""
    position = {id(r): i for i, r in enumerate(records)}
    metrics = {}
    for dimension, group in [*by_dimension(records).items(), ("all", records)]:
        pred = [predictions[position[id(r)]] for r in group]
        metrics[dimension] = reward_metrics(pred, [r.score for r in group], [(r.prompt, r.dimension) for r in group])
    return metrics


def evaluate_records(scorer: RewardScorer, records: list[Annotation], batch_size: int = 8,
                     progress: bool = True) -> dict:
    """``{"metrics": {dimension | "all": {...}}, "predictions": [...]}`` for ``records``."""
    predictions = predict(scorer, records, batch_size, progress)
    rows = [{"source": r.source, "dimension": r.dimension, "score": r.score, "prediction": p}
            for r, p in zip(records, predictions)]
    return {"metrics": record_metrics(records, predictions), "predictions": rows}


def format_table(metrics: dict) -> str:
    header = f"{'dimension':<14}" + "".join(f"{c:>12}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in metrics.items():
        cells = "".join(f"{row[c]:>12d}" if isinstance(row[c], int) else f"{row[c]:>12.4f}" for c in COLUMNS)
        lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)


def run(args) -> int:
    if args.batch_size < 1:
        raise SystemExit(f"zreward evaluate: --batch-size must be positive, got {args.batch_size}")
    records = load_annotations(args.data, split=None if args.split == "all" else args.split)
    if args.dimension:
        records = [r for r in records if r.dimension in args.dimension]
    if not records:
        raise SystemExit(f"zreward evaluate: no records in {args.data} (split={args.split}, dimension={args.dimension})")
    # A model folder (its score vocabulary checked), or a plain save_pretrained folder (the default vocabulary).
    scorer = load_model_folder(args.model, args.device, args.dtype, args.attn_implementation, require_metadata=False)
    result = evaluate_records(scorer, records, args.batch_size, progress=not args.quiet)
    print(format_table(result["metrics"]))
    if args.output:
        result = {"model": str(args.model), "data": str(args.data), "split": args.split, **result}
        Path(args.output).write_text(json.dumps(_finite_or_none(result), indent=2) + "\n")
    return 0


def _finite_or_none(value):
    """The JSON value with NaN metrics (no pairs, constant predictions) written as null."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="PLCC / SRCC / HPA / margin HPA of a saved reward model",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="folder written by save_pretrained")
    parser.add_argument("--data", required=True, type=Path, help="annotation JSONL (see zreward.data)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test; 'all' for every record)")
    parser.add_argument("--dimension", action="append", help="restrict to this dimension (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    parser.add_argument("--output", type=Path, help="write metrics and predictions as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
