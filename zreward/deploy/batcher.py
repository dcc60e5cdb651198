"""Request micro-batching for the reward service: many small requests, one forward pass per batch.

Requests (``Job``: a few images with their prompts and scoring options) wait in a queue bounded in images; a
full queue refuses new work (``QueueFull``) instead of growing. One worker thread takes the oldest request,
keeps gathering until ``max_batch`` images are queued or the oldest has waited ``max_wait_s``, scores the whole
batch (one forward per image size, the union of the dimensions asked for) and hands each request its records.
The forward runs off the event loop, so the service keeps accepting and refusing requests while it computes.
A request whose client has gone is cancelled; the worker skips it. ``close`` refuses new requests, finishes
the queued ones, then stops the worker.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from zr_kernels import ScoreDist
from zreward.deploy.engine import Scoring, score_images
from zreward.deploy.images import to_float_chw
from zreward.scoring.rubric import DIMENSIONS


class QueueFull(RuntimeError):
    """The queue holds ``max_queue_images`` images already."""


class ShuttingDown(RuntimeError):
    """The batcher is closing and takes no new requests."""


@dataclass
class Job:
    """One request: uint8 ``[H, W, 3]`` images, their prompts and scoring; ``future`` gets its records."""

    images: list
    prompts: list[str]
    scoring: Scoring
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        if not self.images or len(self.images) != len(self.prompts):
            raise ValueError(f"a job needs one prompt per image: got {len(self.prompts)} prompts for "
                             f"{len(self.images)} images")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MicroBatcher:
    """Gathers ``Job``s into batches of up to ``max_batch`` images for ``scorer`` (a ``RewardScorer``).

    A single request larger than ``max_batch`` is one batch of its own. ``max_wait_s = 0`` and ``max_batch = 1``
    give one request per forward (the baseline the load test compares against).
    """

    def __init__(self, scorer, max_batch: int = 16, max_wait_s: float = 0.01, max_queue_images: int = 64):
        self.scorer = scorer
        self.max_batch = _positive_int("max_batch", max_batch)
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or max_wait_s < 0:
            raise ValueError(f"max_wait_s must be a non-negative number, got {max_wait_s!r}")
        self.max_wait_s = float(max_wait_s)
        self.max_queue_images = _positive_int("max_queue_images", max_queue_images)
        self._queue: deque[Job] = deque()
        self._queued_images = 0
        self._closing = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="zreward-batcher", daemon=True)
        self.stats = {"batches": 0, "images": 0, "forward_seconds": 0.0, "cancelled": 0, "queue_full": 0,
                      "failed_batches": 0, "largest_batch": 0}

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises ``QueueFull`` or ``ShuttingDown`` instead of waiting."""
        with self._condition:
            if self._closing:
                raise ShuttingDown("the service is shutting down")
            if self._queued_images + len(job.images) > self.max_queue_images:
                self.stats["queue_full"] += 1
                raise QueueFull(f"the queue holds {self._queued_images} of at most {self.max_queue_images} images")
            self._queue.append(job)
            self._queued_images += len(job.images)
            self._condition.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, stop the worker."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        with self._condition:
            while not self._queue and not self._closing:
                self._condition.wait()
            if not self._queue:
                return None  # closing, nothing left
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._queued_images < self.max_batch and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch = [self._queue.popleft()]
            size = len(batch[0].images)
            while self._queue and size + len(self._queue[0].images) <= self.max_batch:
                size += len(self._queue[0].images)
                batch.append(self._queue.popleft())
            self._queued_images -= size
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self.stats["cancelled"] += len(batch) - len(live)
            if live:
                self._run(live)

    def _run(self, jobs: list[Job]) -> None:
        """One forward for ``jobs``; every job gets its records, or the error if the forward failed."""
        requested = {d for job in jobs for d in job.scoring.dimensions}
        dimensions = tuple(d for d in DIMENSIONS if d in requested)
        images = [to_float_chw(image) for job in jobs for image in job.images]
        prompts = [prompt for job in jobs for prompt in job.prompts]
        started = time.perf_counter()
        try:
            dist = score_images(self.scorer, images, prompts, dimensions)
        except Exception as error:  # noqa: BLE001 - the error belongs to the requests, the worker must go on
            self.stats["failed_batches"] += 1
            for job in jobs:
                job.future.set_exception(error)
            return
        self.stats["forward_seconds"] += time.perf_counter() - started
        self.stats["batches"] += 1
        self.stats["images"] += len(images)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(images))
        start = 0
        for job in jobs:
            rows = slice(start, start + len(job.images))
            start = rows.stop
            columns = [dimensions.index(d) for d in job.scoring.dimensions]
            part = ScoreDist(dist.probs[rows], dist.mean[rows], dist.std[rows], None)
            job.future.set_result(job.scoring.records(part, columns))
