"""The reward server's HTTP edge: parse and check a batch, call the pure reward functions, return them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from reward_server.errors import ApiError, ErrorBody, FieldError, from_validation_error
from reward_server.gate import BearerAuthGate, InflightCounter, LoadSheddingGate
from reward_server.rewards import ItemError, score_items
from services.schemas.models import SCHEMA_VERSION, RewardBreakdown, ScoreItem, ScoreRequest, ScoreResponse
from services.settings.models import RewardServerSettings, RewardSettings
from services.telemetry.metrics import RewardServerMetrics, Telemetry

SCORE_PATH = "/v1/score"
COMPONENTS = ("accuracy", "efficiency", "format", "total")
_log = logging.getLogger("reward_server")

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Body is not UTF-8 or not JSON.",
        401: "Missing or wrong bearer token.",
        408: "The body took longer than reward_server.body_timeout_s to arrive.",
        413: "Body or batch too large.",
        422: "A field is missing, has the wrong type or an impossible value.",
        503: "Too many requests in flight, or scoring passed reward_server.score_deadline_s; retry after the "
        "Retry-After header's seconds.",
    }.items()
}


# Documents the scheme in the OpenAPI schema; BearerAuthGate checks the token, before the load-shedding gate.
BearerCredentials = Annotated[
    HTTPAuthorizationCredentials | None,
    Security(HTTPBearer(auto_error=False, description="Token from reward_server.auth_token.")),
]


class Health(BaseModel):
    """Liveness / readiness answer."""

    status: str
    inflight_requests: int = 0


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body; 413 past max_bytes (declared or streamed), 408 when slower than timeout_s."""
    # The timeout keeps slow (or slowloris) clients from holding in-flight slots indefinitely.
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(
            413,
            "body_too_large",
            f"body: {declared} bytes exceeds the limit of {max_bytes} bytes",
            [FieldError(field="body", message=f"larger than {max_bytes} bytes", kind="too_large")],
        )
    chunks, size = [], 0
    with anyio.move_on_after(timeout_s) as deadline:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(
                    413,
                    "body_too_large",
                    f"body: more than {max_bytes} bytes",
                    [FieldError(field="body", message=f"larger than {max_bytes} bytes", kind="too_large")],
                )
            chunks.append(chunk)
    if deadline.cancelled_caught:
        raise ApiError(
            408,
            "body_timeout",
            f"body: not received within {timeout_s}s ({size} bytes arrived)",
            [FieldError(field="body", message=f"slower than {timeout_s}s", kind="timeout")],
            headers={"Connection": "close"},
        )
    return b"".join(chunks)


