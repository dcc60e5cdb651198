"""The load and fault test's pieces (``benchmarks.serve_load``) against an in-process service, briefly."""
import pytest
import torch

pytest.importorskip("fastapi", reason="zreward serve needs the [serve] extra (fastapi, uvicorn, httpx)")

from benchmarks.serve_load import closed_loop, encode_bodies, fault_checks, read_metrics, summarize  # noqa: E402
from zreward.deploy.serve import BackgroundServer  # noqa: E402
from zreward.deploy.service import ServeSettings, create_app  # noqa: E402
from zreward.experiments.tiny_models import STUDENT_CONFIG, tiny_scorer# noqa: E402


def test_load_and_faults_lose_no_request():
    scorer = tiny_scorer(2, STUDENT_CONFIG, torch.device("cpu"))
    settings = ServeSettings(max_batch=8, max_wait_ms=5, max_queue_images=16, max_request_images=4,
                             max_request_bytes=2**20)
    with BackgroundServer(create_app(scorer, settings)) as server:
        bodies = encode_bodies(4, 1, 32)
        before = read_metrics(server.url)
        run = closed_loop(server.url, bodies, clients=3, seconds=1.5)
        row = summarize("micro-batching", run, 1, before, read_metrics(server.url))
        assert row["lost"] == 0 and set(row["codes"]) == {200} and row["ok"] > 0
        assert row["images_per_s"] > 0 and row["p50_ms"] <= row["p99_ms"] and row["mean_batch"] >= 1
        checks = fault_checks(server.url, bodies[0], max_request_mb=1.0)
        assert [what for what, _, _ in checks][:3] == ["malformed JSON", "body above --max-request-mb",
                                                        "unknown field"]
        assert all(ok for _, _, ok in checks), checks


def test_replicas_behind_one_client_are_driven_and_reported():
    from argparse import Namespace

    import numpy as np

    from benchmarks.serve_replicas import drive, report
    from zreward.deploy.client import RewardClient

    scorer = tiny_scorer(3, STUDENT_CONFIG, torch.device("cpu"))
    images = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    with BackgroundServer(create_app(scorer)) as first, BackgroundServer(create_app(scorer)) as second, \
            RewardClient([first.url, second.url]) as client:
        row = drive(client, images, clients=3, seconds=1.5, images_per_request=2)
        row.update(sent=[r["sent"] for r in client.replicas()], mode="2 replica(s)")
    assert row["ok"] > 0 and row["failed"] == row["lost"] == 0 and min(row["sent"]) > 0  # both replicas used
    args = Namespace(clients=3, images_per_request=2, image_size=32, server_threads=1, seconds=1.5)
    environment = {k: "x" for k in ("command", "machine", "torch", "transformers", "uvicorn", "commit", "date",
                                    "load", "model")}
    table = report(args, [row], environment).splitlines()
    assert table[table.index("|---|---:|---:|---:|---:|---:|---:|---|") + 1].startswith(f"| 2 replica(s) | {row['ok']} |")
