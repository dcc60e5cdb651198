"""``RewardClient``: scores over HTTP on one or several replicas of a reward server, ``zreward serve`` or vLLM's
OpenAI-compatible server.

* ``api="zreward"`` (default): ``POST /score`` of ``zreward serve``, at most ``max_images_per_request`` images per
  request, PNG over JSON.
* ``api="openai"``: vLLM's ``POST /v1/chat/completions``, one request per (image, dimension) reading the K score
  ids' log-probs (``zreward.deploy.openai_api``); ``model`` is a local copy of the served model folder (its
  tokenizer, image processor and ``zreward_model.json``). The reward is aggregated here.

Several replicas (``url`` a list) share the requests: each goes to the live replica with the fewest requests in
flight. A request that fails on a replica (no connection, a timeout, 429, 5xx) is sent again to another one; a
replica that cannot be reached is marked dead for ``backoff_s * 2**(failures - 1)`` seconds (at most
``max_dead_s``), then tried again, and one that answers 429 / 503 waits its ``Retry-After``. A request fails after
``retries`` further attempts: :class:`RewardError`, never a made-up score. A 4xx other than 429 is the request's
own fault and fails at once. The calls of one ``score`` run on ``concurrency`` threads per replica.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from zreward.deploy.engine import Scoring
from zreward.deploy.images import encode_image, split_images
from zreward.scoring.rubric import check_prompts

APIS = ("zreward", "openai")
RETRY_STATUSES = (429, 500, 502, 503, 504)
OVERLOADED = (429, 503)


class RewardError(RuntimeError):
    """A request refused by the service, or not answered by any replica within the retries."""


@dataclass
class Replica:
    url: str
    in_flight: int = 0
    failures: int = 0          # consecutive failed attempts (reset by an answer)
    unavailable_until: float = 0.0
    sent: int = 0


class ReplicaPool:
    """Least-outstanding-requests choice among replicas, with dead (or overloaded) replicas set aside for a while.

    ``acquire`` returns the available replica with the fewest requests in flight (ties: the one sent fewest),
    preferring replicas the request has not failed on; when none is available it waits for the first to become
    available again. Thread-safe.
    """

    def __init__(self, urls: Sequence[str], backoff_s: float, max_dead_s: float):
        self.replicas = [Replica(url) for url in urls]
        self.backoff_s, self.max_dead_s = backoff_s, max_dead_s
        self._lock = threading.Lock()

    def acquire(self, avoid: set[str]) -> Replica:
        while True:
            with self._lock:
                now = time.monotonic()
                ready = [r for r in self.replicas if r.unavailable_until <= now]
                fresh = [r for r in ready if r.url not in avoid] or ready
                if fresh:
                    replica = min(fresh, key=lambda r: (r.in_flight, r.sent))
                    replica.in_flight += 1
                    replica.sent += 1
                    return replica
                pause = min(r.unavailable_until for r in self.replicas) - now
            time.sleep(max(pause, 0.0))

    def answered(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1
            replica.failures = 0

    def overloaded(self, replica: Replica, retry_after_s: float) -> None:
        with self._lock:
            replica.in_flight -= 1
            replica.unavailable_until = max(replica.unavailable_until, time.monotonic() + retry_after_s)

    def failed(self, replica: Replica) -> None:
        """No answer (connection refused or lost, timeout) or a server error: set aside, longer each time."""
        with self._lock:
            replica.in_flight -= 1
            replica.failures += 1
            pause = min(self.backoff_s * 2 ** (replica.failures - 1), self.max_dead_s)
            replica.unavailable_until = max(replica.unavailable_until, time.monotonic() + pause)

    def released(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def status(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [{"url": r.url, "in_flight": r.in_flight, "sent": r.sent, "failures": r.failures,
                     "available_in_s": max(r.unavailable_until - now, 0.0)} for r in self.replicas]


class RewardClient:
    """Client of ``zreward serve`` (``api="zreward"``) or of vLLM's OpenAI-compatible server (``api="openai"``)
    at ``url``, one URL or a list of replicas; see the module docstring.

    ``scoring``: dimensions and aggregation (None: the service's defaults; with ``api="openai"``, all dimensions
    and the weighted mean). ``timeout`` bounds each attempt. ``retries``: further attempts of a request after a
    failure, on other replicas where there are any. ``backoff_s``: how long a replica that failed once is set
    aside (doubling per consecutive failure, at most ``max_dead_s``), and the wait after a 429 / 503 without
    ``Retry-After``. ``concurrency``: requests in flight per replica (default 1 for ``zreward serve``, whose
    micro-batcher gathers the requests it gets, 16 for vLLM, which batches concurrent requests itself).
    ``model``: with ``api="openai"``, the model folder the server runs (a local copy); ``served_model``: its
    ``--served-model-name``, if any.
    """

    def __init__(self, url: str | Sequence[str] = "http://127.0.0.1:8321", token: str | None = None,
                 scoring: Scoring | None = None, timeout: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 max_images_per_request: int = 64, *, api: str = "zreward", model=None,
                 served_model: str | None = None, concurrency: int | None = None, max_dead_s: float = 30.0):
        import httpx

        urls = [url] if isinstance(url, str) else list(url)
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"url must be an http(s) URL or a non-empty list of them, got {url!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"url lists a replica twice: {urls}")
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        if not timeout > 0 or not backoff_s >= 0 or not max_dead_s >= 0:
            raise ValueError(f"timeout must be positive and backoff_s, max_dead_s non-negative, got {timeout}, "
                             f"{backoff_s} and {max_dead_s}")
        for name, value in (("max_images_per_request", max_images_per_request), ("concurrency", concurrency)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (model is None) == (api == "openai"):
            raise ValueError("model (the served model folder) goes with api='openai', and only with it")
        self.api = api
        self.urls = [u.rstrip("/") for u in urls]
        self.scoring, self.retries, self.backoff_s = scoring, retries, backoff_s
        self.max_images_per_request = max_images_per_request
        self.concurrency = concurrency or (1 if api == "zreward" else 16)
        self.pool = ReplicaPool(self.urls, backoff_s, max_dead_s)
        self.chat = None
        if api == "openai":
            from zreward.deploy.openai_api import ChatScoring

            self.chat = ChatScoring(model, served_model)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        workers = self.concurrency * len(self.urls)
        # No cap on connections: the caller's own threads may share this client besides the pool's workers.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(workers, 20))
        self._http = httpx.Client(timeout=timeout, headers=headers, limits=limits)
        self._transport_errors = (httpx.TransportError,)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="zreward-client")

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(self, images, prompts: Sequence[str]) -> list[dict]:
        """One record per image, in order (``{"dimensions", "reward", "aggregation"}``, as ``LocalReward``)."""
        images = split_images(images)
        prompts = check_prompts(prompts, len(images))
        if self.api == "openai":
            return self._score_chat(images, prompts)
        encoded = [encode_image(image, f"images[{i}]") for i, image in enumerate(images)]
        options = {} if self.scoring is None else {"dimensions": list(self.scoring.dimensions),
                                                   "aggregation": self.scoring.aggregation,
                                                   "weights": None if self.scoring.weights is None
                                                   else list(self.scoring.weights)}
        bodies = [{"images": encoded[start:start + self.max_images_per_request],
                   "prompts": prompts[start:start + self.max_images_per_request], **options}
                  for start in range(0, len(encoded), self.max_images_per_request)]
        answers = self._all(lambda body: self._post("/score", body), bodies)
        # Drop the service's echo of the request ("image" index, "prompt"): records equal LocalReward's.
        return [{k: v for k, v in r.items() if k not in ("image", "prompt")} for a in answers for r in a["results"]]

    def _score_chat(self, images: list, prompts: list[str]) -> list[dict]:
        from zreward.deploy.openai_api import CHAT_PATH

        scoring = self.scoring or Scoring()
        urls = [self.chat.image_url(image, f"images[{i}]") for i, image in enumerate(images)]
        bodies = [self.chat.body(u, p, d) for u, p in zip(urls, prompts) for d in scoring.dimensions]

        def logprobs(body):
            answer = self._post(CHAT_PATH, body)
            try:
                return self.chat.score_logprobs(answer)
            except ValueError as error:
                raise RewardError(f"vLLM server answer unusable: {error}") from None

        rows = self._all(logprobs, bodies)
        return scoring.records(self.chat.distributions(rows, len(images), len(scoring.dimensions)))

    def _all(self, call: Callable, items: list) -> list:
        """``call(item)`` for every item on the client's threads, results in order; the first error cancels the
        calls not started yet and is raised."""
        if len(items) == 1:
            return [call(items[0])]
        futures = [self._executor.submit(call, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            for future in futures:
                future.cancel()
            raise failed.exception()
        return [future.result() for future in futures]

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _post(self, path: str, body: dict) -> dict:
        """``body`` posted to ``path`` on one replica after another until one answers 200 (its JSON)."""
        problems, avoid = [], set()
        for attempt in range(self.retries + 1):
            replica = self.pool.acquire(avoid)
            try:
                response = self._http.post(f"{replica.url}{path}", json=body)
            except self._transport_errors as error:
                self.pool.failed(replica)
                problems.append(f"{replica.url}: {type(error).__name__}: {error}")
                avoid.add(replica.url)
                continue
            if response.status_code == 200:
                self.pool.answered(replica)
                return response.json()
            message = f"{replica.url} answered {response.status_code}: {_error_message(response)}"
            if response.status_code not in RETRY_STATUSES:
                self.pool.released(replica)
                raise RewardError(f"reward service {message}")
            if response.status_code in OVERLOADED:
                retry_after = response.headers.get("retry-after", "")
                self.pool.overloaded(replica, float(retry_after) if retry_after.isdigit()
                                     else self.backoff_s * 2**attempt)
            else:
                self.pool.failed(replica)
            problems.append(message)
            avoid.add(replica.url)
        raise RewardError(f"no reward service answered after {self.retries + 1} attempts: " + "; ".join(problems))

    def health(self, url: str | None = None) -> dict:
        """The ``/health`` answer of the replica ``url`` (default: the first one); vLLM answers with no body."""
        response = self._http.get(f"{(url or self.urls[0]).rstrip('/')}/health")
        return response.json() if response.content else {"status": "ok" if response.status_code == 200
                                                         else f"HTTP {response.status_code}"}

    def replicas(self) -> list[dict]:
        """Per replica: requests in flight, requests sent, consecutive failures, seconds until it is tried again."""
        return self.pool.status()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error_message(response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        return response.text[:500]
