"""``zreward serve`` on the loopback interface: scores, micro-batching, every refusal as a JSON 4xx / 503, a
client that disappears, graceful shutdown (in-process and by SIGTERM to the command)."""
import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="zreward serve needs the [serve] extra (fastapi, uvicorn, httpx)")
import httpx  # noqa: E402

from tests.deploy_helpers import save_tiny_student, uint8_images  # noqa: E402
from zreward.cli import main  # noqa: E402
from zreward.deploy.adapters import LocalReward  # noqa: E402
from zreward.deploy.batcher import Job, MicroBatcher, QueueFull, ShuttingDown  # noqa: E402
from zreward.deploy.engine import Scoring  # noqa: E402
from zreward.deploy.images import encode_image  # noqa: E402
from zreward.deploy.model_folder import load_model_folder  # noqa: E402
from zreward.deploy.serve import BackgroundServer  # noqa: E402
from zreward.deploy.service import ServeSettings, create_app  # noqa: E402

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def scorer(model_dir):
    return load_model_folder(model_dir)


def _png(array, format="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


SETTINGS = ServeSettings(max_batch=4, max_wait_ms=5, max_queue_images=8, max_request_images=4,
                         max_request_bytes=100_000, max_image_pixels=64 * 64)


@pytest.fixture(scope="module")
def server(scorer):
    with BackgroundServer(create_app(scorer, SETTINGS, token=TOKEN)) as running:
        yield running


def _score(url, images, prompts, headers=AUTH, **options):
    return httpx.post(f"{url}/score", json={"images": [encode_image(i) for i in images], "prompts": prompts,
                                            **options}, headers=headers, timeout=60)


def test_scores_match_the_model_in_request_order(server, scorer):
    images = list(uint8_images(2)) + list(uint8_images(1, 32, 64, seed=1))  # two sizes: two forwards
    response = _score(server.url, images, ["a", "b", "c"])
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["image"], r["prompt"]) for r in results] == [(0, "a"), (1, "b"), (2, "c")]
    local = LocalReward(scorer).score(images, ["a", "b", "c"])
    for result, want in zip(results, local):
        assert result["reward"] == pytest.approx(want["reward"], abs=1e-6)
        assert result["dimensions"]["realism"]["probs"] == pytest.approx(want["dimensions"]["realism"]["probs"],
                                                                         abs=1e-6)
    custom = _score(server.url, images[:1], ["a"], dimensions=["realism", "aesthetics"], aggregation="min").json()
    record = custom["results"][0]
    assert list(record["dimensions"]) == ["realism", "aesthetics"] and record["aggregation"] == "min"
    assert record["reward"] == pytest.approx(min(d["mean"] for d in record["dimensions"].values()))
    jpeg = httpx.post(f"{server.url}/score", headers=AUTH,
                      json={"images": ["data:image/jpeg;base64," + _png(images[0], "JPEG")], "prompts": ["a"]})
    assert jpeg.status_code == 200


def _bad_requests():
    good = _png(uint8_images(1)[0])
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    thin = _png(np.zeros((1, 250, 3), np.uint8))
    return [
        ("malformed JSON", b"{not json", 400, "Invalid JSON"),
        ("not an object", b"[1, 2]", 400, "invalid request"),
        ("no prompts", json.dumps({"images": [good]}), 400, "prompts: Field required"),
        ("unknown key", json.dumps({"images": [good], "prompts": ["a"], "temperature": 2}), 400, "Extra inputs"),
        ("prompt not a string", json.dumps({"images": [good], "prompts": [3]}), 400, "prompts.0"),
        ("count mismatch", json.dumps({"images": [good], "prompts": ["a", "b"]}), 400, "one prompt per image"),
        ("empty", json.dumps({"images": [], "prompts": []}), 400, "at least 1 item"),
        ("bad base64", json.dumps({"images": ["%%%"], "prompts": ["a"]}), 400, "images[0] is not valid base64"),
        ("not PNG/JPEG", json.dumps({"images": [base64.b64encode(gif.getvalue()).decode()], "prompts": ["a"]}), 400,
         "must be PNG or JPEG"),
        ("garbage image", json.dumps({"images": [good, base64.b64encode(b"abc").decode()], "prompts": ["a", "b"]}),
         400, "images[1] is not a PNG or JPEG image"),
        ("aspect ratio", json.dumps({"images": [thin], "prompts": ["a"]}), 400, "aspect ratio"),
        ("unknown dimension", json.dumps({"images": [good], "prompts": ["a"], "dimensions": ["beauty"]}), 400,
         "dimensions must be distinct names"),
        ("unknown aggregation", json.dumps({"images": [good], "prompts": ["a"], "aggregation": "max"}), 400,
         "aggregation must be one of"),
        ("wrong weights", json.dumps({"images": [good], "prompts": ["a"], "weights": [1.0]}), 400,
         "weights must be 4 non-negative numbers"),
        ("too many pixels", json.dumps({"images": [_png(uint8_images(1, 65, 64)[0])], "prompts": ["a"]}), 413,
         "above the limit of 4096"),
        ("too many images", json.dumps({"images": [good] * 5, "prompts": ["a"] * 5}), 413, "above the limit of 4"),
        ("body too large", json.dumps({"images": [good], "prompts": ["a" * 100_001]}), 413, "request body"),
        # The tiny tokenizer spells "a" * n in n tokens; the default limit is 512.
        ("prompt too long", json.dumps({"images": [good, good], "prompts": ["a", "a" * 20_000]}), 413,
         "prompts[1] is 20000 tokens long, above the limit of 512 tokens"),
    ]


