"""The HTTP reward service (FastAPI on uvicorn) behind ``zreward serve``.

``POST /score`` takes JSON, never a pickle::

    {"images": ["<base64 PNG or JPEG>", ...], "prompts": ["...", ...],
     "dimensions": ["realism", ...], "aggregation": "min", "weights": [...]}    (the last three optional)

and answers ``{"results": [{"image": i, "prompt": ..., "dimensions": {...}, "reward": ..., "aggregation": ...}]}``,
one entry per image in request order, each shaped as a ``zreward score`` line (``zreward.deploy.engine``).
Every refused request gets a JSON ``{"error": message}``: 400 malformed JSON, fields or images, 401 a missing
or wrong bearer token, 413 a body above ``max_request_bytes``, more than ``max_request_images`` images, an image
above ``max_image_pixels`` or a prompt above ``max_prompt_tokens`` tokens, 503 (with ``Retry-After``) a full
queue or a service shutting down. All of it is checked before a request is queued. ``GET /health`` reports
readiness, ``GET /metrics`` Prometheus text counters (refusals and dropped work by reason), ``GET /openapi.json``
the OpenAPI schema of all of it (the models below), from which clients in any language can be generated.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import math
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from zreward.deploy.batcher import Job, MicroBatcher, QueueFull, ShuttingDown
from zreward.deploy.engine import Scoring, check_image, context_length
from zreward.deploy.images import ImageTooLarge, decode_image, to_float_chw
from zreward.deploy.serve import PROMPT_TOKENS_CAP
from zreward.refl.aggregation import AGGREGATORS
from zreward.scoring.image_processing import target_size
from zreward.scoring.rubric import DIMENSIONS, chat_prompt

CLIENT_GONE = 499  # logged for a request whose client disconnected; nobody receives it
# Why a request was refused: the ``reason`` label of zreward_refused_requests_total (400, 401, 413 x 4, 503 x 2).
REFUSAL_REASONS = ("invalid_request", "unauthorized", "body_too_large", "too_many_images", "image_too_large",
                   "prompt_too_long", "queue_full", "shutting_down")


@dataclass(frozen=True)
class ServeSettings:
    """Batching and limits of the service (the ``zreward serve`` options)."""

    max_batch: int = 16                     # images per forward pass
    max_wait_ms: float = 10.0               # how long the oldest request waits for a batch to fill
    max_queue_images: int = 64              # queued images beyond which requests get 503
    max_request_images: int = 64
    max_request_bytes: int = 64 * 2**20
    max_image_pixels: int = 2048 * 2048
    max_prompt_tokens: int | None = None    # None: from the model's context, at most PROMPT_TOKENS_CAP
    scoring: Scoring = Scoring()            # dimensions and aggregation when a request names none

    def __post_init__(self):
        for name in ("max_request_images", "max_request_bytes", "max_image_pixels", "max_prompt_tokens"):
            value = getattr(self, name)
            if name == "max_prompt_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_queue_images < self.max_request_images:
            # Else a request of max_request_images could never be queued and would get 503 forever.
            raise ValueError(f"max_queue_images ({self.max_queue_images}) must be at least max_request_images "
                             f"({self.max_request_images})")


def prompt_token_limit(scorer, settings: ServeSettings) -> int:
    """The longest prompt, in tokens of the scorer's tokenizer, that the service accepts.

    The room a prompt has is the model's context (:func:`~zreward.deploy.engine.context_length`) less the longest
    rubric prompt around it and the image tokens of the largest square image ``max_image_pixels`` admits.
    ``settings.max_prompt_tokens`` must fit in it; None gives the room, at most ``PROMPT_TOKENS_CAP``.
    """
    tokenizer, processor = scorer.tokenizer, scorer.image_processor
    rubric = max(len(tokenizer.encode(chat_prompt(tokenizer, "", d), add_special_tokens=False)) for d in DIMENSIONS)
    side = math.isqrt(settings.max_image_pixels)
    height, width = target_size(side, side, processor)
    image = height * width // (processor.patch_size * processor.merge_size) ** 2
    context = context_length(scorer)
    room = context - rubric - image
    if room < 1:
        raise ValueError(f"the model's context of {context} tokens leaves no room for a prompt after the rubric "
                         f"({rubric} tokens) and an image of max_image_pixels ({image} tokens): lower "
                         "max_image_pixels")
    if settings.max_prompt_tokens is None:
        return min(PROMPT_TOKENS_CAP, room)
    if settings.max_prompt_tokens > room:
        raise ValueError(f"max_prompt_tokens ({settings.max_prompt_tokens}) is above the {room} tokens the model's "
                         f"context of {context} leaves after the rubric ({rubric}) and the largest image ({image})")
    return settings.max_prompt_tokens


# -- the request and response models (the OpenAPI schema is generated from them) -----------------------------
class ScoreRequest(BaseModel):
    """Images to score, one prompt per image; the scoring options default to the service's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    images: list[str] = Field(min_length=1, description="Base64 PNG or JPEG images, each optionally as a data URL "
                                                        "(data:image/png;base64,...)")
    prompts: list[str] = Field(min_length=1, description="The prompt each image was generated from, one per image")
    dimensions: list[str] | None = Field(None, description=f"Distinct rubric dimensions out of {list(DIMENSIONS)} "
                                                           "(default: the service's)")
    aggregation: str | None = Field(None, description="How the dimensions' expected scores make one reward, one "
                                                      f"of {sorted(AGGREGATORS)} (default: the service's)")
    weights: list[float] | None = Field(None, description="One non-negative weight per dimension, positive sum")


