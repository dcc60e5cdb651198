"""The HTTP reward service (FastAPI on uvicorn) behind ``zreward serve``.

``POST /score`` takes JSON, never a pickle::

    {"images": ["<base64 PNG or JPEG>", ...], "prompts": ["...", ...],
     "dimensions": ["realism", ...], "aggregation": "min", "weights": [...]}    (the last three optional)

and answers ``{"results": [{"image": i, "prompt": ..., "dimensions": {...}, "reward": ..., "aggregation": ...}]}``,
one entry per image in request order, each shaped as a ``zreward score`` line (``zreward.deploy.engine``).
Every refused request gets a JSON ``{"error": message}``: 400 malformed JSON, fields or images, 401 a missing
or wrong bearer token, 413 a body above ``max_request_bytes`` or an image above ``max_image_pixels``, 503 (with
``Retry-After``) a full queue or a service shutting down. ``GET /health`` reports readiness, ``GET /metrics``
Prometheus text counters.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from zreward.deploy.batcher import Job, MicroBatcher, QueueFull, ShuttingDown
from zreward.deploy.engine import Scoring, check_image
from zreward.deploy.images import ImageTooLarge, decode_image, to_float_chw


CLIENT_GONE = 499  # logged for a request whose client disconnected; nobody receives it


@dataclass(frozen=True)
class ServeSettings:
    """Batching and limits of the service (the ``zreward serve`` options)."""

    max_batch: int = 16                     # images per forward pass
    max_wait_ms: float = 10.0               # how long the oldest request waits for a batch to fill
    max_queue_images: int = 64              # queued images beyond which requests get 503
    max_request_images: int = 64
    max_request_bytes: int = 64 * 2**20
    max_image_pixels: int = 2048 * 2048
    scoring: Scoring = Scoring()            # dimensions and aggregation when a request names none

    def __post_init__(self):
        for name in ("max_request_images", "max_request_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_queue_images < self.max_request_images:
            # Else a request of max_request_images could never be queued and would get 503 forever.
            raise ValueError(f"max_queue_images ({self.max_queue_images}) must be at least max_request_images "
                             f"({self.max_request_images})")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    images: list[str] = Field(min_length=1)
    prompts: list[str] = Field(min_length=1)
    dimensions: list[str] | None = None
    aggregation: str | None = None
    weights: list[float] | None = None


class ApiError(Exception):
    """A refused request: HTTP ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def create_app(scorer, settings: ServeSettings = ServeSettings(), token: str | None = None) -> FastAPI:
    """The service for ``scorer`` (a ``RewardScorer``); with ``token``, ``/score`` and ``/metrics`` need
    ``Authorization: Bearer <token>``. The micro-batcher starts and stops with the app's lifespan; on shutdown
    the queued requests are finished first."""
    batcher = MicroBatcher(scorer, settings.max_batch, settings.max_wait_ms / 1000.0, settings.max_queue_images)
    responses: Counter = Counter()
    latency = {"seconds": 0.0, "count": 0}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="zreward reward service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        if request.url.path == "/score":
            responses[error.status] += 1
        return JSONResponse({"error": error.message}, error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse({"error": str(error.detail)}, error.status_code, headers=error.headers)

    @app.get("/health")
    async def health():
        status = 503 if batcher.closing else 200
        return JSONResponse({"status": "shutting down" if batcher.closing else "ok",
                             "queued_images": batcher.queued_images, "max_batch": batcher.max_batch}, status)

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return PlainTextResponse(_prometheus(batcher, responses, latency))

    @app.post("/score")
    async def score(request: Request):
        started = time.perf_counter()
        authorize(request)
        try:
            body = await _read_body(request, settings.max_request_bytes)
        except ClientDisconnect:
            responses["client_gone"] += 1
            return Response(status_code=CLIENT_GONE)
        job = await run_in_threadpool(_parse_job, body, scorer, settings)
        try:
            future = batcher.submit(job)
        except QueueFull as error:
            raise ApiError(503, f"{error}; retry later", {"Retry-After": "1"}) from None
        except ShuttingDown as error:
            raise ApiError(503, str(error), {"Retry-After": "1"}) from None
        records = await _result_unless_gone(request, asyncio.wrap_future(future))
        if records is None:
            responses["client_gone"] += 1
            return Response(status_code=CLIENT_GONE)
        responses[200] += 1
        latency["seconds"] += time.perf_counter() - started
        latency["count"] += 1
        # A JSONResponse goes out as is; a returned dict would first be walked by FastAPI's jsonable_encoder.
        return JSONResponse({"results": [{"image": i, "prompt": p, **r}
                                         for i, (p, r) in enumerate(zip(job.prompts, records))]})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        responses[500] += 1
        return JSONResponse({"error": f"scoring failed: {type(error).__name__}: {error}"}, 500)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"request body of {length} bytes is above the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is above the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _result_unless_gone(request: Request, waiter: asyncio.Future):
    """The job's records, or None when the client disconnects first (the job is then cancelled)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not waiter.done():
        waiter.cancel()  # the batcher skips it unless its forward has started
        return None
    return waiter.result()


def _parse_job(body: bytes, scorer, settings: ServeSettings) -> Job:
    """The validated ``Job`` of a request body; every problem is a 400 (or 413) naming the field."""
    try:
        request = ScoreRequest.model_validate_json(body)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5])
        raise ApiError(400, f"invalid request: {problems}") from None
    if len(request.prompts) != len(request.images):
        raise ApiError(400, f"prompts must hold one prompt per image: got {len(request.prompts)} prompts for "
                            f"{len(request.images)} images")
    if len(request.images) > settings.max_request_images:
        raise ApiError(413, f"{len(request.images)} images in one request, above the limit of "
                            f"{settings.max_request_images}")
    default = settings.scoring
    # The default weights belong to the default dimensions: a request naming either brings its own.
    custom = request.dimensions is not None or request.weights is not None
    try:
        scoring = Scoring(tuple(request.dimensions or default.dimensions), request.aggregation or default.aggregation,
                          request.weights if custom else default.weights)
    except ValueError as error:
        raise ApiError(400, str(error)) from None
    images = []
    for i, text in enumerate(request.images):
        try:
            image = decode_image(text, settings.max_image_pixels, f"images[{i}]")
            check_image(to_float_chw(image), scorer, f"images[{i}]")
        except ImageTooLarge as error:
            raise ApiError(413, str(error)) from None
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        images.append(image)
    return Job(images, request.prompts, scoring)


def _prometheus(batcher: MicroBatcher, responses: Counter, latency: dict) -> str:
    stats = batcher.stats
    lines = ["# TYPE zreward_requests_total counter"]
    lines += [f'zreward_requests_total{{code="{code}"}} {n}' for code, n in sorted(responses.items(), key=str)]
    for name, kind, value in [
        ("zreward_images_scored_total", "counter", stats["images"]),
        ("zreward_batches_total", "counter", stats["batches"]),
        ("zreward_failed_batches_total", "counter", stats["failed_batches"]),
        ("zreward_forward_seconds_total", "counter", stats["forward_seconds"]),
        ("zreward_cancelled_requests_total", "counter", stats["cancelled"]),
        ("zreward_queue_full_total", "counter", stats["queue_full"]),
        ("zreward_largest_batch_images", "gauge", stats["largest_batch"]),
        ("zreward_queued_images", "gauge", batcher.queued_images),
    ]:
        lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# TYPE zreward_request_seconds summary", f"zreward_request_seconds_sum {latency['seconds']}",
              f"zreward_request_seconds_count {latency['count']}"]
    return "\n".join(lines) + "\n"
