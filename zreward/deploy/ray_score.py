"""``zreward score --ray``: batch scoring on Ray Data, with a pool of actors that each load the model once.

The input is what ``zreward score`` reads (a JSONL of ``{"image", "prompt"}`` or a folder of images with a prompts
file). The driver reads it (paths and prompts only, never pixels) and cuts the candidates, in input order, into
shards of ``shard_size``. Ray Data hands the shards to ``replicas`` actors (``gpus_per_replica`` /
``cpus_per_replica`` each); an actor loads the model folder once and scores each shard as ``zreward score`` does
(``score_candidates``: batches of one image size, the same records), reading the images itself. The output is a
folder with one file per shard, written to a temporary name and renamed as soon as the shard is done:

* ``part-00000.jsonl``: the lines ``zreward score`` writes, in input order;
* ``part-00000.parquet`` (``output_format="parquet"``): the same records as rows (columns ``image``, ``prompt``,
  ``dimensions`` (a struct per dimension of ``probs``, ``mean``, ``std``), ``reward``, ``aggregation``).

``_shards.json`` records the input, the shard size, the format and the scoring options. ``resume`` scores only the
shards that have no file yet, so a job killed at any point loses at most the shards in progress and repeats none;
resuming with other settings is refused. A bad input line or image is reported as ``file:line: problem`` and
skipped, or ends the job with ``on_error="fail"``.

On several machines, Ray runs on each (``ray start --head`` on one, ``ray start --address HEAD:6379`` on the
others) and the command runs on the head with ``ray_address="auto"``; the model folder and the images must be at
the same paths on every machine (a shared file system).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from zreward.deploy.engine import Scoring
from zreward.deploy.score import (
    Candidate, InputError, check_batch_options, read_inputs, score_candidates, score_line)

FORMATS = ("jsonl", "parquet")
MANIFEST = "_shards.json"
INSTALL_HINT = "zreward score --ray needs Ray Data: pip install -e '.[ray]'"


def part_name(shard: int, output_format: str) -> str:
    return f"part-{shard:05d}.{output_format}"


class ShardScorer:
    """A Ray Data actor: loads the model folder once, then scores one shard per call (see the module docstring)."""

    def __init__(self, model: str, engine: str, device: str, dtype: str, attn_implementation: str,
                 threads: int | None, scoring: dict, batch_size: int):
        import torch

        from zreward.deploy.engine import open_scorer

        if threads is not None:
            torch.set_num_threads(threads)
        self.scorer = open_scorer(model, engine, device, dtype, attn_implementation)
        self.scoring = Scoring(tuple(scoring["dimensions"]), scoring["aggregation"], scoring["weights"])
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        shards, lines, errors = [], [], []
        for shard, encoded in zip(batch["shard"], batch["candidates"]):
            candidates = [Candidate(c["source"], c["image"], Path(c["path"]), c["prompt"])
                          for c in json.loads(encoded)]
            order = {id(c): i for i, c in enumerate(candidates)}
            problems = []  # reported by the driver, which stops there with on_error="fail"
            scored = [pair for done in score_candidates(self.scorer, candidates, self.scoring, self.batch_size,
                                                        lambda error: problems.append(str(error))) for pair in done]
            scored.sort(key=lambda pair: order[id(pair[0])])  # batches complete by image size; files keep input order
            shards.append(int(shard))
            lines.append(json.dumps([score_line(c, record) for c, record in scored]))
            errors.append(json.dumps(problems))
        return {"shard": shards, "lines": lines, "errors": errors}


def plan_shards(input_path, prompts_file, shard_size: int, reject) -> list[list[Candidate]]:
    """The candidates of the input, in order, cut into shards of ``shard_size``; bad entries go to ``reject``."""
    shards: list[list[Candidate]] = [[]]
    for item in read_inputs(input_path, prompts_file):
        if isinstance(item, InputError):
            reject(item)
            continue
        if len(shards[-1]) == shard_size:
            shards.append([])
        shards[-1].append(item)
    return shards if shards[0] else []


def _check_manifest(output: Path, manifest: dict, resume: bool) -> None:
    path = output / MANIFEST
    if path.exists():
        if not resume:
            raise ValueError(f"output {output} already holds scores: pass --resume to continue it, or remove it")
        recorded = json.loads(path.read_text())
        if recorded != manifest:
            changed = sorted(k for k in manifest if recorded.get(k) != manifest[k])
            raise ValueError(f"{path}: the output was started with other settings ({', '.join(changed)}); resume "
                             "with the same input, shard size, format and scoring, or use another output folder")
    elif output.exists() and any(output.iterdir()):
        raise ValueError(f"output {output} is a non-empty folder without {MANIFEST}: refusing to write there")


def _write_part(path: Path, lines: list[dict], output_format: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if output_format == "jsonl":
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(lines), tmp)
    os.replace(tmp, path)


def score_with_ray(model, input_path, output, scoring: Scoring = Scoring(), *, replicas: int = 1,
                   gpus_per_replica: float = 0, cpus_per_replica: float = 1, shard_size: int = 1000,
                   batch_size: int = 8, output_format: str = "jsonl", resume: bool = False, on_error: str = "skip",
                   prompts_file=None, engine: str = "hf", device: str | None = None, dtype: str = "float32",
                   attn_implementation: str = "sdpa", threads: int | None = None, ray_address: str | None = None,
                   progress: bool = True, log=None) -> dict:
    """Score every candidate of ``input_path`` into the folder ``output`` on a Ray cluster (see the module
    docstring); returns the counts ``{"scored", "skipped", "already_done", "shards"}``. ``ray_address``: an
    existing cluster (``"auto"``, ``"ray://host:10001"``); None connects to the one this process already joined,
    or to ``$RAY_ADDRESS``, or starts a local one. ``device`` defaults to ``cuda`` with GPUs per replica, else
    ``cpu``."""
    check_batch_options(batch_size, on_error)
    for name, value in (("replicas", replicas), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not gpus_per_replica >= 0 or not cpus_per_replica > 0:
        raise ValueError(f"gpus_per_replica must be >= 0 and cpus_per_replica > 0, got {gpus_per_replica} and "
                         f"{cpus_per_replica}")
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ValueError(f"{INSTALL_HINT} ({error})") from None
    if output_format == "parquet":
        import pyarrow.parquet  # noqa: F401 - Ray Data brings it; fail before any work when it is missing

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    output = Path(output)
    counts = {"scored": 0, "skipped": 0, "already_done": 0, "shards": 0}

    def reject(error: InputError) -> None:
        if on_error == "fail":
            raise error
        counts["skipped"] += 1
        log(f"zreward score: {error} (skipped)")

    options = {"dimensions": list(scoring.dimensions), "aggregation": scoring.aggregation,
               "weights": None if scoring.weights is None else list(scoring.weights)}
    manifest = {"input": str(Path(input_path).resolve()),
                "prompts": None if prompts_file is None else str(Path(prompts_file).resolve()),
                "shard_size": shard_size, "format": output_format, "scoring": options}
    _check_manifest(output, manifest, resume)
    shards = plan_shards(input_path, prompts_file, shard_size, reject)
    output.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    todo = [k for k in range(len(shards)) if not (output / part_name(k, output_format)).exists()]
    counts["already_done"] = sum(len(shards[k]) for k in set(range(len(shards))) - set(todo))
    if not todo:
        return counts

    if not ray.is_initialized():
        ray.init(address=ray_address, logging_level="WARNING", log_to_driver=progress)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    rows = [{"shard": k, "candidates": json.dumps([{"source": c.source, "image": c.image, "path": str(c.path),
                                                     "prompt": c.prompt} for c in shards[k]])} for k in todo]
    constructor = {"model": str(Path(model).resolve()), "engine": engine,
                   "device": device or ("cuda" if gpus_per_replica > 0 else "cpu"), "dtype": dtype,
                   "attn_implementation": attn_implementation, "threads": threads, "scoring": options,
                   "batch_size": batch_size}
    scored = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=replicas),
        fn_constructor_kwargs=constructor, num_gpus=gpus_per_replica or None, num_cpus=cpus_per_replica)
    for row in scored.iter_rows():  # shards as they finish, in any order
        lines, problems = json.loads(row["lines"]), json.loads(row["errors"])
        for problem in problems:
            reject(InputError(problem))  # raises with on_error="fail": the shard stays unwritten
        _write_part(output / part_name(int(row["shard"]), output_format), lines, output_format)
        counts["scored"] += len(lines)
        counts["shards"] += 1
    return counts


def run(args) -> int:
    """``zreward score --ray``."""
    from zreward.scoring.rubric import DIMENSIONS

    try:
        if args.top_k is not None:
            raise ValueError("--top-k does not go with --ray: run `zreward rank` on the parts (cat OUT/*.jsonl)")
        if args.device is not None and args.device.startswith("cuda") and not args.gpus_per_replica:
            raise ValueError("--device cuda needs --gpus-per-replica (GPUs Ray gives each actor)")
        counts = score_with_ray(
            args.model, args.input, args.output, Scoring(tuple(args.dimension or DIMENSIONS), args.aggregation,
                                                         args.weights),
            replicas=args.replicas, gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
            shard_size=args.shard_size, batch_size=args.batch_size, output_format=args.format, resume=args.resume,
            on_error=args.on_error, prompts_file=args.prompts, engine=args.engine, device=args.device,
            dtype=args.dtype, attn_implementation=args.attn_implementation, threads=args.threads,
            ray_address=args.ray_address, progress=not args.quiet)
    except ValueError as error:
        raise SystemExit(f"zreward score: {error}") from None
    print(f"zreward score: {counts['scored']} scored in {counts['shards']} shard(s), {counts['already_done']} "
          f"already in {args.output}, {counts['skipped']} skipped", file=sys.stderr)
    return 0
