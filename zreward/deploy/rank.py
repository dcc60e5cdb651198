"""``zreward rank``: best-of-N filtering of a ``zreward score`` output, the best K candidates of every prompt.

Writes the score lines of the K highest-``reward`` images of each prompt, with ``"rank"`` 1..K added; prompts
in the order they first appear, ties kept in input order. Memory holds K lines per prompt, not the whole file.
"""
from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterator
from pathlib import Path

from zreward.data import jsonl_values


def read_score_lines(path) -> Iterator[dict]:
    """The records of a scores JSONL file; a line that is not a score record is a ValueError naming file:line."""
    for where, record, problem in jsonl_values(path):
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if not isinstance(record, dict) or not {"image", "prompt", "reward"} <= set(record):
            raise ValueError(f"{where}: not a score line (needs 'image', 'prompt' and 'reward')")
        yield record


def top_k(path, k: int) -> list[dict]:
    """The best ``k`` score lines of each prompt in ``path``, with their ``rank``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    heaps: dict[str, list] = {}
    for order, record in enumerate(read_score_lines(path)):
        heap = heaps.setdefault(record["prompt"], [])
        # Min-heap on (reward, -order): the first popped is the worst, and among equal rewards the latest.
        heapq.heappush(heap, (float(record["reward"]), -order, record))
        if len(heap) > k:
            heapq.heappop(heap)
    best = []
    for heap in heaps.values():
        ranked = sorted(heap, key=lambda entry: (-entry[0], -entry[1]))
        best += [{**record, "rank": rank} for rank, (_, _, record) in enumerate(ranked, start=1)]
    return best


def write_top_k(path, k: int, output) -> Path:
    """``top_k(path, k)`` as JSONL at ``output`` (written to a temp file, then moved into place)."""
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in top_k(path, k)), encoding="utf-8")
    os.replace(tmp, output)
    return output


def top_k_path(scores, k: int) -> Path:
    """Default ``--top-k`` output next to the scores: ``scores.jsonl`` -> ``scores.top<k>.jsonl``."""
    scores = Path(scores)
    return scores.with_name(f"{scores.stem}.top{k}{scores.suffix or '.jsonl'}")


def run(args) -> int:
    try:
        write_top_k(args.scores, args.top_k, args.output)
    except (OSError, ValueError) as error:
        raise SystemExit(f"zreward rank: {error}") from None
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("rank", help="best K candidates per prompt from a `zreward score` output",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True, type=Path, help="scores JSONL written by zreward score")
    parser.add_argument("--top-k", required=True, type=int, help="candidates to keep per prompt")
    parser.add_argument("--output", required=True, type=Path, help="where the best lines go (JSONL)")
    parser.set_defaults(run=run)
