"""Request micro-batching for the reward service: many small requests, one forward pass per batch, and no request
holding the model while others wait.

Requests (``Job``: images with their prompts and scoring options) wait in a queue bounded in images; a full queue
refuses new work (``QueueFull``) instead of growing. One worker thread fills each batch of up to ``max_batch``
images round-robin over the queued requests, one image of each in turn, the turn carried over from batch to batch.
A request of many images is so scored over several batches that it shares with the requests that came after it: a
small request waits about one forward, never for a large one to finish. A batch is formed once ``max_batch``
images are queued or the oldest request has waited ``max_wait_s``; it is scored in one forward per image size (the
union of the dimensions asked for), and each record is filed at its image's place in its request, which gets its
records when the last of its images is scored.

A request whose client has gone is cancelled (``Job.future.cancel()``): it leaves the queue at once, its images
not yet in a batch are never scored (``stats["dropped_images"]["client_gone"]``) and the records of those in the
forward running then are thrown away. ``close`` refuses new requests, finishes the queued ones, then stops the
worker.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
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


@dataclass(eq=False)  # compared by identity: the queue removes a cancelled job by it
class Job:
    """One request: uint8 ``[H, W, 3]`` images, their prompts and scoring; ``future`` gets its records, one per
    image in order. ``scheduled`` counts the images handed to a batch so far."""

    images: list
    prompts: list[str]
    scoring: Scoring
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    scheduled: int = 0
    records: list = field(init=False)
    scored: int = 0

    def __post_init__(self):
        if not self.images or len(self.images) != len(self.prompts):
            raise ValueError(f"a job needs one prompt per image: got {len(self.prompts)} prompts for "
                             f"{len(self.images)} images")
        self.records = [None] * len(self.images)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MicroBatcher:
    """Gathers the images of queued ``Job``s into batches of up to ``max_batch`` for ``scorer`` (what
    ``zreward.deploy.engine.open_scorer`` returns).

    ``max_wait_s = 0`` and ``max_batch = 1`` give one image per forward (the baseline the load test compares
    against).
    """

    def __init__(self, scorer, max_batch: int = 16, max_wait_s: float = 0.01, max_queue_images: int = 64):
        self.scorer = scorer
        self.max_batch = _positive_int("max_batch", max_batch)
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or max_wait_s < 0:
            raise ValueError(f"max_wait_s must be a non-negative number, got {max_wait_s!r}")
        self.max_wait_s = float(max_wait_s)
        self.max_queue_images = _positive_int("max_queue_images", max_queue_images)
        self._waiting: deque[Job] = deque()  # jobs with images not yet in a batch, in round-robin order
        self._queued_images = 0
        self._closing = False
        self._condition = threading.Condition(threading.RLock())  # a cancel may come from any thread
        self._thread = threading.Thread(target=self._work, name="zreward-batcher", daemon=True)
        # dropped_images: never scored, by reason (client_gone, request_failed); discarded_images: scored in the
        # forward that was running when their client went away.
        self.stats = {"batches": 0, "images": 0, "forward_seconds": 0.0, "cancelled": 0, "queue_full": 0,
                      "failed_batches": 0, "largest_batch": 0, "dropped_images": Counter(), "discarded_images": 0}

    @property
    def queued_images(self) -> int:
        """Images waiting for a batch (not counting those of the forward running now)."""
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
            self._waiting.append(job)
            self._queued_images += len(job.images)
            self._condition.notify()
        job.future.add_done_callback(lambda future: self._drop(job) if future.cancelled() else None)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, stop the worker."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _drop(self, job: Job) -> None:
        """Take a cancelled job's images that no batch holds yet off the queue."""
        with self._condition:
            self.stats["cancelled"] += 1
            self._remove(job, "client_gone")

    def _remove(self, job: Job, reason: str) -> None:
        """Take ``job`` out of the round-robin; its images not yet in a batch count as dropped for ``reason``."""
        if job in self._waiting:
            self._waiting.remove(job)
            left = len(job.images) - job.scheduled
            self._queued_images -= left
            self.stats["dropped_images"][reason] += left
            job.scheduled = len(job.images)

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """``(job, image index)`` pairs for the next forward, one image per waiting job in turn; None once
        closing with nothing left."""
        with self._condition:
            while not self._waiting and not self._closing:
                self._condition.wait()
            if not self._waiting:
                return None
            deadline = min(job.enqueued for job in self._waiting) + self.max_wait_s
            while self._queued_images < self.max_batch and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._waiting:
                    break
                self._condition.wait(remaining)
            batch = []
            while self._waiting and len(batch) < self.max_batch:
                job = self._waiting.popleft()
                batch.append((job, job.scheduled))
                job.scheduled += 1
                if job.scheduled < len(job.images):
                    self._waiting.append(job)  # its next image waits for every other job's turn
            self._queued_images -= len(batch)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:  # empty when every waiting job was cancelled during the wait
                self._run(batch)

    def _run(self, batch: list[tuple[Job, int]]) -> None:
        """One forward for ``batch``; each live job gets its images' records (its result once all are in), or
        the error if the forward failed."""
        batch = [(job, i) for job, i in batch if not job.future.cancelled()]
        if not batch:
            return
        jobs = list(dict.fromkeys(job for job, _ in batch))
        requested = {d for job in jobs for d in job.scoring.dimensions}
        dimensions = tuple(d for d in DIMENSIONS if d in requested)
        started = time.perf_counter()
        try:
            dist = score_images(self.scorer, [to_float_chw(job.images[i]) for job, i in batch],
                                [job.prompts[i] for job, i in batch], dimensions)
        except Exception as error:  # noqa: BLE001 - the error belongs to the requests, the worker must go on
            self.stats["failed_batches"] += 1
            for job in jobs:
                with self._condition:
                    self._remove(job, "request_failed")  # the rest of a failed request is not scored
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(error)
            return
        self.stats["forward_seconds"] += time.perf_counter() - started
        self.stats["batches"] += 1
        self.stats["images"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        for job in jobs:
            rows = [n for n, (owner, _) in enumerate(batch) if owner is job]
            columns = [dimensions.index(d) for d in job.scoring.dimensions]
            part = ScoreDist(dist.probs[rows], dist.mean[rows], dist.std[rows], None)
            for (_, i), record in zip((batch[n] for n in rows), job.scoring.records(part, columns)):
                job.records[i] = record
            job.scored += len(rows)
            if job.future.cancelled():
                self.stats["discarded_images"] += len(rows)
            elif job.scored == len(job.images) and job.future.set_running_or_notify_cancel():
                job.future.set_result(job.records)
