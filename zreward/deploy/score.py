"""``zreward score``: stream unlabelled images through a model folder and write their score distributions.

Input is a JSONL file of ``{"image": path, "prompt": text}`` (paths relative to the file's folder or absolute;
other keys are ignored), or a folder of images plus a prompts file: a JSON object mapping each image's file
name to its prompt (``--prompts``, default ``<folder>/prompts.json``). Output is one JSON line per image::

    {"image": path as given, "prompt": ..., "dimensions": {name: {"probs", "mean", "std"}}, "reward": ...,
     "aggregation": ...}

Images are read one at a time and scored in batches of one image size, so memory holds at most
``MAX_PENDING_BATCHES`` batches of images however large the data set is. Lines are flushed after every batch, in
the order batches complete. ``--resume`` keeps the (image, prompt) pairs already in the output (dropping a line
cut off by a kill) and scores the rest: a killed job loses nothing and repeats nothing. A malformed input line or
an unreadable image is reported as ``file:line: problem`` and skipped, or ends the job with ``--on-error fail``.
``--top-k K`` then writes the best K candidates of each prompt (as ``zreward rank``). ``--ray`` scores the same
input on a Ray cluster with a pool of model replicas instead (``zreward.deploy.ray_score``).
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from zreward.data import jsonl_values, load_image
from zreward.deploy.engine import ENGINES, Scoring, check_image, open_scorer, score_images
from zreward.deploy.model_folder import DTYPES
from zreward.deploy.rank import read_score_lines, top_k_path, write_top_k
from zreward.scoring.rubric import DIMENSIONS
from zreward.scoring.scorer import ATTN_IMPLEMENTATIONS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PENDING_BATCHES = 4  # images of several sizes wait in separate batches; past this many, the fullest is scored


@dataclass(frozen=True)
class Candidate:
    """One image to score: ``image`` as the input names it, ``path`` resolved, ``source`` for messages."""

    source: str
    image: str
    path: Path
    prompt: str


class InputError(ValueError):
    """A bad input line or image, ``file:line: problem``."""


def read_inputs(input_path, prompts_file=None) -> Iterator[Candidate | InputError]:
    """The candidates of a JSONL file or an image folder, in input order, with an ``InputError`` in place of
    each bad entry (the caller decides whether that is fatal)."""
    input_path = Path(input_path)
    if input_path.is_dir():
        yield from _folder_inputs(input_path, Path(prompts_file) if prompts_file else input_path / "prompts.json")
    elif input_path.is_file():
        if prompts_file is not None:
            raise ValueError("--prompts goes with a folder input; a JSONL input carries its prompts")
        yield from _jsonl_inputs(input_path)
    else:
        raise ValueError(f"input {input_path} is neither a JSONL file nor a folder")


def _jsonl_inputs(path: Path) -> Iterator[Candidate | InputError]:
    for where, record, problem in jsonl_values(path):
        if problem is None and (not isinstance(record, dict) or not isinstance(record.get("image"), str)
                                or not record["image"] or not isinstance(record.get("prompt"), str)):
            problem = "expected an object with an 'image' path and a 'prompt' string"
        if problem is not None:
            yield InputError(f"{where}: {problem}")
            continue
        image = Path(record["image"])
        yield Candidate(where, record["image"], image if image.is_absolute() else path.parent / image,
                        record["prompt"])


def _folder_inputs(folder: Path, prompts_file: Path) -> Iterator[Candidate | InputError]:
    try:
        prompts = json.loads(prompts_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{prompts_file}: cannot read the prompts file ({error})") from None
    if not isinstance(prompts, dict) or not all(isinstance(p, str) for p in prompts.values()):
        raise ValueError(f"{prompts_file}: must be a JSON object mapping image file names to prompt strings")
    for path in _folder_images(folder):
        if path.name not in prompts:
            yield InputError(f"{path}: no prompt for {path.name!r} in {prompts_file}")
        else:
            yield Candidate(str(path), path.name, path, prompts[path.name])


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def count_inputs(input_path) -> int:
    """How many entries ``read_inputs`` will yield (for the progress bar)."""
    input_path = Path(input_path)
    if input_path.is_dir():
        return len(_folder_images(input_path))
    with input_path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def resume_state(output: Path) -> Counter:
    """How often each ``(image, prompt)`` is in ``output`` already; a last line cut off mid-write is removed."""
    if not output.exists():
        return Counter()
    with output.open("rb") as handle:
        data = handle.read()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with output.open("r+b") as handle:
            handle.truncate(len(complete))
    return Counter((r["image"], r["prompt"]) for r in read_score_lines(output))


def score_candidates(scorer, items: Iterable[Candidate | InputError], scoring: Scoring, batch_size: int,
                     reject: Callable[[InputError], None]) -> Iterator[list[tuple[Candidate, dict]]]:
    """Score a stream of candidates in batches of one image size; yields each scored batch as ``(candidate,
    record)`` pairs, in the order batches complete. Memory holds at most ``MAX_PENDING_BATCHES`` batches of
    images. Each bad entry (an ``InputError`` of the input, or an image that cannot be read or scored) goes to
    ``reject``, which raises to stop. ``zreward score`` and each actor of ``zreward score --ray`` run this."""
    pending: dict[tuple, list[tuple[Candidate, torch.Tensor]]] = defaultdict(list)

    def flush(key) -> list[tuple[Candidate, dict]]:
        batch = pending.pop(key)
        dist = score_images(scorer, [image for _, image in batch], [c.prompt for c, _ in batch], scoring.dimensions)
        return list(zip([c for c, _ in batch], scoring.records(dist)))

    for item in items:
        if isinstance(item, InputError):
            reject(item)
            continue
        try:
            image = check_image(load_image(item.path), scorer, "image")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            reject(InputError(f"{item.source}: cannot score image {item.path} ({error})"))
            continue
        pending[tuple(image.shape)].append((item, image))
        if len(pending[tuple(image.shape)]) == batch_size:
            yield flush(tuple(image.shape))
        elif sum(map(len, pending.values())) >= MAX_PENDING_BATCHES * batch_size:
            yield flush(max(pending, key=lambda k: len(pending[k])))
    for key in list(pending):
        yield flush(key)


def score_line(candidate: Candidate, record: dict) -> dict:
    """A ``zreward score`` output line: the candidate's image and prompt as the input gave them, then the record."""
    return {"image": candidate.image, "prompt": candidate.prompt, **record}


