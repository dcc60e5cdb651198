"""``zreward train ... --dry-run`` for the paper's models on 8 x 80 GiB: the tables of docs/training.md.

    python -m benchmarks.paper_dry_run

Writes config-only base model folders of ``paper_model_config("qwen3.5-27b")`` and ``("qwen3.5-9b")`` (the
published sizes, no weights; the package's tiny tokenizer stands in for the published one, so the rubric prompt's
token count is approximate) with an image processor that gives 1024 image tokens to a 1024 x 1024 image, a small
annotation file, and the four configs (teacher and student, LoRA and full fine-tuning), then prints each dry run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

RUNS = {  # title: (role, config keys)
    "Teacher: Qwen3.5-27B, LoRA (the defaults), GDSO": (
        "teacher", {"base_model": "qwen3.5-27b", "pairs_per_batch": 1, "group_size": 4}),
    "Teacher: Qwen3.5-27B, full fine-tuning, GDSO": (
        "teacher", {"base_model": "qwen3.5-27b", "pairs_per_batch": 1, "group_size": 4, "lora_rank": 0}),
    "Student: Qwen3.5-9B, LoRA (the defaults, strategy ddp), RISD": (
        "student", {"base_model": "qwen3.5-9b", "teacher_model": "qwen3.5-27b", "batch_size": 2}),
    "Student: Qwen3.5-9B, full fine-tuning, strategy fsdp2, RISD": (
        "student", {"base_model": "qwen3.5-9b", "teacher_model": "qwen3.5-27b", "batch_size": 2,
                    "strategy": "fsdp2", "lora_rank": 0}),
}
COMMON = {"data": "data/annotations.jsonl", "image_size": [1024, 1024]}
FLAGS = ["--world-size", "8", "--device-memory-gib", "80"]


def write_folders(root: Path) -> None:
    """The two config-only model folders and a 4-prompt annotation file under ``root``."""
    from zreward.experiments.files import write_annotations
    from zreward.experiments.synthetic import SyntheticPreferences
    from zreward.experiments.tiny_models import tiny_tokenizer
    from zreward.scoring.image_processing import qwen_image_processor
    from zreward.scoring.scorer import ScoringProcessor
    from zreward.training.memory import paper_model_config

    for name in ("qwen3.5-27b", "qwen3.5-9b"):
        config, tokenizer = paper_model_config(name), tiny_tokenizer()
        for key in ("image", "video", "vision_start", "vision_end"):
            token = f"<|{key}_pad|>" if key in ("image", "video") else f"<|{key}|>"
            setattr(config, f"{key}_token_id", tokenizer.convert_tokens_to_ids(token))
        config.save_pretrained(root / name)
        # patch 16, merge 2: a 1024 x 1024 image is 32 x 32 = 1024 merged tokens, as with Qwen3.5's processor
        processor = qwen_image_processor(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 2**24})
        ScoringProcessor(tokenizer, processor).save_pretrained(root / name)
    write_annotations(SyntheticPreferences(4, 3, 32, seed=0), root / "data", {"train": 3, "val": 1})


def main(argv=None) -> int:
    import json

    from zreward.cli import main as zreward

    argparse.ArgumentParser(prog="python -m benchmarks.paper_dry_run", description=__doc__.splitlines()[0]) \
        .parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_folders(root)
        for title, (role, keys) in RUNS.items():
            config = root / f"{role}.json"
            config.write_text(json.dumps({**keys, **COMMON, "base_model": str(root / keys["base_model"]),
                                          "data": str(root / COMMON["data"]),
                                          **({"teacher_model": str(root / keys["teacher_model"])}
                                             if "teacher_model" in keys else {})}))
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                zreward(["train", role, "--config", str(config), "--dry-run", *FLAGS])
            shown = ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in {**keys, **COMMON}.items() if k != "data")
            print(f"#### {title}\n\nKeys: {shown}; `{' '.join(FLAGS)}`.\n\n```text\n"
                  f"{printed.getvalue().replace(str(root) + '/', '').strip()}\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
