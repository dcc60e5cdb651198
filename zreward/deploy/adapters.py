"""Reward functions in the shapes RL trainers call, backed by a model in this process or by ``zreward serve``.

A *backend* has ``score(images, prompts) -> list[record]`` (records as in ``zreward.deploy.engine``):

* :class:`LocalReward` scores in this process from a model folder;
* :class:`RewardClient` sends the images to a ``zreward serve`` service as PNG (JSON over HTTP, with a
  timeout, and retries with exponential backoff on connection errors, 429 and 5xx answers).

The adapters wrap either one:

* :func:`flow_grpo_reward` - ``fn(images, prompts, metadata) -> (scores, info)`` as Flow-GRPO's reward
  functions, ``images`` float NCHW in [0, 1] or uint8 NHWC;
* :func:`verl_compute_score` / :func:`verl_batch_compute_score` - verl's ``compute_score`` (per sample, and the
  batched form of its ``BatchRewardManager``), the image and prompt in ``extra_info``;
* :func:`trl_reward_func` - ``reward_func(prompts, completions, **kwargs) -> list[float]`` as TRL's GRPO
  trainer takes, the completions being the generated images.

A float image sent to the service is rounded to 8 bits on the way (PNG), so a client's scores equal the local
ones for uint8 images and differ by that rounding for float images.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from zreward.deploy.engine import Scoring, open_scorer, score_images
from zreward.deploy.images import encode_image, split_images, to_float_chw


class RewardError(RuntimeError):
    """The service refused a request, or could not be reached within the retries."""


def _check_prompts(prompts, count: int) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of strings, one per image")
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"prompts must hold one prompt per image: got {len(prompts)} prompts for {count} images")
    return prompts


class LocalReward:
    """Scores in this process: ``model`` is a model folder path or a loaded ``RewardScorer``."""

    def __init__(self, model, scoring: Scoring = Scoring(), device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 16):
        self.scorer = open_scorer(model, "hf", device, dtype) if isinstance(model, (str, Path)) else model
        self.scoring = scoring
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    def score(self, images, prompts: Sequence[str]) -> list[dict]:
        images = [to_float_chw(image, f"images[{i}]") for i, image in enumerate(split_images(images))]
        prompts = _check_prompts(prompts, len(images))
        records = []
        for start in range(0, len(images), self.batch_size):
            rows = slice(start, start + self.batch_size)
            records += self.scoring.records(score_images(self.scorer, images[rows], prompts[rows],
                                                         self.scoring.dimensions))
        return records


class RewardClient:
    """Client of ``zreward serve`` at ``url``; ``scoring`` None uses the service's defaults.

    Each call sends at most ``max_images_per_request`` images per request (the service's
    ``--max-request-images``). ``timeout`` bounds each attempt; ``retries`` more attempts follow a connection
    error, a timeout, 429 or 5xx, after ``backoff_s * 2**attempt`` seconds (or the service's ``Retry-After``).
    """

    RETRY_STATUSES = (429, 500, 502, 503, 504)

    def __init__(self, url: str = "http://127.0.0.1:8321", token: str | None = None, scoring: Scoring | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff_s: float = 0.5, max_images_per_request: int = 64):
        import httpx

        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        if not timeout > 0 or not backoff_s >= 0:
            raise ValueError(f"timeout must be positive and backoff_s non-negative, got {timeout} and {backoff_s}")
        if isinstance(max_images_per_request, bool) or not isinstance(max_images_per_request, int) \
                or max_images_per_request < 1:
            raise ValueError(f"max_images_per_request must be a positive int, got {max_images_per_request!r}")
        self.url = url.rstrip("/")
        self.scoring, self.retries, self.backoff_s = scoring, retries, backoff_s
        self.max_images_per_request = max_images_per_request
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._transport_errors = (httpx.TransportError,)

    def score(self, images, prompts: Sequence[str]) -> list[dict]:
        encoded = [encode_image(image, f"images[{i}]") for i, image in enumerate(split_images(images))]
        prompts = _check_prompts(prompts, len(encoded))
        options = {} if self.scoring is None else {"dimensions": list(self.scoring.dimensions),
                                                   "aggregation": self.scoring.aggregation,
                                                   "weights": None if self.scoring.weights is None
                                                   else list(self.scoring.weights)}
        records = []
        for start in range(0, len(encoded), self.max_images_per_request):
            rows = slice(start, start + self.max_images_per_request)
            body = {"images": encoded[rows], "prompts": prompts[rows], **options}
            # Drop the service's echo of the request ("image" index, "prompt"): records equal LocalReward's.
            records += [{k: v for k, v in r.items() if k not in ("image", "prompt")}
                        for r in self._post("/score", body)["results"]]
        return records

    def health(self) -> dict:
        return self._http.get(f"{self.url}/health").json()

    def _post(self, path: str, body: dict) -> dict:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.post(f"{self.url}{path}", json=body)
            except self._transport_errors as error:
                if last:
                    raise RewardError(f"reward service at {self.url} unreachable after {attempt + 1} attempts "
                                      f"({type(error).__name__}: {error})") from error
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if response.status_code == 200:
                return response.json()
            if response.status_code not in self.RETRY_STATUSES or last:
                raise RewardError(f"reward service at {self.url} answered {response.status_code}: "
                                  f"{_error_message(response)}")
            retry_after = response.headers.get("retry-after", "")
            time.sleep(float(retry_after) if retry_after.isdigit() else self.backoff_s * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error_message(response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text


def flow_grpo_reward(backend):
    """``fn(images, prompts, metadata) -> (scores, info)``: ``scores`` float32 ``[N]`` (the aggregated reward),
    ``info["dimensions"][name]`` float32 ``[N]`` expected scores per dimension. ``metadata`` is not used."""
    def reward_fn(images, prompts, metadata=None):
        records = backend.score(images, prompts)
        scores = np.array([r["reward"] for r in records], dtype=np.float32)
        names = records[0]["dimensions"] if records else ()
        info = {"dimensions": {d: np.array([r["dimensions"][d]["mean"] for r in records], dtype=np.float32)
                               for d in names}}
        return scores, info

    return reward_fn


def _sample_image(extra_info, index: int):
    if not isinstance(extra_info, dict) or "image" not in extra_info or not isinstance(extra_info.get("prompt"), str):
        raise ValueError(f"extra_infos[{index}] must be a dict with the generated 'image' (path, PIL image or array) "
                         "and its 'prompt'")
    image = extra_info["image"]
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image


def verl_batch_compute_score(backend):
    """verl's batched ``compute_score(data_sources, solution_strs, ground_truths, extra_infos) -> list[dict]``.

    Each ``extra_infos[i]`` holds the generated ``image`` and its ``prompt``; each result is
    ``{"score": reward, "<dimension>": expected score, ...}`` (verl logs the extra keys)."""
    def compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs):
        extra_infos = list(extra_infos)
        images = [_sample_image(info, i) for i, info in enumerate(extra_infos)]
        records = backend.score(images, [info["prompt"] for info in extra_infos])
        return [{"score": r["reward"], **{d: v["mean"] for d, v in r["dimensions"].items()}} for r in records]

    return compute_score


def verl_compute_score(backend):
    """verl's per-sample ``compute_score(data_source, solution_str, ground_truth, extra_info) -> dict``."""
    batched = verl_batch_compute_score(backend)

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        return batched([data_source], [solution_str], [ground_truth], [extra_info])[0]

    return compute_score


def _prompt_text(prompt, index: int) -> str:
    """A plain prompt, or the text of the last user turn of a conversational one (TRL's two prompt formats)."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"] if isinstance(prompt, list) else []
    if users:
        content = users[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(part["text"] for part in content if isinstance(part, dict) and part.get("type") == "text")
    raise ValueError(f"prompts[{index}] must be a string or a list of chat messages with a user turn")


def trl_reward_func(backend):
    """TRL's ``reward_func(prompts, completions, **kwargs) -> list[float]``, the completions being images."""
    def reward_func(prompts, completions, **kwargs):
        texts = [_prompt_text(p, i) for i, p in enumerate(prompts)]
        return [r["reward"] for r in backend.score(completions, texts)]

    reward_func.__name__ = "zreward"  # TRL logs each reward under its function's name
    return reward_func
