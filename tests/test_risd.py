"""RISD: the teacher cache on disk (safetensors + JSON), Eq. 15 through slice_kl, and the Algorithm 2 trainer."""
import json

import pytest
import torch
from safetensors.torch import load_file

import zr_kernels
from zreward.experiments.synthetic import SyntheticPreferences
from zreward.experiments.tiny_models import tiny_qwen35
from zreward.scoring.scorer import RewardScorer
from zreward.scoring.vocab import ScoreVocab
from zreward.training.risd import CACHE_INDEX, CACHE_TENSORS, RISDConfig, RISDTrainer, TeacherCache


def _scorer(seed):
    model, processor = tiny_qwen35(seed=seed, layer_types=["full_attention"] * 2)
    return RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = SyntheticPreferences(2, 2, 32, seed=0)
    torch.manual_seed(0)
    cache = TeacherCache.build(_scorer(1), data, dimensions=("realism", "aesthetics"), num_samples=2,
                               max_new_tokens=3)
    return data, cache, tmp_path_factory.mktemp("cache")


def test_cache_build_save_load(setup):
    data, cache, directory = setup
    assert cache.probs.shape == (4, 2, 9)
    torch.testing.assert_close(cache.probs.sum(-1), torch.ones(4, 2))
    assert len(cache.reasoning["realism"]) == 4 and len(cache.reasoning["realism"][0]) == 2
    cache.save(directory)
    index = json.loads((directory / CACHE_INDEX).read_text())
    assert index["dimensions"] == ["realism", "aesthetics"] and index["num_items"] == 4
    assert set(load_file(directory / CACHE_TENSORS)) == {"probs", "values"}
    loaded = TeacherCache.load(directory)
    assert torch.equal(loaded.probs, cache.probs) and loaded.prompts == cache.prompts
    assert loaded.reasoning == cache.reasoning
    # a matching cache is reused without touching the teacher
    assert torch.equal(TeacherCache.load_or_build(directory, None, data).probs, cache.probs)


def test_trainer_distils_teacher_and_resumes(setup, tmp_path):
    data, cache, _ = setup
    config = RISDConfig(batch_size=2, lr=1e-2)

    torch.manual_seed(0)
    straight = RISDTrainer(_scorer(2), data, cache, config)
    with zr_kernels.trace_backends() as ran:
        history = straight.train(4)
    assert ("slice_kl", "reference") in ran or ("slice_kl", "triton") in ran
    assert history[-1]["loss"] < history[0]["loss"]

    torch.manual_seed(0)
    first = RISDTrainer(_scorer(2), data, cache, config)
    first.train(2)
    first.save(tmp_path / "ckpt")
    resumed = RISDTrainer(_scorer(3), data, cache, config)
    resumed.load(tmp_path / "ckpt")
    assert resumed.train(4) == history
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, straight.model.state_dict()[name]), name


def test_loss_is_eq_15(setup):
    """KL(q_T || q_phi) over the score bins, batch-mean over (image, dimension) rows."""
    data, cache, _ = setup
    student = _scorer(2)
    trainer = RISDTrainer(student, data, cache, RISDConfig(batch_size=4, lr=0.0))
    with torch.no_grad():
        q_phi = student.student_scores(data.images(range(4)), data.prompts(range(4)), cache.dimensions).probs
    q_t = cache.probs
    want = (q_t * (q_t.log() - q_phi.log())).sum(-1).mean()
    order = trainer._next_indices(len(data), 4)
    trainer.state["position"] = 0
    assert sorted(order) == [0, 1, 2, 3]
    assert trainer.step()["loss"] == pytest.approx(float(want), rel=1e-4, abs=1e-7)


def test_human_score_targets_make_risd_sft(setup):
    """One-hot targets at the annotated bins: the RISD loss is then the cross-entropy on the human score."""
    data, _, _ = setup
    student = _scorer(2)
    dimensions = ("realism", "aesthetics")
    cache = TeacherCache.from_human_scores(data, student.vocab, dimensions)
    bins = torch.stack([student.vocab.bin_indices(data.scores(range(4), d)) for d in dimensions], 1)
    assert torch.equal(cache.probs.argmax(-1), bins) and torch.equal(cache.probs.sum(-1), torch.ones(4, 2))
    trainer = RISDTrainer(student, data, cache, RISDConfig(batch_size=4, lr=0.0))
    with torch.no_grad():
        q_phi = student.student_scores(data.images(range(4)), data.prompts(range(4)), dimensions).probs
    want = -q_phi.gather(-1, bins.unsqueeze(-1)).log().mean()
    assert trainer.step()["loss"] == pytest.approx(float(want), rel=1e-4)


def test_cache_must_cover_data(setup):
    data, cache, _ = setup
    with pytest.raises(ValueError, match="cache covers"):
        RISDTrainer(_scorer(2), SyntheticPreferences(3, 2, 32, seed=0), cache)


def test_cache_files_get_the_mode_of_the_umask(tmp_path, umask):
    cache = TeacherCache(torch.full((2, 1, 9), 1 / 9), ("realism",), ["a", "b"], {"realism": [[], []]},
                         torch.linspace(1, 5, 9))
    cache.save(tmp_path)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert set(modes) == {CACHE_TENSORS, CACHE_INDEX} and modes == dict.fromkeys(modes, oct(0o666 & ~umask))
