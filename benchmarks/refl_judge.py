"""Is a ReFL gain real or reward hacking of the student? Scores a run's validation images before and after training
with the student it was trained on (the reward) and with a judge it never saw (e.g. the teacher the student was
distilled from), per dimension.

    python -m benchmarks.refl_judge --config run.toml --checkpoint refl_demo_out/checkpoints/step-00000150 \
        --judge demo_out/teacher [--judge-samples 4] [--samples-png samples.png]

A dimension whose student reward rises while the judge's stays put was gained by images that fool the student, not
by images with less of the defect. Prints one JSON record: the mean over the validation prompts of each model's
expected score per dimension, before and after. The images are sampled without gradient from a fixed seed, so
before and after see the same noise.
"""
from __future__ import annotations

import argparse
import json

import torch

from zreward.deploy.model_folder import load_model_folder
from zreward.refl import ReFLConfig
from zreward.refl.models import build_adapter, frozen_scorer, resolve_device, student_reward_fn
from zreward.refl.sampling import sample_images
from zreward.refl.trainer import ReFLTrainer
from zreward.scoring.rubric import DIMENSIONS
from zreward.training.gdso import teacher_expected_scores


def judge_run(config: ReFLConfig, checkpoint: str, judge_path: str, judge_samples: int = 4,
              max_new_tokens: int = 4, seed: int = 1234) -> tuple[dict, torch.Tensor]:
    """``{"before"|"after": {"student"|"judge": {dimension: mean score}}}`` and the images (before rows, then after)."""
    student = frozen_scorer(config)
    trainer = ReFLTrainer(build_adapter(config), student_reward_fn(student, config.dimensions), config)
    judge = load_model_folder(judge_path, resolve_device(config), require_metadata=False)
    prompts = config.validation_prompts()
    result, images = {}, []
    for when in ("before", "after"):
        if when == "after":
            trainer.load(checkpoint)
        with torch.no_grad():
            batch = sample_images(trainer.adapter, prompts, height=config.height, width=config.width,
                                  num_inference_steps=config.num_inference_steps,
                                  grad_start=config.num_inference_steps,
                                  generator=torch.Generator().manual_seed(seed)).float().clamp(0, 1)
            torch.manual_seed(seed)
            judged = teacher_expected_scores(judge, batch, prompts, DIMENSIONS, judge_samples, max_new_tokens)
            rewarded = student.student_scores(batch, prompts).mean
        result[when] = {"student": dict(zip(DIMENSIONS, rewarded.float().mean(0).tolist())),
                        "judge": dict(zip(DIMENSIONS, judged.float().mean(0).tolist()))}
        images.append(torch.cat(list(batch), 2))
    return result, torch.cat(images, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's TOML or JSON config")
    parser.add_argument("--checkpoint", required=True, help="the trained generator's checkpoint folder")
    parser.add_argument("--judge", required=True, help="a reasoning model folder that scores without the student")
    parser.add_argument("--judge-samples", type=int, default=4, help="reasoning rollouts per image and dimension")
    parser.add_argument("--samples-png", help="write the before (top) and after (bottom) images here")
    args = parser.parse_args(argv)
    result, images = judge_run(ReFLConfig.from_file(args.config), args.checkpoint, args.judge, args.judge_samples)
    print(json.dumps(result))
    if args.samples_png:
        from PIL import Image

        Image.fromarray((images.permute(1, 2, 0) * 255).round().byte().numpy()).save(args.samples_png)


if __name__ == "__main__":
    main()
