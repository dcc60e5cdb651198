"""``RewardClient`` over several replicas: least outstanding requests, retries on another replica, dead replicas
set aside and tried again, and a replica killed mid-run (three ``zreward serve`` processes on the loopback)."""
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="zreward serve needs the [serve] extra (fastapi, uvicorn, httpx)")

from fastapi import FastAPI  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from benchmarks.serve_load import start_server, stop_server  # noqa: E402
from tests.deploy_helpers import save_tiny_student, uint8_images  # noqa: E402
from zreward.deploy.adapters import LocalReward, RewardClient, RewardError, flow_grpo_reward  # noqa: E402
from zreward.deploy.client import ReplicaPool  # noqa: E402
from zreward.deploy.model_folder import load_model_folder  # noqa: E402
from zreward.deploy.serve import BackgroundServer  # noqa: E402
from zreward.deploy.service import create_app  # noqa: E402
from zreward.scoring.rubric import DIMENSIONS  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("models"), seed=13)


@pytest.fixture(scope="module")
def local(model_dir):
    return LocalReward(load_model_folder(model_dir), batch_size=8)


def _same_records(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["reward"] == pytest.approx(w["reward"], abs=1e-6)
        for d in DIMENSIONS:
            assert g["dimensions"][d]["probs"] == pytest.approx(w["dimensions"][d]["probs"], abs=1e-6)


def _failing_app(status: int, calls: list):
    """A replica that answers every ``/score`` with ``status`` (and ``Retry-After: 30``)."""
    app = FastAPI()

    @app.post("/score")
    async def score():
        calls.append(status)
        return JSONResponse({"error": f"always {status}"}, status, headers={"Retry-After": "30"})

    return app


def test_pool_picks_the_least_outstanding_and_sets_failed_replicas_aside():
    pool = ReplicaPool(["a", "b", "c"], backoff_s=0.2, max_dead_s=0.3)
    a, b, c = (pool.acquire(set()) for _ in range(3))
    assert [a.url, b.url, c.url] == ["a", "b", "c"]  # one each before any gets a second
    pool.answered(b)
    assert pool.acquire(set()) is b  # the only one with nothing in flight
    assert pool.acquire({"a"}) is c  # a avoided (the request failed there); b and c busy alike, c sent fewer
    pool.failed(a)  # nothing in flight on a now, but set aside for 0.2 s
    assert "a" not in [pool.acquire(set()).url for _ in range(4)]
    time.sleep(0.25)
    assert pool.acquire(set()) is a  # tried again later
    pool.failed(a)
    assert pool.status()[0]["failures"] == 2 and 0.2 < pool.status()[0]["available_in_s"] <= 0.3  # 0.4, capped


def test_overloaded_and_failing_replicas_are_skipped(local):
    calls = []
    scorer = local.scorer
    with BackgroundServer(_failing_app(503, calls)) as busy, BackgroundServer(_failing_app(500, calls)) as broken, \
            BackgroundServer(create_app(scorer)) as good, \
            RewardClient([busy.url, broken.url, good.url], max_images_per_request=2, retries=3,
                         backoff_s=5) as client:
        images, prompts = uint8_images(6, seed=1), [f"p{i}" for i in range(6)]
        _same_records(client.score(images, prompts), local.score(images, prompts))
        status = {r["url"]: r for r in client.replicas()}
        assert status[good.url]["sent"] >= 3 and calls  # the failing ones were tried, then set aside
        assert status[busy.url]["available_in_s"] > 20 and status[broken.url]["failures"] >= 1


def test_errors_are_raised_never_scored(local):
    calls = []
    with BackgroundServer(_failing_app(500, calls)) as broken, BackgroundServer(_failing_app(400, calls)) as refusing:
        with RewardClient(broken.url, retries=2, backoff_s=0.01) as client:
            reward_fn = flow_grpo_reward(client)
            with pytest.raises(RewardError, match="no reward service answered after 3 attempts.*answered 500"):
                reward_fn(uint8_images(2), ["a", "b"], None)
        assert calls == [500] * 3
        with RewardClient([refusing.url, broken.url], retries=3) as client:
            calls.clear()
            with pytest.raises(RewardError, match="answered 400: always 400"):
                client.score(uint8_images(1), ["a"])  # the request's own fault: not sent elsewhere
            assert calls in ([400], [500, 400])
    with pytest.raises(ValueError, match="url lists a replica twice"):
        RewardClient(["http://127.0.0.1:1", "http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="model .* goes with api='openai'"):
        RewardClient("http://127.0.0.1:1", api="openai")


@pytest.mark.slow  # three server processes, each importing torch and loading the model: 20-50 s on 2 shared cores
def test_a_replica_killed_mid_run_loses_nothing(local, model_dir):
    """Three ``zreward serve`` processes; one is SIGKILLed while the client is spreading requests over them: every
    image comes back once, in order, with the scores it has alone."""
    with ThreadPoolExecutor(3) as starting:  # the three start (import torch, load the model) side by side
        servers = list(starting.map(lambda _: start_server(model_dir, "--threads", "1", "--max-wait-ms", "2"),
                                    range(3)))
    try:
        urls = [url for _, url in servers]
        images, prompts = uint8_images(48, seed=2), [f"prompt {i}" for i in range(48)]
        want = local.score(images, prompts)
        with RewardClient(urls, max_images_per_request=2, retries=4, backoff_s=0.2, concurrency=1) as client:
            result = {}
            job = threading.Thread(target=lambda: result.update(records=client.score(images, prompts)))
            job.start()
            deadline = time.monotonic() + 60
            while client.replicas()[0]["sent"] < 2:  # the victim has answered at least one request
                assert time.monotonic() < deadline and job.is_alive()
                time.sleep(0.01)
            os.kill(servers[0][0].pid, signal.SIGKILL)
            job.join(120)
            assert not job.is_alive()
            status = client.replicas()
        _same_records(result["records"], want)
        assert status[0]["failures"] >= 1 and sum(r["sent"] for r in status) > 24  # retried after the kill
    finally:
        servers[0][0].wait()
        for process, _ in servers[1:]:
            stop_server(process)
