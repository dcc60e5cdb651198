"""``zreward score --ray`` on a local Ray cluster (CPU): the same scores as the single-process command, resume by
shard, Parquet output, bad inputs.

Skipped where Ray Data is not installed; CI runs this file in the vLLM environment, which has the ray extra
(``.ci/run``)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="zreward score --ray needs the ray extra (pip install -e .[ray])")
pytest.importorskip("ray.data")

from tests.deploy_helpers import save_tiny_student  # noqa: E402
from zreward.cli import main  # noqa: E402
from zreward.deploy.engine import Scoring  # noqa: E402
from zreward.deploy.ray_score import MANIFEST, score_with_ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A model folder and 11 candidates of two image sizes (one listed twice), plus a malformed line."""
    folder = tmp_path_factory.mktemp("ray")
    model = save_tiny_student(folder, seed=21)
    rng = np.random.default_rng(3)
    lines = []
    for i in range(10):
        size = (32, 64) if i % 3 == 0 else (32, 32)
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": f"prompt {i // 4}"}))
    lines += [lines[2], "{not json"]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    single = folder / "single.jsonl"
    main(["score", "--model", str(model), "--input", str(folder / "in.jsonl"), "--output", str(single), "--quiet",
          "--batch-size", "3"])
    return model, folder / "in.jsonl", [json.loads(line) for line in single.read_text().splitlines()]


def _parts(folder, suffix="jsonl"):
    return [json.loads(line) for part in sorted(folder.glob(f"part-*.{suffix}"))
            for line in part.read_text().splitlines()]


def _same_scores(got, want):
    key = lambda r: (r["image"], r["prompt"])  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert [key(r) for r in got] == [key(r) for r in want]
    for g, w in zip(got, want):
        assert g["reward"] == pytest.approx(w["reward"], abs=1e-6) and g["aggregation"] == w["aggregation"]
        for name, dim in w["dimensions"].items():
            assert g["dimensions"][name]["probs"] == pytest.approx(dim["probs"], abs=1e-6)


def test_ray_scores_equal_the_single_process_command(cluster, data, tmp_path, capsys):
    model, inputs, single = data
    out = tmp_path / "out"
    counts = score_with_ray(model, inputs, out, replicas=2, shard_size=4, batch_size=3, progress=False)
    assert counts == {"scored": 11, "skipped": 1, "already_done": 0, "shards": 3}
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-00000.jsonl", "part-00001.jsonl",
                                                     "part-00002.jsonl"]
    lines = _parts(out)
    assert [line["image"] for line in lines] == [json.loads(x)["image"] for x in inputs.read_text().splitlines()[:11]]
    _same_scores(lines, single)
    assert "in.jsonl:12: malformed JSON" in capsys.readouterr().err


def test_resume_scores_only_the_missing_shards(cluster, data, tmp_path):
    model, inputs, single = data
    out = tmp_path / "out"
    score_with_ray(model, inputs, out, shard_size=5, progress=False)
    (out / "part-00001.jsonl").unlink()  # a shard the killed job had not finished
    (out / ".part-00001.jsonl.tmp").write_text('{"image": "img5.png", "pro')
    with pytest.raises(ValueError, match="already holds scores: pass --resume"):
        score_with_ray(model, inputs, out, shard_size=5, progress=False)
    with pytest.raises(ValueError, match=r"started with other settings \(shard_size\)"):
        score_with_ray(model, inputs, out, shard_size=4, resume=True, progress=False)
    counts = score_with_ray(model, inputs, out, shard_size=5, resume=True, progress=False)
    assert counts == {"scored": 5, "skipped": 1, "already_done": 6, "shards": 1}
    assert not (out / ".part-00001.jsonl.tmp").exists()  # the shard was written anew and moved into place
    _same_scores(_parts(out), single)
    assert score_with_ray(model, inputs, out, shard_size=5, resume=True, progress=False)["scored"] == 0


def test_parquet_output_and_scoring_options(cluster, data, tmp_path):
    import pyarrow.parquet as pq

    model, inputs, _ = data
    scoring = Scoring(("realism", "alignment"), "min")
    out = tmp_path / "pq"
    score_with_ray(model, inputs, out, scoring, shard_size=6, output_format="parquet", progress=False)
    rows = [row for part in sorted(out.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]
    json_out = tmp_path / "single.jsonl"
    main(["score", "--model", str(model), "--input", str(inputs), "--output", str(json_out), "--quiet",
          "--dimension", "realism", "--dimension", "alignment", "--aggregation", "min"])
    assert len(rows) == 11 and set(rows[0]["dimensions"]) == {"realism", "alignment"}
    _same_scores(rows, [json.loads(line) for line in json_out.read_text().splitlines()])


def test_bad_images_and_options(cluster, data, tmp_path):
    model, inputs, _ = data
    folder = tmp_path / "images"
    shutil.copytree(inputs.parent, folder, ignore=shutil.ignore_patterns("student", "*.jsonl"))
    (folder / "img3.png").write_bytes(b"not an image")
    (folder / "prompts.json").write_text(json.dumps({f"img{i}.png": "p" for i in range(10)}))
    counts = score_with_ray(model, folder, tmp_path / "out", shard_size=20, progress=False)
    assert counts["scored"] == 9 and counts["skipped"] == 1
    with pytest.raises(ValueError, match="cannot score image .*img3.png"):  # reported by the driver
        score_with_ray(model, folder, tmp_path / "fail", on_error="fail", progress=False)
    for kwargs, message in [({"replicas": 0}, "replicas must be a positive int"),
                            ({"output_format": "csv"}, "output_format must be one of"),
                            ({"gpus_per_replica": -1}, "gpus_per_replica must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            score_with_ray(model, folder, tmp_path / "x", **kwargs)
    with pytest.raises(SystemExit, match="--top-k does not go with --ray"):
        main(["score", "--ray", "--model", str(model), "--input", str(folder), "--output", str(tmp_path / "y"),
              "--top-k", "1"])