class DimensionScore(BaseModel):
    probs: list[float] = Field(description="Probability of each score bin, lowest score first")
    mean: float = Field(description="Expected score over the bins")
    std: float = Field(description="Standard deviation of the score distribution")


class ScoreResult(BaseModel):
    image: int = Field(description="Index of the image in the request")
    prompt: str
    dimensions: dict[str, DimensionScore] = Field(description="One score distribution per requested dimension")
    reward: float = Field(description="The aggregation of the dimensions' expected scores")
    aggregation: str


class ScoreResponse(BaseModel):
    results: list[ScoreResult] = Field(description="One result per image, in request order")


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, naming the field, image or prompt and the limit")


class HealthResponse(BaseModel):
    status: Literal["ok", "shutting down"]
    queued_images: int = Field(description="Images waiting for a forward pass")
    max_batch: int = Field(description="Images per forward pass")


def _errors(**descriptions: str) -> dict:
    """OpenAPI ``responses`` entries of JSON errors (``ErrorResponse``), given as ``e400="what"`` by status."""
    responses = {int(key[1:]): {"description": text, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}} for key, text in descriptions.items()}
    if 503 in responses:
        responses[503]["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying",
                                                     "schema": {"type": "integer"}}}
    return responses


class ApiError(Exception):
    """A refused request: HTTP ``status`` with ``{"error": message}``; ``reason`` labels the refusal in /metrics
    (one of ``REFUSAL_REASONS``; None for errors that are not refusals)."""

    def __init__(self, status: int, message: str, headers: dict | None = None, reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.reason = status, message, headers, reason


def create_app(scorer, settings: ServeSettings = ServeSettings(), token: str | None = None) -> FastAPI:
    """The service for ``scorer`` (a ``RewardScorer``); with ``token``, ``/score`` and ``/metrics`` need
    ``Authorization: Bearer <token>``. The micro-batcher starts and stops with the app's lifespan; on shutdown
    the queued requests are finished first. ``max_prompt_tokens`` is resolved here (:func:`prompt_token_limit`);
    ``app.state.settings`` holds the settings in force."""
    settings = dataclasses.replace(settings, max_prompt_tokens=prompt_token_limit(scorer, settings))
    batcher = MicroBatcher(scorer, settings.max_batch, settings.max_wait_ms / 1000.0, settings.max_queue_images)
    responses: Counter = Counter()
    refused: Counter = Counter()
    latency = {"seconds": 0.0, "count": 0}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)

    # /openapi.json needs no token, as /health: it holds no model output, no data and no secret (the same for
    # every service of this version), and client generators fetch it without credentials. No /docs page: it
    # would load its scripts from a CDN.
    app = FastAPI(title="zreward reward service", version=_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json",
                  description="Score images with a Z-Reward student: per-dimension score distributions and a reward.")
    app.state.batcher, app.state.settings = batcher, settings

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}, "unauthorized")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        if request.url.path == "/score":
            responses[error.status] += 1
            if error.reason is not None:
                refused[error.reason] += 1
        return JSONResponse({"error": error.message}, error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse({"error": str(error.detail)}, error.status_code, headers=error.headers)

    @app.get("/health", response_model=HealthResponse, operation_id="health",
             responses={503: {"model": HealthResponse, "description": "The service is shutting down"}})
    async def health():
        """Readiness: 200 while requests are taken, 503 once the service shuts down. No token needed."""
        status = 503 if batcher.closing else 200
        return JSONResponse({"status": "shutting down" if batcher.closing else "ok",
                             "queued_images": batcher.queued_images, "max_batch": batcher.max_batch}, status)

    @app.get("/metrics", response_class=PlainTextResponse, operation_id="metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"},
                        **_errors(e401="Missing or wrong bearer token")})
    async def metrics(request: Request):
        """Prometheus counters: requests by status, refusals and dropped images by reason, batches, latency."""
        authorize(request)
        return PlainTextResponse(_prometheus(batcher, responses, refused, latency))

    @app.post("/score", response_model=ScoreResponse, operation_id="score", openapi_extra={"requestBody": {
                  "required": True, "content": {"application/json": {"schema": {
                      "$ref": "#/components/schemas/ScoreRequest"}}}}},
              responses=_errors(
                  e400="Malformed JSON, fields or images",
                  e401="Missing or wrong bearer token",
                  e413="Body, image count, an image's pixels or a prompt's tokens above the service's limit",
                  e500="The forward pass failed",
                  e503="Queue full or shutting down; retry after Retry-After seconds"))
    async def score(request: Request):
        """Score distributions per image and dimension, and each image's reward, in request order."""
        started = time.perf_counter()
        authorize(request)
        try:
            body = await _read_body(request, settings.max_request_bytes)
        except ClientDisconnect:
            responses["client_gone"] += 1
            return Response(status_code=CLIENT_GONE)
        job = await run_in_threadpool(_parse_job, body, scorer, settings)
        try:
            batcher.submit(job)
        except QueueFull as error:
            raise ApiError(503, f"{error}; retry later", {"Retry-After": "1"}, "queue_full") from None
        except ShuttingDown as error:
            raise ApiError(503, str(error), {"Retry-After": "1"}, "shutting_down") from None
        records = await _result_unless_gone(request, job)
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

    def openapi() -> dict:
        """FastAPI's schema plus the models the routes refer to by hand (the request body is parsed by hand, so
        that the body limit holds while it is read) and, with a token, the bearer scheme where it is needed."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for model in (ScoreRequest, ErrorResponse):
                schema["components"]["schemas"][model.__name__] = model.model_json_schema(
                    ref_template="#/components/schemas/{model}")
            if token is not None:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path in ("/score", "/metrics"):
                    for operation in schema["paths"][path].values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("zreward")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"request body of {length} bytes is above the limit of {limit}", reason="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is above the limit of {limit} bytes", reason="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _result_unless_gone(request: Request, job: Job):
    """The job's records, or None when the client disconnects first: the job is then cancelled, and its images
    not yet scored never are."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    waiter = asyncio.wrap_future(job.future)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not waiter.done():
        job.future.cancel()
        return None
    return waiter.result()


