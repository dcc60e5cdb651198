"""ReFL on a tiny random-weight Z-Image pipeline (transformer, VAE, Qwen3 text encoder built from configs), CPU."""
import json

import pytest
import torch

from zreward.cli import main as cli_main
from zreward.experiments.tiny_models import tiny_zimage_pipeline
from zreward.refl import (AGGREGATORS, ReFLConfig, ReFLTrainer, ZImageAdapter, build_adapter, check_grad_steps,
                          frozen_scorer, get_aggregator, minimum, pick_grad_start, register_aggregator,
                          require_diffusers, sample_images, soft_min, student_reward_fn, weighted_mean)
from zreward.scoring.rubric import DIMENSIONS

PROMPTS = ["a red cube on a table", "two cats on a sofa", "a blue car in the rain"]


def tiny_config(**overrides) -> ReFLConfig:
    settings = dict(tiny=True, dtype="float32", device="cpu", prompts=PROMPTS, height=32, width=32,
                    num_inference_steps=2, grad_steps=2, max_sequence_length=64, batch_size=2, lora_rank=4,
                    lora_alpha=4.0, lr=1e-2, max_steps=2, val_every=1, save_every=2)
    settings.update(overrides)
    return ReFLConfig(**settings)


def contrast_reward(images, prompts):
    """Stand-in reward [B, 4] (per-channel and overall pixel standard deviation): smooth, cheap and something a tiny
    random generator moves in a few steps; the random-weight student's scores are nearly flat (changes ~1e-6) and
    a random VAE decoder barely moves the mean brightness, so neither makes a meaningful "reward goes up" test."""
    stds = images.std(dim=(2, 3))
    return torch.cat([stds, images.flatten(1).std(1, keepdim=True)], dim=1)


