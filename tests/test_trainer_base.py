"""The three trainers on one base: the same names, checkpoint layout, JSONL log and bit-exact resume."""
import json
import shutil
import warnings

import pytest
import torch

from zreward.experiments.synthetic import SyntheticPreferences
from zreward.experiments.tiny_models import tiny_qwen35
from zreward.scoring.scorer import RewardScorer
from zreward.scoring.vocab import ScoreVocab
from zreward.training.base import TrainerBase, read_log
from zreward.training.gdso import GDSOConfig, GDSOTrainer
from zreward.training.risd import RISDConfig, RISDTrainer, TeacherCache

DATA = SyntheticPreferences(3, 2, 32, seed=0)
COMMON_FILES = {"model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors", "meta.json"}


def _scorer(seed: int) -> RewardScorer:
    model, processor = tiny_qwen35(seed=seed, layer_types=["full_attention"] * 2)
    return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))


def _gdso() -> GDSOTrainer:
    config = GDSOConfig(group_size=2, pairs_per_batch=1, steps_per_iteration=2, max_new_tokens=2, lr=1e-3,
                        beta=0.05, updates_per_batch=1)
    return GDSOTrainer(_scorer(0), DATA, DATA.pairs(), config)


def _risd() -> RISDTrainer:
    probs = torch.softmax(torch.randn(len(DATA), 1, 9, generator=torch.Generator().manual_seed(0)), -1)
    cache = TeacherCache(probs, ("realism",), DATA.prompts(range(len(DATA))), {}, torch.linspace(1, 5, 9))
    return RISDTrainer(_scorer(1), DATA, cache, RISDConfig(batch_size=2, lr=1e-2))


def _refl():
    pytest.importorskip("diffusers")
    from test_refl import contrast_reward, tiny_config

    from zreward.refl import ReFLTrainer, build_adapter

    config = tiny_config(val_every=2)
    return ReFLTrainer(build_adapter(config), contrast_reward, config)


BUILDERS = {"gdso": _gdso, "risd": _risd, "refl": _refl}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_resume_from_a_checkpoint_continues_bit_exactly_and_the_log_reads_as_one_run(name, tmp_path):
    build = BUILDERS[name]
    log_file, checkpoints = tmp_path / "log.jsonl", tmp_path / "checkpoints"
    torch.manual_seed(0)
    straight = build()
    assert isinstance(straight, TrainerBase)
    straight.train(3, log_file=log_file, checkpoint_dir=checkpoints, save_every=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]
    files = {p.name for p in (checkpoints / "step-00000001").iterdir()}
    # GDSO adds its frozen reference policy, a ReFL LoRA run the adapter in the pipeline's own format
    assert files - {"reference.safetensors", "lora"} == COMMON_FILES, files
    meta = json.loads((checkpoints / "step-00000001" / "meta.json").read_text())
    assert meta["state"]["trainer"]["step"] == 1 and meta["state"]["config"]["lr"] == straight.config.lr

    # A crash after step 3 was logged; the run restarts from step 1's checkpoint (step 2's and 3's are lost).
    for step in (2, 3):
        shutil.rmtree(checkpoints / f"step-0000000{step}")
    torch.manual_seed(123)  # the global RNG at restart must not matter: the checkpoint restores it
    resumed = build()
    assert resumed.resume(checkpoints) == checkpoints / "step-00000001"
    assert resumed.step_count == 1
    resumed.train(3, log_file=log_file, checkpoint_dir=checkpoints, save_every=1)

    assert resumed.history == straight.history
    for (key, value), want in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(value, want), key
    records = read_log(log_file)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert [r["loss"] for r in records if r["split"] == "train"] == [m["loss"] for m in straight.history]


def test_train_writes_a_jsonl_record_per_step_and_calls_log(tmp_path):
    trainer = _risd()
    seen = []
    trainer.train(2, log=seen.append, log_file=tmp_path / "log.jsonl", progress=True)
    assert seen == read_log(tmp_path / "log.jsonl")
    assert [(r["split"], r["step"]) for r in seen] == [("train", 1), ("train", 2)]
    assert seen[-1]["loss"] == trainer.history[-1]["loss"]
    with pytest.raises(ValueError, match="save_every"):
        trainer.train(3, save_every=-1)


def test_read_log_drops_a_torn_last_line_and_names_a_malformed_earlier_one(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"split": "train", "step": 1}\n{"split": "tr')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_log(path) == [{"split": "train", "step": 1}]
    assert any(f"{path}:2" in str(w.message) for w in caught)
    path.write_text('{"split": "tr\n{"split": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}:1"):
        read_log(path)
    assert read_log(tmp_path / "missing.jsonl") == []