def _parse_job(body: bytes, scorer, settings: ServeSettings) -> Job:
    """The validated ``Job`` of a request body; every problem is a 400 (or 413) naming the field."""
    try:
        request = ScoreRequest.model_validate_json(body)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5])
        raise ApiError(400, f"invalid request: {problems}", reason="invalid_request") from None
    if len(request.prompts) != len(request.images):
        raise ApiError(400, f"prompts must hold one prompt per image: got {len(request.prompts)} prompts for "
                            f"{len(request.images)} images", reason="invalid_request")
    if len(request.images) > settings.max_request_images:
        raise ApiError(413, f"{len(request.images)} images in one request, above the limit of "
                            f"{settings.max_request_images}", reason="too_many_images")
    lengths = scorer.tokenizer(request.prompts, add_special_tokens=False)["input_ids"]
    for i, tokens in enumerate(lengths):
        if len(tokens) > settings.max_prompt_tokens:
            raise ApiError(413, f"prompts[{i}] is {len(tokens)} tokens long, above the limit of "
                                f"{settings.max_prompt_tokens} tokens", reason="prompt_too_long")
    default = settings.scoring
    # The default weights belong to the default dimensions: a request naming either brings its own.
    custom = request.dimensions is not None or request.weights is not None
    try:
        scoring = Scoring(tuple(request.dimensions or default.dimensions), request.aggregation or default.aggregation,
                          request.weights if custom else default.weights)
    except ValueError as error:
        raise ApiError(400, str(error), reason="invalid_request") from None
    images = []
    for i, text in enumerate(request.images):
        try:
            image = decode_image(text, settings.max_image_pixels, f"images[{i}]")
            check_image(to_float_chw(image), scorer, f"images[{i}]")
        except ImageTooLarge as error:
            raise ApiError(413, str(error), reason="image_too_large") from None
        except ValueError as error:
            raise ApiError(400, str(error), reason="invalid_request") from None
        images.append(image)
    return Job(images, request.prompts, scoring)


def _prometheus(batcher: MicroBatcher, responses: Counter, refused: Counter, latency: dict) -> str:
    stats = batcher.stats
    lines = ["# TYPE zreward_requests_total counter"]
    lines += [f'zreward_requests_total{{code="{code}"}} {n}' for code, n in sorted(responses.items(), key=str)]
    lines += ["# TYPE zreward_refused_requests_total counter"]
    lines += [f'zreward_refused_requests_total{{reason="{reason}"}} {refused[reason]}' for reason in REFUSAL_REASONS]
    lines += ["# TYPE zreward_dropped_images_total counter"]
    lines += [f'zreward_dropped_images_total{{reason="{reason}"}} {stats["dropped_images"][reason]}'
              for reason in ("client_gone", "request_failed")]
    for name, kind, value in [
        ("zreward_images_scored_total", "counter", stats["images"]),
        ("zreward_discarded_images_total", "counter", stats["discarded_images"]),
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
