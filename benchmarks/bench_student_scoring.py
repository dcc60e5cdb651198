"""End to end: student scores of B images under the 4 rubric dimensions, with the gradient to the pixels (ReFL),
and the student against the reasoning teacher on the same model (the paper's Table 3).

``ours`` is ``RewardScorer.student_scores``: each image encoded once, each image's shared prompt prefix (chat
header, image) run once, the ``B·4`` dimension-specific suffixes in one batch from the prefix states, the last
hidden state only, the score distribution from the K LM-head rows. ``naive`` is plain transformers usage: one
pass per dimension through ``model(...)``, full ``[B, L, V]`` logits, the score tokens read at the last position.
Both preprocess the images with the same differentiable Qwen-VL path and build the same prompts, and both
return the ``[B, 4]`` expected scores; the model is frozen (ReFL trains the generator, not the reward model).

``teacher`` is ``RewardScorer.teacher_rollouts`` for each dimension: ``G`` sampled reasoning outputs of exactly
``L`` tokens per image, then the score distribution after the answer prefix; against it ``ours`` scores the same
images in student mode (one output position). Both forward only (inference), items = images.

The model is a random-weight Qwen3.5 with the 9B text shape (hidden 4096, vocabulary 248,320, the 9B's
attention and linear-attention heads) and few layers, in bf16; the vision tower stays tiny. ``--smoke`` uses
the tiny default configuration. ``ZREWARD_GATED_DELTA_BACKEND`` (``auto`` | ``torch`` | ``fla``) picks the
linear-attention kernel of ``ours`` (the case's ``params`` say which ran); transformers picks its own for
``naive`` and ``teacher`` (fla when installed).
"""
from __future__ import annotations

import inspect
import time
from functools import lru_cache

import torch

from benchmarks.harness import Case, Config, Provider

OP = "student_scoring"
PROMPT = "a red cube on a blue sphere"

# Qwen3.5-9B's text config (transformers' Qwen3_5Config defaults) with 4 layers: 3 linear-attention + 1 full.
QWEN35_9B_TEXT = dict(
    vocab_size=248_320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=16, num_key_value_heads=4,
    head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
    linear_num_value_heads=32,
    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)
# A width a CPU handles in seconds, with the 9B's layer mix and grouped linear-attention values.
SMALL_TEXT = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_key_head_dim=32, linear_value_head_dim=32,
    linear_num_key_heads=4, linear_num_value_heads=8,
)
SHAPES = {"tiny": {}, "small": SMALL_TEXT, "9b": QWEN35_9B_TEXT}


@lru_cache(maxsize=2)
def _scorer(shape: str, device_type: str):
    """The frozen model (text config ``SHAPES[shape]``), processor and scorer, built once per run (on the device,
    so init is fast on GPU)."""
    from zreward.experiments.tiny_models import tiny_qwen35
    from zreward.scoring.scorer import RewardScorer
    from zreward.scoring.vocab import ScoreVocab

    device = torch.device(device_type)
    with device:
        model, processor = tiny_qwen35(**SHAPES[shape])
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    # The tiny processor caps images at 128 x 128 pixels; the 512 px case needs its full 256 placeholders.
    processor.image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": 512 * 512}
    model.requires_grad_(False)
    vocab = ScoreVocab.from_tokenizer(processor.tokenizer)
    return model, processor, RewardScorer(model, processor, vocab)


def _ours(scorer):
    def run(images):
        return scorer.student_scores(images, [PROMPT] * images.shape[0]).mean
    return run


def _naive(model, processor, scorer):
    from zreward.scoring.image_processing import num_image_tokens, preprocess_images
    from zreward.scoring.rubric import DIMENSIONS, chat_prompt

    tokenizer = processor.tokenizer
    image_token_id = model.config.image_token_id
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    takes_mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters

    def run(images):
        pixel_values, grid = preprocess_images(images, processor.image_processor)
        placeholders = image_token * num_image_tokens(grid, processor.image_processor.merge_size)[0]
        ids = torch.tensor(scorer.vocab.token_ids, device=images.device)
        values = scorer.vocab.values.to(images.device)
        rows = torch.arange(images.shape[0], device=images.device)
        means = []
        for dimension in DIMENSIONS:  # one pass per dimension, full logits, as model(...) gives them
            texts = [chat_prompt(tokenizer, PROMPT, dimension).replace(image_token, placeholders)] * images.shape[0]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(images.device)
            extra = {"mm_token_type_ids": (batch["input_ids"] == image_token_id).int()} if takes_mm_types else {}
            logits = model(**batch, pixel_values=pixel_values, image_grid_thw=grid, use_cache=False, **extra).logits
            last = logits[rows, batch["attention_mask"].sum(1) - 1]
            means.append(last[:, ids].float().softmax(-1) @ values)
        return torch.stack(means, 1)
    return run


