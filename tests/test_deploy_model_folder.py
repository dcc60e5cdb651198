"""Model folders: written by the demo and by ``save_model_folder``, loaded back with the same scores, refused
when the score vocabulary or the rubric does not match."""
import json

import pytest
import torch

from zreward.deploy.engine import open_scorer
from zreward.deploy.model_folder import METADATA_FILE, load_model_folder, rubric_version, save_model_folder
from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer


@pytest.fixture(scope="module")
def scorer():
    return tiny_scorer(3, STUDENT_CONFIG, torch.device("cpu"))


@pytest.fixture()
def folder(scorer, tmp_path):
    return save_model_folder(scorer, tmp_path / "student")


def _edit_metadata(folder, **changes):
    path = folder / METADATA_FILE
    metadata = json.loads(path.read_text())
    for key, value in changes.items():
        target = metadata["score_vocab"] if key in ("texts", "values", "token_ids") else metadata
        target[key] = value
    path.write_text(json.dumps(metadata))


def test_saved_folder_scores_like_the_scorer(scorer, folder):
    metadata = json.loads((folder / METADATA_FILE).read_text())
    assert metadata["role"] == "student" and metadata["rubric_version"] == rubric_version()
    assert metadata["score_vocab"]["token_ids"] == scorer.vocab.token_ids
    loaded = load_model_folder(folder)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = scorer.student_scores(images, ["one red circle", "two blue squares"])
        got = loaded.student_scores(images, ["one red circle", "two blue squares"])
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-6)


def test_missing_metadata_is_refused_naming_the_file(folder):
    (folder / METADATA_FILE).unlink()
    with pytest.raises(ValueError, match=rf"{METADATA_FILE} not found.*not a zreward model folder"):
        load_model_folder(folder)
    # zreward evaluate accepts plain folders (the default vocabulary)
    assert load_model_folder(folder, require_metadata=False).vocab.texts == [str(d) for d in range(1, 10)]


@pytest.mark.parametrize("changes, message", [
    ({"token_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, "but the model was trained on tokens"),
    ({"texts": ["1.5"] * 9}, "score vocabulary does not fit the folder's tokenizer"),
    ({"values": [1.0, 2.0]}, "score vocabulary does not fit"),
    ({"rubric_version": "sha256:0"}, "rubric_version 'sha256:0' differs"),
    ({"format_version": 7}, "format_version 7"),
    ({"score_vocab": None}, "needs a 'score_vocab' object"),
])
def test_mismatched_metadata_is_refused_naming_the_file(folder, changes, message):
    _edit_metadata(folder, **changes)
    with pytest.raises(ValueError, match=message) as error:
        load_model_folder(folder)
    assert str(folder / METADATA_FILE) in str(error.value)
    with pytest.raises(ValueError, match=message):  # a checked folder is checked by evaluate too
        load_model_folder(folder, require_metadata=False)


def test_malformed_metadata_and_bad_arguments(scorer, folder, tmp_path):
    (folder / METADATA_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_model_folder(folder)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model_folder(folder, dtype="float8")
    with pytest.raises(ValueError, match="does not exist"):
        load_model_folder(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="scorer must be a RewardScorer"):
        save_model_folder(scorer.model, tmp_path / "x")
    with pytest.raises(ValueError, match="role must be one of"):
        save_model_folder(scorer, tmp_path / "x", role="critic")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_model_folder(scorer, tmp_path / "mine")


def test_saving_again_replaces_the_folder(scorer, folder):
    (folder / "stale.bin").write_bytes(b"x")
    save_model_folder(scorer, folder, role="teacher")
    assert not (folder / "stale.bin").exists()
    assert json.loads((folder / METADATA_FILE).read_text())["role"] == "teacher"
    assert not list(folder.parent.glob(".student.*"))  # no temp folders left behind


def test_vllm_engine_is_refused_clearly(folder):
    with pytest.raises(ValueError, match="engine 'vllm' needs vLLM|vLLM's CPU backend cannot run"):
        open_scorer(folder, engine="vllm")
    with pytest.raises(ValueError, match="engine must be one of"):
        open_scorer(folder, engine="onnx")


def test_folder_files_get_the_mode_of_the_umask(scorer, tmp_path, umask):
    # A service running as another user must be able to read a folder a training job wrote (0644 under umask 022).
    folder = save_model_folder(scorer, tmp_path / "student")
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert "model.safetensors" in modes and modes == dict.fromkeys(modes, oct(0o666 & ~umask))