# -- aggregation (Eq. 20) ---------------------------------------------------------------------------------------
def test_aggregators_values_and_registry():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 5.0, 5.0]])
    torch.testing.assert_close(weighted_mean(r), r.mean(1))
    torch.testing.assert_close(weighted_mean(r, [1, 0, 0, 1]), (r[:, 0] + r[:, 3]) / 2)
    torch.testing.assert_close(minimum(r), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(minimum(r, [0, 0, 1, 1]), torch.tensor([3.0, 5.0]))
    # -tau log sum_d w_d exp(-r_d / tau) = min + tau log 4 when the minimum is unique and w_d = 1/4
    torch.testing.assert_close(soft_min(r, temperature=1e-3), minimum(r) + 1e-3 * torch.tensor(4.0).log())
    torch.testing.assert_close(soft_min(r, temperature=1e4), weighted_mean(r), atol=1e-3, rtol=0)
    middle = soft_min(r, temperature=0.5)
    assert bool((middle >= minimum(r)).all()) and bool((middle <= weighted_mean(r)).all())
    assert set(AGGREGATORS) >= {"weighted_mean", "min", "soft_min"} and get_aggregator("min") is minimum
    leaf = r.clone().requires_grad_()
    soft_min(leaf).sum().backward()
    assert bool((leaf.grad > 0).all()), "soft-min passes gradient to every dimension"
    with pytest.raises(ValueError, match="aggregation must be one of"):
        get_aggregator("median")
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("min")(minimum)
    with pytest.raises(ValueError, match="weights must have shape"):
        weighted_mean(r, [1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean(r, [1.0, -1.0, 1.0, 1.0])


# -- the gradient window ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad_steps", [0, 4, -1])
def test_grad_steps_outside_window_rejected(grad_steps):
    with pytest.raises(ValueError, match="grad_steps must lie in"):
        check_grad_steps(grad_steps, 3)
    with pytest.raises(ValueError, match="grad_steps must lie in"):
        pick_grad_start(3, grad_steps, random_start=True)
    with pytest.raises(ValueError, match="grad_steps must lie in"):
        tiny_config(grad_steps=grad_steps)


def test_grad_start_window():
    generator = torch.Generator().manual_seed(0)
    starts = {pick_grad_start(8, 3, True, generator) for _ in range(200)}
    assert starts == {5, 6, 7}
    assert pick_grad_start(8, 3, random_start=False) == 5
    assert pick_grad_start(8, 8, random_start=False) == 0
    with pytest.raises(TypeError, match="grad_steps must be an int"):
        check_grad_steps(2.0, 3)


# -- the adapter ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_adapter_sample_matches_pipeline(guidance_scale):
    pipe = tiny_zimage_pipeline()
    adapter = ZImageAdapter(pipe, guidance_scale=guidance_scale, max_sequence_length=64)
    prompts = PROMPTS[:2]
    expected = pipe(list(prompts), height=32, width=32, num_inference_steps=2, guidance_scale=guidance_scale,
                    output_type="pt", max_sequence_length=64, generator=torch.Generator().manual_seed(3)).images
    with torch.no_grad():
        images = sample_images(adapter, prompts, height=32, width=32, num_inference_steps=2, grad_start=2,
                               generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(images, expected)
    with pytest.raises(ValueError, match="multiples of 8"):
        adapter.initial_latents(1, 36, 32, None)


def test_missing_diffusers_feature_is_a_clear_import_error():
    with pytest.raises(ImportError, match=r"has no NoSuchPipeline; zreward.refl needs diffusers>="):
        require_diffusers("NoSuchPipeline")


def test_checkpointing_gives_the_same_gradient():
    config = tiny_config(lora_rank=0, random_start=False)
    grads = []
    for checkpointing in (True, False):
        trainer = ReFLTrainer(build_adapter(config), contrast_reward,
                              tiny_config(lora_rank=0, random_start=False, gradient_checkpointing=checkpointing))
        loss, _, grad_start = trainer.loss(PROMPTS[:2], torch.Generator().manual_seed(1))
        loss.backward()
        assert grad_start == 0
        grads.append(torch.cat([p.grad.flatten() for p in trainer.params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# -- the gradient reaches the generator only --------------------------------------------------------------------
def test_gradient_reaches_lora_only_through_frozen_scorer_vae_and_text_encoder():
    config = tiny_config(random_start=False)
    adapter, scorer = build_adapter(config), frozen_scorer(config)
    trainer = ReFLTrainer(adapter, student_reward_fn(scorer, config.dimensions), config)
    loss, rewards, _ = trainer.loss(PROMPTS[:2], torch.Generator().manual_seed(0))
    assert rewards.shape == (2, len(DIMENSIONS))
    loss.backward()
    trainable = dict(adapter.generator.named_parameters())
    lora = {n: p for n, p in trainable.items() if "lora_" in n}
    assert lora and all(p.requires_grad and p.grad is not None for p in lora.values())
    # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's must not be.
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    frozen = [p for n, p in trainable.items() if "lora_" not in n]
    for module in (adapter.pipe.vae, adapter.pipe.text_encoder, scorer.model):
        frozen += list(module.parameters())
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert {id(p) for p in trainer.params} == {id(p) for p in lora.values()}


def test_a_few_steps_raise_the_reward():
    # Fixed seed (LoRA init, noise, prompt draws are all seeded): a deterministic check that the gradient points
    # uphill, not a statistical claim; with 2-prompt batches and fresh noise per step other seeds can dip once.
    config = tiny_config(val_prompts=PROMPTS[:2], lora_alpha=16.0, lr=1e-2, aggregation="soft_min", seed=0)
    trainer = ReFLTrainer(build_adapter(config), contrast_reward, config)
    curve = [trainer.validate()["aggregate"]]
    for _ in range(3):
        trainer.step()
        curve.append(trainer.validate()["aggregate"])
    assert all(b > a for a, b in zip(curve, curve[1:])) and curve[-1] > 1.005 * curve[0], curve


def test_resume_continues_exactly_and_lora_export_loads_into_the_pipeline(tmp_path):
    config = tiny_config()
    trainer = ReFLTrainer(build_adapter(config), contrast_reward, config)
    trainer.step()
    path = trainer.save(tmp_path / "ckpt")
    trainer.step()
    resumed = ReFLTrainer(build_adapter(config), contrast_reward, config)
    resumed.load(path)
    assert resumed.step_count == 1
    resumed.step()
    for a, b in zip(trainer.params, resumed.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # The exported LoRA loads with diffusers' own loader and reproduces the trained generator at step 1.
    pipe = tiny_zimage_pipeline()
    pipe.load_lora_weights(path / "lora")
    reference = ReFLTrainer(build_adapter(config), contrast_reward, config)
    reference.load(path)
    kwargs = dict(height=32, width=32, num_inference_steps=2, grad_start=2)
    with torch.no_grad():
        got = sample_images(ZImageAdapter(pipe, max_sequence_length=64), PROMPTS[:1],
                            generator=torch.Generator().manual_seed(5), **kwargs)
        want = sample_images(reference.adapter, PROMPTS[:1], generator=torch.Generator().manual_seed(5), **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- config and CLI ---------------------------------------------------------------------------------------------
def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('tiny = true\nprompts = ["x"]\ngrad_stepz = 1\n')
    with pytest.raises(ValueError, match="unknown config key"):
        ReFLConfig.from_file(bad)
    with pytest.raises(ValueError, match=r"\.json or \.toml"):
        ReFLConfig.from_file(tmp_path / "run.yaml")
    with pytest.raises(ValueError, match="model_path and scorer_path"):
        ReFLConfig(prompts=["x"])
    with pytest.raises(ValueError, match="aggregation_weights"):
        tiny_config(aggregation_weights=[1.0])
    with pytest.raises(ValueError, match="dimensions"):
        tiny_config(dimensions=["beauty"])
    with pytest.raises(ValueError, match="training prompts"):
        tiny_config(prompts=[])


def test_cli_end_to_end_and_resume(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f"""
tiny = true
dtype = "float32"
device = "cpu"
prompts = {json.dumps(PROMPTS)}
val_prompts = ["a green apple"]
height = 32
width = 32
num_inference_steps = 2
grad_steps = 2
max_sequence_length = 64
batch_size = 2
lora_rank = 4
lora_alpha = 4.0
lr = 1e-3
aggregation = "soft_min"
max_steps = 1
val_every = 1
save_every = 1
output_dir = "{tmp_path / 'out'}"
""")
    assert cli_main(["refl", "--config", str(config)]) == 0
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 1]
    assert set(val[0]["rewards"]) == set(DIMENSIONS) | {"aggregate"}
    assert [r["step"] for r in records if r["split"] == "train"] == [1]
    assert (out / "reward_curves.png").stat().st_size > 0
    checkpoint = out / "checkpoints" / "step-00000001"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "lora").is_dir()
    assert json.loads((out / "config.json").read_text())["grad_steps"] == 2

    assert cli_main(["refl", "--config", str(config), "--resume", "--max-steps", "2"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("val", 0), ("train", 1), ("val", 1), ("train", 2),
                                                         ("val", 2)]
    assert (out / "checkpoints" / "step-00000002").is_dir()


def test_tiny_generator_with_a_trained_student_from_its_model_folder(tmp_path):
    """``tiny = true`` with ``scorer_path``: the tiny generator and the student model folder (as ``zreward demo``
    writes it), frozen, scoring with the folder's weights."""
    from zreward.deploy.model_folder import save_model_folder
    from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer

    student = tiny_scorer(3, STUDENT_CONFIG)
    save_model_folder(student, tmp_path / "student")
    config = tiny_config(scorer_path=str(tmp_path / "student"), height=64, width=64)
    scorer = frozen_scorer(config)
    assert not any(p.requires_grad for p in scorer.model.parameters())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = student.student_scores(images, PROMPTS[:2]).mean
    torch.testing.assert_close(student_reward_fn(scorer, DIMENSIONS)(images, PROMPTS[:2]), want)
    random_student = frozen_scorer(tiny_config())
    assert random_student.model.config.text_config.hidden_size != scorer.model.config.text_config.hidden_size \
        or not torch.equal(next(random_student.model.parameters()), next(scorer.model.parameters()))
    with pytest.raises(ValueError, match="does not exist"):
        frozen_scorer(tiny_config(scorer_path=str(tmp_path / "missing")))


def test_the_documented_example_config_is_valid():
    from pathlib import Path

    config = ReFLConfig.from_file(Path(__file__).resolve().parents[1] / "examples" / "refl_demo.toml")
    assert config.tiny and config.scorer_path == "demo_out/student"
    assert set(config.validation_prompts()).isdisjoint(config.train_prompts())
    assert (config.height, config.width) == (64, 64)  # the size the demo's student was trained on


def test_refl_judge_scores_before_and_after_with_the_student_and_a_judge(tmp_path):
    """benchmarks.refl_judge: the same noise before and after, the student's scores equal the run's reward on those
    images, and the judge (a teacher model folder) scores every dimension."""
    from benchmarks.refl_judge import judge_run
    from zreward.deploy.model_folder import save_model_folder
    from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer, tiny_teacher

    save_model_folder(tiny_scorer(3, STUDENT_CONFIG), tmp_path / "student")
    save_model_folder(tiny_teacher(4), tmp_path / "teacher")
    config = tiny_config(scorer_path=str(tmp_path / "student"), height=64, width=64, max_steps=1,
                         output_dir=str(tmp_path / "run"))
    trainer = ReFLTrainer(build_adapter(config), student_reward_fn(frozen_scorer(config), DIMENSIONS), config)
    trainer.step()
    trainer.save(tmp_path / "ckpt")
    result, images = judge_run(config, str(tmp_path / "ckpt"), str(tmp_path / "teacher"), judge_samples=1,
                               max_new_tokens=2)
    prompts = config.validation_prompts()
    assert images.shape == (3, 2 * 64, len(prompts) * 64)
    for when in ("before", "after"):
        for model in ("student", "judge"):
            assert set(result[when][model]) == set(DIMENSIONS)
            assert all(1.0 <= v <= 5.0 for v in result[when][model].values())
    before = images[:, :64].unflatten(2, (len(prompts), 64)).permute(2, 0, 1, 3)
    reward = student_reward_fn(frozen_scorer(config), DIMENSIONS)(before, prompts).mean(0)
    assert reward.tolist() == pytest.approx(list(result["before"]["student"].values()), abs=1e-5)
    assert result["before"]["student"] != result["after"]["student"]  # the checkpoint was loaded