def check_batch_options(batch_size, on_error: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")


def score_file(scorer, input_path, output, scoring: Scoring, *, batch_size: int = 8, resume: bool = False,
               on_error: str = "skip", prompts_file=None, progress: bool = True, log=None) -> dict:
    """Score every candidate of ``input_path`` into the JSONL ``output``; returns the counts
    ``{"scored", "skipped", "already_done"}``. See the module docstring for the formats."""
    check_batch_options(batch_size, on_error)
    output = Path(output)
    if output.exists() and output.stat().st_size and not resume:
        raise ValueError(f"output {output} already holds scores: pass --resume to continue it, or remove it")
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    done = resume_state(output) if resume else Counter()
    counts = {"scored": 0, "skipped": 0, "already_done": 0}

    def reject(error: InputError) -> None:
        if on_error == "fail":
            raise error
        counts["skipped"] += 1
        log(f"zreward score: {error} (skipped)")
        bar.update(1)

    def to_score():
        for item in read_inputs(input_path, prompts_file):
            if isinstance(item, Candidate) and done[(item.image, item.prompt)]:
                done[(item.image, item.prompt)] -= 1
                counts["already_done"] += 1
                bar.update(1)
                continue
            yield item

    total = count_inputs(input_path)
    with output.open("a", encoding="utf-8") as handle, \
            tqdm(total=total, desc="scoring", unit="image", disable=not progress) as bar:
        for batch in score_candidates(scorer, to_score(), scoring, batch_size, reject):
            handle.write("".join(json.dumps(score_line(c, record)) + "\n" for c, record in batch))
            handle.flush()  # a kill after this point loses none of these lines
            counts["scored"] += len(batch)
            bar.update(len(batch))
    return counts


def run(args) -> int:
    if args.ray:
        from zreward.deploy.ray_score import run as run_on_ray

        return run_on_ray(args)
    try:
        if args.format != "jsonl":
            raise ValueError("--format parquet goes with --ray (one file per shard); the single process writes JSONL")
        scoring = Scoring(tuple(args.dimension or DIMENSIONS), args.aggregation, args.weights)
        if args.top_k is not None and args.top_k < 1:
            raise ValueError(f"--top-k must be positive, got {args.top_k}")
        scorer = scorer_from_args(args)
        counts = score_file(scorer, args.input, args.output, scoring, batch_size=args.batch_size,
                            resume=args.resume, on_error=args.on_error, prompts_file=args.prompts,
                            progress=not args.quiet)
    except ValueError as error:  # InputError with --on-error fail, bad options, refused model folders
        raise SystemExit(f"zreward score: {error}") from None
    print(f"zreward score: {counts['scored']} scored, {counts['already_done']} already in {args.output}, "
          f"{counts['skipped']} skipped", file=sys.stderr)
    if args.top_k is not None:
        path = args.top_k_output or top_k_path(args.output, args.top_k)
        write_top_k(args.output, args.top_k, path)
        print(f"zreward score: best {args.top_k} per prompt in {path}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("score", help="score unlabelled images with a model folder (streaming, resumable)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder (zreward_model.json + weights)")
    parser.add_argument("--input", required=True, type=Path, help="JSONL of {image, prompt}, or a folder of images")
    parser.add_argument("--prompts", type=Path, help="with a folder input: JSON {file name: prompt} "
                                                     "(default <folder>/prompts.json)")
    parser.add_argument("--output", required=True, type=Path, help="scores JSONL (one line per image)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted output file")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                        help="a malformed line or unreadable image: report and skip it (default), or stop")
    parser.add_argument("--top-k", type=int, help="also write the best K candidates per prompt")
    parser.add_argument("--top-k-output", type=Path, help="where --top-k goes (default <output>.top<K>.jsonl)")
    add_scoring_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (of one size)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray Data (--ray: --output is a folder of one file per shard; needs the ray "
                                    "extra)")
    ray.add_argument("--ray", action="store_true", help="score on a Ray cluster with a pool of model replicas")
    ray.add_argument("--replicas", type=int, default=1, help="actors, each loading the model once (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per actor (default 0: CPU)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray.add_argument("--shard-size", type=int, default=1000,
                     help="candidates per shard, the unit of output files and of --resume (default 1000)")
    ray.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="shard files (default jsonl)")
    ray.add_argument("--ray-address", help="a running cluster ('auto', 'ray://HOST:10001'); default: the one of "
                                           "$RAY_ADDRESS, else a local one")
    parser.set_defaults(run=run)


def scorer_from_args(args):
    """The scorer of the options ``add_scoring_arguments`` adds (``--threads`` set first)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return open_scorer(args.model, args.engine, device, args.dtype, args.attn_implementation)


def add_scoring_arguments(parser) -> None:
    """The model-loading and scoring options ``zreward score`` and ``zreward serve`` share."""
    parser.add_argument("--engine", choices=ENGINES, default="hf",
                        help="inference engine: hf (default) or vllm (needs the vllm extra, see the README)")
    parser.add_argument("--device", help="torch device (default: cuda when there is one, else cpu; with --ray: "
                                         "cuda when --gpus-per-replica is set, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--attn-implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice). On a CPU "
                                                    "shared with other work, 1 avoids threads waiting on each other")
    parser.add_argument("--dimension", action="append", help="score only this dimension (repeatable; default all)")
    parser.add_argument("--aggregation", default="weighted_mean",
                        help="how 'reward' combines the dimensions: weighted_mean (default), min, soft_min")
    parser.add_argument("--weights", type=float, nargs="+", help="per-dimension weights of the aggregation")
