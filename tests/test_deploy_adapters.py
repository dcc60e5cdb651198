"""Flow-GRPO, verl and TRL adapters, in-process and as clients of a real ``zreward serve`` on the loopback."""
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="zreward serve needs the [serve] extra (fastapi, uvicorn, httpx)")

from tests.deploy_helpers import save_tiny_student, uint8_images  # noqa: E402
from zreward.deploy.adapters import (  # noqa: E402
    LocalReward,
    RewardClient,
    RewardError,
    flow_grpo_reward,
    trl_reward_func,
    verl_batch_compute_score,
    verl_compute_score,
)
from zreward.deploy.engine import Scoring  # noqa: E402
from zreward.deploy.model_folder import load_model_folder  # noqa: E402
from zreward.deploy.serve import BackgroundServer  # noqa: E402
from zreward.deploy.service import ServeSettings, create_app  # noqa: E402
from zreward.scoring.rubric import DIMENSIONS  # noqa: E402

TOKEN = "adapter-token"


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return load_model_folder(save_tiny_student(tmp_path_factory.mktemp("models"), seed=11))


@pytest.fixture(scope="module")
def server(scorer):
    with BackgroundServer(create_app(scorer, ServeSettings(max_batch=8, max_wait_ms=5), token=TOKEN)) as running:
        yield running


@pytest.fixture(scope="module")
def backends(scorer, server):
    client = RewardClient(server.url, token=TOKEN, timeout=30, max_images_per_request=3)
    yield {"local": LocalReward(scorer, batch_size=2), "client": client}
    client.close()


def test_client_and_local_give_the_same_records(backends):
    images = uint8_images(5)  # 5 images: two requests of at most 3 for the client, three batches locally
    prompts = [f"prompt {i}" for i in range(5)]
    local = backends["local"].score(images, prompts)
    remote = backends["client"].score(images, prompts)
    assert len(remote) == 5 and list(remote[0]) == ["dimensions", "reward", "aggregation"]
    for got, want in zip(remote, local):
        assert got["reward"] == pytest.approx(want["reward"], abs=1e-6)
        for d in DIMENSIONS:
            assert got["dimensions"][d]["probs"] == pytest.approx(want["dimensions"][d]["probs"], abs=1e-6)


@pytest.mark.parametrize("kind", ["local", "client"])
def test_flow_grpo_reward_takes_float_nchw_and_uint8_nhwc(backends, kind):
    fn = flow_grpo_reward(backends[kind])
    uint8 = uint8_images(3, seed=1)
    floats = torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255  # exact in 8 bits: no rounding on the wire
    scores, info = fn(floats, ["a", "b", "c"], [{}, {}, {}])
    again, _ = fn(uint8, ["a", "b", "c"], None)
    assert scores.dtype == np.float32 and scores.shape == (3,)
    np.testing.assert_allclose(scores, again, atol=1e-6)
    assert set(info["dimensions"]) == set(DIMENSIONS)
    means = np.stack([info["dimensions"][d] for d in DIMENSIONS], 1)
    np.testing.assert_allclose(scores, means.mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="4-D batch"):
        fn(uint8[0], ["a"], None)
    with pytest.raises(ValueError, match="one prompt per image"):
        fn(uint8, ["a"], None)


@pytest.mark.parametrize("kind", ["local", "client"])
def test_verl_compute_score(backends, kind, tmp_path):
    images = uint8_images(2, seed=2)
    Image.fromarray(images[0]).save(tmp_path / "gen0.png")
    infos = [{"image": str(tmp_path / "gen0.png"), "prompt": "a cat"}, {"image": images[1], "prompt": "a dog"}]
    batch = verl_batch_compute_score(backends[kind])(data_sources=["t2i"] * 2, solution_strs=["", ""],
                                                     ground_truths=[None, None], extra_infos=infos)
    single = verl_compute_score(backends[kind])("t2i", "", None, extra_info=infos[0])
    assert set(single) == {"score", *DIMENSIONS}
    assert single["score"] == pytest.approx(batch[0]["score"], abs=1e-6)
    want = backends["local"].score(images, ["a cat", "a dog"])
    assert [b["score"] for b in batch] == pytest.approx([w["reward"] for w in want], abs=1e-6)
    with pytest.raises(ValueError, match=r"extra_infos\[0\] must be a dict with the generated 'image'"):
        verl_compute_score(backends[kind])("t2i", "", None, extra_info={"prompt": "no image"})