def _teacher(scorer, samples: int, length: int):
    from zreward.scoring.rubric import DIMENSIONS

    def run(images):
        prompts = [PROMPT] * images.shape[0]
        return torch.stack([scorer.teacher_rollouts(images, prompts, d, samples, length, min_new_tokens=length)
                            .scores.mean.mean(1) for d in DIMENSIONS], 1)
    return run


def _params(model, batch: int, size: int, config: Config, **extra) -> dict:
    from zreward.scoring.gated_delta import choose_backend

    text = model.config.text_config
    return {"B": batch, "image_size": size, "D": text.hidden_size, "V": text.vocab_size,
            "layers": text.num_hidden_layers, "gated_delta": choose_backend(config.device, needs_grad=True), **extra}


def _case(batch: int, size: int, config: Config, headline: bool) -> Case:
    model, processor, scorer = _scorer("tiny" if config.smoke else "9b", config.device.type)
    dtype = next(model.parameters()).dtype

    def make_inputs():
        images = torch.rand(batch, 3, size, size, device=config.device, dtype=dtype)
        return {"images": images.requires_grad_()}

    width = model.config.text_config.hidden_size
    layers = model.config.text_config.num_hidden_layers
    vocab = model.config.text_config.vocab_size
    return Case(
        op=OP, label=f"B={batch} x 4 dims, {size}px, D={width} V={vocab} {layers} layers", make_inputs=make_inputs,
        providers=[Provider("ours", _ours(scorer)), Provider("naive", _naive(model, processor, scorer))],
        grad=("images",), series=f"D={width} {layers} layers", x=batch, x_name="B (images)", headline=headline,
        items=batch, baseline="naive", params=_params(model, batch, size, config),
    )


def _teacher_case(batch: int, size: int, samples: int, length: int, config: Config) -> Case:
    model, _, scorer = _scorer("tiny" if config.smoke else "9b", config.device.type)
    dtype = next(model.parameters()).dtype
    text = model.config.text_config
    return Case(
        op=OP, label=f"teacher G={samples} x {length} tokens vs student, B={batch} x 4 dims, {size}px, "
                     f"D={text.hidden_size} {text.num_hidden_layers} layers",
        make_inputs=lambda: {"images": torch.rand(batch, 3, size, size, device=config.device, dtype=dtype)},
        providers=[Provider("ours", _ours(scorer)), Provider("teacher", _teacher(scorer, samples, length))],
        grad=(), series="teacher vs student", x=batch, x_name="B (images)", headline=False, items=batch,
        baseline="teacher", params=_params(model, batch, size, config, G=samples, L=length),
    )


def cases(config: Config) -> list:
    if config.smoke:
        return [_case(1, 32, config, headline=True), _teacher_case(1, 32, 2, 4, config)]
    # 512 px (256 image tokens per prompt) is where sharing the image and the prefix weighs most.
    return [*(_case(batch, 128, config, headline=batch == 8) for batch in (4, 8, 16)),
            _case(8, 512, config, headline=False), _teacher_case(8, 128, 1, 750, config)]


def compare(shape: str, batch: int, size: int, reps: int) -> list[dict]:
    """``ours`` and ``naive`` fwd+bwd (gradient to the pixels) on one device, interleaved ``reps`` times: the fastest
    time, images/s and the bytes saved for backward (working memory that a CPU can measure)."""
    from benchmarks.saved_memory import SavedBytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor, scorer = _scorer(shape, device.type)
    dtype = next(model.parameters()).dtype
    runs = {"ours": _ours(scorer), "naive": _naive(model, processor, scorer)}
    times, saved = {name: [] for name in runs}, {}
    for _ in range(reps):
        for name, run in runs.items():
            images = torch.rand(batch, 3, size, size, device=device, dtype=dtype, requires_grad=True)
            counter = SavedBytes(model.parameters())
            start = time.perf_counter()
            with counter:
                scores = run(images)
            scores.sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            saved[name] = counter.total
    rows = [{"provider": name, "ms": min(times[name]) * 1e3, "images_per_s": batch / min(times[name]),
             "saved_mib": saved[name] / 2**20} for name in runs]
    for row in rows:
        row["speed_vs_naive"] = rows[1]["ms"] / row["ms"]
        row["memory_vs_naive"] = row["saved_mib"] / rows[1]["saved_mib"]
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_student_scoring",
                                     description="ours vs naive student scoring, with saved-for-backward memory")
    parser.add_argument("--shape", choices=SHAPES, default="small", help="text config (default: small)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    rows = compare(args.shape, args.batch, args.size, args.reps)
    print(f"{args.shape} text config, B={args.batch} x 4 dims, {args.size}px, fwd+bwd to the pixels, "
          f"fastest of {args.reps}, {torch.get_num_threads()} CPU threads")
    print("\n| provider | fwd+bwd ms | images/s | saved for backward MiB | speed vs naive | memory vs naive |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['provider']} | {r['ms']:.0f} | {r['images_per_s']:.2f} | {r['saved_mib']:.1f} | "
              f"{r['speed_vs_naive']:.2f}x | {r['memory_vs_naive']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