def parse_score_request(body: bytes, max_items: int) -> ScoreRequest:
    """Validate the whole batch once with pydantic's JSON parser; raise ApiError naming the bad field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(
            400,
            "not_utf8",
            f"body: not valid UTF-8 (byte 0x{body[error.start]:02x} at offset {error.start})",
            [FieldError(field="body", message="not UTF-8", kind="not_utf8")],
        ) from error
    try:
        request = ScoreRequest.model_validate_json(text)
    except ValidationError as error:
        raise from_validation_error(error) from error
    if len(request.items) > max_items:
        raise ApiError(
            413,
            "batch_too_large",
            f"items: {len(request.items)} items exceeds max_batch_items={max_items}; split the batch",
            [FieldError(field="items", message="too many items", kind="too_long")],
        )
    return request


class ScoreDeadlineExceeded(TimeoutError):
    """Scoring a batch ran past its deadline; `scored` of `total` items were done."""

    def __init__(self, scored: int, total: int) -> None:
        super().__init__(f"score deadline passed after {scored} of {total} items")
        self.scored = scored
        self.total = total


def score_before(items: Sequence[ScoreItem], weights: RewardSettings, deadline: float) -> list[RewardBreakdown]:
    """score_items one item at a time, raising ScoreDeadlineExceeded once time.monotonic() passes deadline.
    A thread cannot be cancelled, so the work stops itself when its answer can no longer be sent: it overruns
    the deadline by at most one item (bounded by the format timeout and the completion length limit)."""
    results: list[RewardBreakdown] = []
    for index, item in enumerate(items):
        if time.monotonic() > deadline:
            raise ScoreDeadlineExceeded(index, len(items))
        try:
            results.extend(score_items((item,), weights))
        except ItemError as error:
            raise ItemError(index, error.field, error.message) from error
    return results


def score_body(body: bytes, max_items: int, metrics: RewardServerMetrics, weights: RewardSettings,
               deadline: float) -> bytes:
    """Parse, score and record one request body and return the response body; raise ApiError for a client
    error. CPU-bound from end to end (an 8 MiB body parses in ~10 ms, a batch of slow items scores in tens of
    seconds), so it runs in a worker thread: the event loop stays free for probes and other callers."""
    batch = parse_score_request(body, max_items)
    try:
        results = score_before(batch.items, weights, deadline)
    except ItemError as error:
        raise ApiError(
            422,
            "unscorable_item",
            str(error),
            [FieldError(field=f"items.{error.index}.{error.field}", message=error.message, kind="unscorable")],
        ) from error
    observe_rewards(metrics, results)
    return ScoreResponse.model_construct(results=results, schema_version=SCHEMA_VERSION).model_dump_json().encode()


def deadline_error(settings: RewardServerSettings, progress: str) -> ApiError:
    """503 + Retry-After for a request that could not be scored within score_deadline_s."""
    return ApiError(
        503,
        "score_deadline",
        f"scoring did not finish within the {settings.score_deadline_s}s deadline ({progress}); "
        f"retry after {settings.shed_retry_after_s}s, or send a smaller batch",
        headers={"Retry-After": str(settings.shed_retry_after_s)},
    )


def observe_rewards(metrics: RewardServerMetrics, results: list[RewardBreakdown]) -> None:
    """Count scored items and record each reward component in the sf_reward histogram."""
    metrics.items_scored.inc(len(results))
    histograms = [metrics.reward.labels(component) for component in COMPONENTS]
    accuracy, efficiency, format_, total = histograms
    for result in results:
        accuracy.observe(result.accuracy)
        efficiency.observe(result.efficiency)
        format_.observe(result.format)
        total.observe(result.total)


def _openapi_with_request_body(app: FastAPI, max_items: int) -> dict[str, Any]:
    """OpenAPI document with ScoreRequest as /v1/score's body: the handler parses the body itself."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        request_schema = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request_schema.pop("$defs", {}))
        request_schema["properties"]["items"]["maxItems"] = max_items
        components["ScoreRequest"] = request_schema
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: RewardServerSettings, telemetry: Telemetry) -> FastAPI:
    """Build the reward server app: /v1/score, /healthz, /readyz, /metrics."""
    metrics = telemetry.reward_server
    weights = settings.rewards
    inflight = InflightCounter(limit=settings.max_inflight_requests)
    # A bounded pool of our own: anyio's default limiter (40 threads) is shared with everything else.
    score_threads = anyio.CapacityLimiter(settings.score_threads)
    app = FastAPI(
        title="Sparsity Forcing reward server",
        version=str(SCHEMA_VERSION),
        description="Scores rollouts: correctness, visual-token savings and format, per component.",
    )
    app.add_middleware(
        LoadSheddingGate,
        path=SCORE_PATH,
        counter=inflight,
        retry_after_s=settings.shed_retry_after_s,
        metrics=metrics,
    )
    # Added last, so it runs first: a request without the token is refused before it can take a slot.
    app.add_middleware(BearerAuthGate, path=SCORE_PATH, settings=settings, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _refuse(_request: Request, error: ApiError) -> Response:
        metrics.errors.labels(error.kind).inc()
        return Response(
            error.body().model_dump_json(),
            status_code=error.status,
            headers=error.headers,
            media_type="application/json",
        )

    @app.exception_handler(Exception)
    async def _crash(_request: Request, error: Exception) -> Response:
        metrics.errors.labels("internal").inc()
        _log.exception("unhandled error while scoring", extra={"error": type(error).__name__})
        return JSONResponse({"detail": f"internal error: {type(error).__name__}", "errors": []}, 500)

    @app.post(
        SCORE_PATH,
        response_model=ScoreResponse,
        responses=_ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}},
            }
        },
    )
    async def score(request: Request, _credentials: BearerCredentials) -> Response:
        """Score a batch of rollouts; every result carries each reward component and the total."""
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        deadline = time.monotonic() + settings.score_deadline_s
        answer: bytes | ScoreDeadlineExceeded | None = None
        # Cancels the wait for a free thread; a started thread is waited for (it checks the deadline itself).
        with anyio.move_on_after(settings.score_deadline_s):
            try:
                answer = await anyio.to_thread.run_sync(
                    score_body, body, settings.max_batch_items, metrics, weights, deadline, limiter=score_threads
                )
            except ScoreDeadlineExceeded as error:
                answer = error
        if answer is None:
            raise deadline_error(settings, "no scoring thread came free")
        if isinstance(answer, ScoreDeadlineExceeded):
            raise deadline_error(settings, f"{answer.scored} of {answer.total} items scored") from answer
        return Response(answer, media_type="application/json")

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok", inflight_requests=inflight.current)

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    async def readyz() -> Response:
        """Readiness: 503 while the server sheds load, so balancers send work elsewhere."""
        ready = not inflight.saturated
        body = Health(status="ready" if ready else "saturated", inflight_requests=inflight.current)
        return Response(
            body.model_dump_json(), status_code=200 if ready else 503, media_type="application/json"
        )

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of this process's metrics."""
        return Response(telemetry.exposition(), media_type=CONTENT_TYPE_LATEST)

    # The handler reads the body itself (size limit, UTF-8 check), so the schema names its model explicitly.
    max_items = settings.max_batch_items
    app.openapi = lambda: _openapi_with_request_body(app, max_items)  # type: ignore[method-assign]
    return app