@pytest.mark.parametrize("kind", ["local", "client"])
def test_trl_reward_func(backends, kind):
    func = trl_reward_func(backends[kind])
    assert func.__name__ == "zreward"
    images = [Image.fromarray(a) for a in uint8_images(2, seed=3)]
    conversational = [[{"role": "system", "content": "be good"}, {"role": "user", "content": "a red cube"}],
                      [{"role": "user", "content": [{"type": "text", "text": "a blue"}, {"type": "text", "text": "ball"}]}]]
    rewards = func(prompts=conversational, completions=images, completion_ids=None)
    want = backends["local"].score(images, ["a red cube", "a blue ball"])
    assert rewards == pytest.approx([w["reward"] for w in want], abs=1e-6)
    assert func(["a red cube"], images[:1]) == pytest.approx(rewards[:1], abs=1e-6)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a string or a list of chat messages"):
        func([[{"role": "assistant", "content": "x"}]], images[:1])


def test_client_scoring_options(server):
    scoring = Scoring(("realism", "alignment"), "weighted_mean", (3.0, 1.0))
    with RewardClient(server.url, token=TOKEN, scoring=scoring) as client:
        record = client.score(uint8_images(1), ["a"])[0]
        assert list(record["dimensions"]) == ["realism", "alignment"]
        means = [record["dimensions"][d]["mean"] for d in ("realism", "alignment")]
        assert record["reward"] == pytest.approx(0.75 * means[0] + 0.25 * means[1], abs=1e-6)
        assert client.health()["status"] == "ok"


def test_client_retries_a_full_queue_then_succeeds(scorer):
    settings = ServeSettings(max_batch=64, max_wait_ms=400, max_queue_images=2, max_request_images=2)
    app = create_app(scorer, settings)
    with BackgroundServer(app) as running, RewardClient(running.url, retries=3, backoff_s=0.05) as client:
        filler = threading.Thread(target=client.score, args=(uint8_images(2), ["a", "b"]))
        filler.start()
        deadline = time.monotonic() + 30
        while app.state.batcher.queued_images < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        records = client.score(uint8_images(1, seed=4), ["c"])  # first answer 503, then Retry-After, then 200
        filler.join()
        assert len(records) == 1 and app.state.batcher.stats["queue_full"] >= 1


def test_client_errors_name_the_problem(server):
    with RewardClient(server.url, token="wrong", retries=3) as client:
        started = time.monotonic()
        with pytest.raises(RewardError, match="answered 401: missing or wrong bearer token"):
            client.score(uint8_images(1), ["a"])
        assert time.monotonic() - started < 5  # a 4xx is not retried
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens there once closed
    with RewardClient(f"http://127.0.0.1:{closed_port}", retries=2, backoff_s=0.01) as client:
        with pytest.raises(RewardError, match="no reward service answered after 3 attempts.*ConnectError"):
            client.score(uint8_images(1), ["a"])
    for kwargs, message in [({"retries": -1}, "retries"), ({"timeout": 0}, "timeout must be positive"),
                            ({"max_images_per_request": 0}, "max_images_per_request")]:
        with pytest.raises(ValueError, match=message):
            RewardClient(server.url, **kwargs)
    with RewardClient(server.url, token=TOKEN) as client:
        with pytest.raises(TypeError, match="prompts must be a sequence of strings"):
            client.score(uint8_images(1), "a")
        with pytest.raises(ValueError, match=r"images\[0\] must be float \[3, H, W\]"):
            client.score([np.zeros((3, 8, 8), np.int16)], ["a"])


def test_client_timeout(scorer):
    settings = ServeSettings(max_batch=64, max_wait_ms=1500)
    with BackgroundServer(create_app(scorer, settings)) as running, \
            RewardClient(running.url, timeout=0.2, retries=0) as client:
        with pytest.raises(RewardError, match="ReadTimeout"):
            client.score(uint8_images(1), ["slow"])