@pytest.mark.parametrize("name, body, status, message", _bad_requests(), ids=[c[0] for c in _bad_requests()])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(server, name, body, status, message):
    response = httpx.post(f"{server.url}/score", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert _score(server.url, uint8_images(1), ["still fine"]).status_code == 200


def test_authentication_health_and_metrics(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = _score(server.url, uint8_images(1), ["a"], headers=headers)
        assert response.status_code == 401 and "bearer token" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "queued_images": 0, "max_batch": 4}
    assert _score(server.url, uint8_images(2), ["a", "b"]).status_code == 200
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert re.search(r'^zreward_requests_total\{code="200"\} [1-9]', text, re.M)
    assert re.search(r'^zreward_requests_total\{code="401"\} [1-9]', text, re.M)
    assert re.search(r"^zreward_images_scored_total [1-9]", text, re.M)
    wrong_method = httpx.get(f"{server.url}/score", headers=AUTH)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def _in_threads(count, call):
    results = [None] * count

    def one(i):
        results[i] = call(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_concurrent_requests_share_one_forward_and_a_full_queue_answers_503(scorer):
    # A long wait and a large batch: the queue fills before the batcher runs.
    settings = ServeSettings(max_batch=64, max_wait_ms=2000, max_queue_images=4, max_request_images=4)
    app = create_app(scorer, settings)
    batcher = app.state.batcher
    with BackgroundServer(app) as running:
        threads, results = _in_threads(4, lambda i: _score(running.url, uint8_images(1, seed=i), [f"p{i}"]))
        _wait_for(lambda: batcher.queued_images == 4)
        overload = _score(running.url, uint8_images(1), ["one too many"])
        assert overload.status_code == 503 and overload.headers["retry-after"] == "1"
        assert "retry later" in overload.json()["error"]
        for thread in threads:
            thread.join()
        assert [r.status_code for r in results] == [200] * 4
        assert batcher.stats["batches"] == 1 and batcher.stats["largest_batch"] == 4
        assert batcher.stats["queue_full"] == 1


def test_a_client_that_disconnects_does_not_wedge_the_batcher(scorer):
    settings = ServeSettings(max_batch=64, max_wait_ms=300, max_queue_images=8, max_request_images=4)
    app = create_app(scorer, settings)
    batcher = app.state.batcher
    with BackgroundServer(app) as running:
        body = json.dumps({"images": [encode_image(uint8_images(1)[0])], "prompts": ["gone"]}).encode()
        head = (f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((running.host, running.port)) as half:  # killed while sending the body
            half.sendall(head + body[:10])
        with socket.create_connection((running.host, running.port)) as waiting:  # killed while queued
            waiting.sendall(head + body)
            _wait_for(lambda: batcher.queued_images == 1)
        _wait_for(lambda: batcher.stats["cancelled"] == 1)
        response = _score(running.url, uint8_images(2), ["a", "b"])
        assert response.status_code == 200 and len(response.json()["results"]) == 2
        assert batcher.stats["images"] == 2  # the abandoned request was never scored


def test_shutdown_finishes_queued_requests(scorer):
    settings = ServeSettings(max_batch=64, max_wait_ms=1500, max_queue_images=8, max_request_images=4)
    app = create_app(scorer, settings)
    running = BackgroundServer(app).start()
    threads, results = _in_threads(3, lambda i: _score(running.url, uint8_images(1, seed=i), [f"p{i}"]))
    _wait_for(lambda: app.state.batcher.queued_images == 3)
    running.stop()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200] * 3
    with pytest.raises(ShuttingDown):
        app.state.batcher.submit(Job([uint8_images(1)[0]], ["late"], Scoring()))


def test_sigterm_to_the_command_finishes_received_requests(model_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    job = subprocess.Popen([sys.executable, "-m", "zreward.cli", "serve", "--model", str(model_dir), "--port", "0",
                            "--token-file", str(token_file), "--max-batch", "64", "--max-wait-ms", "1500",
                            "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "zreward serve:" not in line:
            line = job.stderr.readline()
            assert line or job.poll() is None, "zreward serve exited before listening"
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", line).group(1)
        assert "bearer token required" in line
        threads, results = _in_threads(2, lambda i: _score(url, uint8_images(1, seed=i), [f"p{i}"]))
        _wait_for(lambda: "zreward_queued_images 2" in httpx.get(f"{url}/metrics", headers=AUTH).text)
        job.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join()
        assert [r.status_code for r in results] == [200] * 2
        # uvicorn re-raises the signal once shut down (exit status -SIGTERM); before 0.29 it exited with 0.
        assert job.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if job.poll() is None:
            job.kill()
        job.stderr.close()


def test_command_refuses_an_open_address_without_a_token(model_dir, monkeypatch):
    monkeypatch.delenv("ZREWARD_SERVE_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="0.0.0.0 is reachable from other machines"):
        main(["serve", "--model", str(model_dir), "--host", "0.0.0.0"])
    with pytest.raises(SystemExit, match="engine 'vllm' needs vLLM|vLLM's CPU backend cannot run"):
        main(["serve", "--model", str(model_dir), "--engine", "vllm"])
    with pytest.raises(SystemExit, match="--threads must be positive"):
        main(["serve", "--model", str(model_dir), "--threads", "0"])
    with pytest.raises(SystemExit, match=r"max_prompt_tokens \(100000\) is above the \d+ tokens the model's context "
                                         "of 32768 leaves"):
        main(["serve", "--model", str(model_dir), "--max-prompt-tokens", "100000"])
    with pytest.raises(SystemExit, match="max_prompt_tokens must be a positive int, got 0"):
        main(["serve", "--model", str(model_dir), "--max-prompt-tokens", "0"])


def test_batcher_skips_cancelled_jobs_and_survives_a_failing_forward(scorer):
    class FailsOnce:
        calls = 0

        def lm_head_weight(self):
            return scorer.lm_head_weight()

        def student_scores(self, *args):
            FailsOnce.calls += 1
            if FailsOnce.calls == 1:
                raise RuntimeError("forward failed")
            return scorer.student_scores(*args)

    batcher = MicroBatcher(FailsOnce(), max_batch=8, max_wait_s=0.2, max_queue_images=4)
    batcher.start()
    image = uint8_images(1)[0]
    try:
        cancelled = batcher.submit(Job([image, image], ["a", "a"], Scoring()))
        assert cancelled.cancel() and batcher.queued_images == 0  # its place in the queue is free at once
        first = batcher.submit(Job([image], ["b"], Scoring()))
        second = batcher.submit(Job([image, image], ["c", "d"], Scoring(("realism",))))
        with pytest.raises(QueueFull, match="holds 3 of at most 4 images"):
            batcher.submit(Job([image, image], ["e", "e"], Scoring()))
        for future in (first, second):  # one batch, one failed forward: both get its error
            with pytest.raises(RuntimeError, match="forward failed"):
                future.result(timeout=30)
        assert batcher.stats["cancelled"] == 1 and batcher.stats["failed_batches"] == 1
        assert batcher.stats["dropped_images"] == {"client_gone": 2}
        records = batcher.submit(Job([image], ["f"], Scoring(("realism",)))).result(timeout=30)
        assert list(records[0]["dimensions"]) == ["realism"] and FailsOnce.calls == 2
    finally:
        batcher.close()
    with pytest.raises(ValueError, match="one prompt per image"):
        Job([image, image], ["only one"], Scoring())
    for kwargs, message in [({"max_batch": 0}, "max_batch"), ({"max_wait_s": -1}, "max_wait_s"),
                            ({"max_queue_images": 1.5}, "max_queue_images")]:
        with pytest.raises(ValueError, match=message):
            MicroBatcher(scorer, **kwargs)
    with pytest.raises(ValueError, match="max_queue_images .* must be at least max_request_images"):
        ServeSettings(max_queue_images=2, max_request_images=4)


def _metric(url, name, reason):
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf'^{name}{{reason="{reason}"}} (\S+)$', text, re.M).group(1))


def test_a_long_prompt_is_refused_before_anything_is_scored(scorer):
    app = create_app(scorer, ServeSettings(max_batch=4, max_wait_ms=5))
    batcher = app.state.batcher
    long = "a lighthouse on a cliff " * 100
    tokens = len(scorer.tokenizer.encode(long, add_special_tokens=False))
    with BackgroundServer(app) as running:
        response = _score(running.url, uint8_images(3), ["a cat", "a dog", long], headers={})
        assert response.status_code == 413
        assert response.json() == {"error": f"prompts[2] is {tokens} tokens long, above the limit of 512 tokens"}
        assert batcher.stats["images"] == 0 and batcher.stats["batches"] == 0 and batcher.queued_images == 0
        assert _metric(running.url, "zreward_refused_requests_total", "prompt_too_long") == 1
        assert _metric(running.url, "zreward_refused_requests_total", "queue_full") == 0
        just_fits = _score(running.url, uint8_images(1), ["a" * 512], headers={})
        assert just_fits.status_code == 200 and batcher.stats["images"] == 1
    assert app.state.settings.max_prompt_tokens == 512  # the cap: the tiny model's context leaves far more


def test_a_small_request_is_not_held_behind_a_big_one(scorer):
    # One image per forward: the big request needs 12 forwards, the small one, sent once the big one is queued,
    # gets its turn after at most one of them.
    app = create_app(scorer, ServeSettings(max_batch=1, max_wait_ms=0, max_queue_images=16, max_request_images=12))
    batcher = app.state.batcher
    big_images, big_prompts = uint8_images(12, seed=3), [f"big {i}" for i in range(12)]
    finished = {}

    def send(name, images, prompts):
        response = _score(running.url, images, prompts, headers={})
        finished[name] = time.monotonic()
        return response

    with BackgroundServer(app) as running:
        threads, big = _in_threads(1, lambda i: send("big", big_images, big_prompts))
        _wait_for(lambda: batcher.queued_images > 0 or batcher.stats["batches"] > 0)
        small = send("small", uint8_images(1, seed=4), ["small"])
        threads[0].join()
    assert small.status_code == 200 and big[0].status_code == 200
    assert finished["small"] < finished["big"]
    # The big request's records come back in its images' order, as scored in one piece.
    results = big[0].json()["results"]
    assert [(r["image"], r["prompt"]) for r in results] == list(enumerate(big_prompts))
    local = LocalReward(scorer).score(big_images, big_prompts)
    assert [r["reward"] for r in results] == pytest.approx([r["reward"] for r in local], abs=1e-6)
    assert batcher.stats["largest_batch"] == 1 and batcher.stats["images"] == 13


def test_the_unscored_images_of_a_client_gone_are_never_scored(scorer):
    app = create_app(scorer, ServeSettings(max_batch=1, max_wait_ms=0, max_queue_images=16, max_request_images=12))
    batcher = app.state.batcher
    body = json.dumps({"images": [encode_image(i) for i in uint8_images(12)], "prompts": ["gone"] * 12}).encode()
    head = (f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with BackgroundServer(app) as running:
        with socket.create_connection((running.host, running.port)) as client:
            client.sendall(head + body)
            _wait_for(lambda: batcher.stats["batches"] >= 1)  # being scored: the client hangs up now
        _wait_for(lambda: batcher.stats["cancelled"] == 1 or batcher.stats["images"] == 12)
        assert batcher.stats["cancelled"] == 1, "every image was scored for a client that had gone"
        dropped = _metric(running.url, "zreward_dropped_images_total", "client_gone")
        assert dropped >= 1
        # Every image was either scored (before the hang-up, or in the forward running then) or dropped.
        _wait_for(lambda: batcher.stats["images"] + dropped == 12)
        scored = batcher.stats["images"]
        assert _score(running.url, uint8_images(1), ["next"], headers={}).status_code == 200
        assert batcher.stats["images"] == scored + 1  # nothing of the abandoned request ran after it was dropped


def test_the_serving_page_runs_and_names_every_option(tmp_path, monkeypatch, capsys):
    import argparse
    from pathlib import Path

    from zreward.deploy.serve import add_parser

    page = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    monkeypatch.chdir(tmp_path)  # the example writes its model folder to ./tiny_student
    (example,) = re.findall(r"```python\n(.*?)```", page, re.S)
    exec(compile(example, "docs/serving.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("200 ") and "413 {'error': 'prompts[0] is 600 tokens long" in printed
    parser = argparse.ArgumentParser().add_subparsers()
    add_parser(parser)
    options = {o for action in parser.choices["serve"]._actions for o in action.option_strings if o.startswith("--")}
    assert options - {"--help"} and not {o for o in options - {"--help"} if f"`{o}" not in page}
