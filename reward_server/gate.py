"""ASGI middleware in front of the scoring route: sheds load beyond a bound, and records request metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.telemetry.metrics import RewardServerMetrics


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
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.retry_after_s).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
