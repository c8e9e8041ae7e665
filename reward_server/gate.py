"""ASGI middleware in front of the scoring route: refuses callers without the token, sheds load beyond a bound,
and records request metrics."""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reward_server.errors import ApiError, FieldError
from services.settings.models import RewardServerSettings
from services.telemetry.metrics import RewardServerMetrics


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None;
    the same reading as FastAPI's HTTPBearer, which documents the scheme in the OpenAPI schema."""
    scheme, _, token = (authorization or "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def check_token(token: str | None, settings: RewardServerSettings) -> None:
    """Refuse with 401 unless auth is off or the bearer token matches (compared in constant time)."""
    if not settings.auth_required:
        return
    expected = settings.auth_token.get_secret_value().encode() if settings.auth_token else b""
    given = token.encode() if token is not None else b""
    if not expected or not hmac.compare_digest(given, expected):
        reason = "missing" if token is None else "wrong"
        raise ApiError(
            401,
            "unauthorized",
            f"Authorization: {reason} bearer token",
            [FieldError(field="Authorization", message=f"{reason} bearer token", kind=reason)],
            headers={"WWW-Authenticate": "Bearer"},
        )


async def send_json(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    """Answer a request directly from middleware, with a JSON body."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *[(name.lower().encode(), value.encode()) for name, value in headers.items()],
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BearerAuthGate:
    """Refuses requests to `path` that lack the bearer token before any other middleware or the body is read.
    It must sit outside LoadSheddingGate: a flood of unauthenticated requests then takes no in-flight slot and
    cannot shed the callers who hold the token."""

    def __init__(self, app: ASGIApp, path: str, settings: RewardServerSettings, metrics: RewardServerMetrics) -> None:
        self.app = app
        self.path = path
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or answer 401 without reading its body."""
        if scope["type"] == "http" and scope["path"] == self.path:
            try:
                check_token(bearer_token(Headers(scope=scope).get("authorization")), self.settings)
            except ApiError as refusal:
                self.metrics.errors.labels(refusal.kind).inc()
                self.metrics.requests.labels(str(refusal.status)).inc()
                await send_json(send, refusal.status, refusal.body().model_dump_json().encode(), refusal.headers)
                return
        await self.app(scope, receive, send)


@dataclass
class InflightCounter:
    """Requests to the gated route now being handled; shared by the gate and /readyz."""

    limit: int
    current: int = 0

    @property
    def saturated(self) -> bool:
        """Whether one more request would be shed."""
        return self.current >= self.limit


class LoadSheddingGate:
    """Answers 503 + Retry-After when `counter.limit` requests are in flight, so callers back off instead of
    piling up latency; times and counts every request to the gated path by status code."""

    def __init__(
        self,
        app: ASGIApp,
        path: str,
        counter: InflightCounter,
        retry_after_s: int,
        metrics: RewardServerMetrics,
    ) -> None:
        self.app = app
        self.path = path
        self.counter = counter
        self.retry_after_s = retry_after_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or shed it when the server is saturated."""
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if self.counter.saturated:
            await self._shed(send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before starting a response
        self.counter.current += 1
        self.metrics.inflight.inc()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.counter.current -= 1
            self.metrics.inflight.dec()
            self.metrics.request_seconds.observe(time.perf_counter() - started)
            self.metrics.requests.labels(str(status)).inc()

    async def _shed(self, send: Send) -> None:
        self.metrics.errors.labels("overloaded").inc()
        self.metrics.requests.labels("503").inc()
        detail = (
            f"server busy: {self.counter.current} requests in flight (limit {self.counter.limit}); "
            f"retry after {self.retry_after_s}s"
        )
        body = json.dumps({"detail": detail, "errors": []}).encode()
        await send_json(send, 503, body, {"Retry-After": str(self.retry_after_s)})
