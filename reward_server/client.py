"""Async client of the reward server (used by the rollout worker): timeouts, retries, backoff, Retry-After."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import TracebackType

import httpx
from pydantic import ValidationError
from typing_extensions import Self

from services.schemas.models import RewardBreakdown, ScoreItem, ScoreRequest, ScoreResponse
from services.settings.models import RewardServerSettings

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0
_log = logging.getLogger("reward_server.client")


class RewardServerError(RuntimeError):
    """The reward server refused a batch (4xx) or kept failing after every retry; `status` is the last one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None when absent or invalid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = now or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER_S)


def backoff_delay(
    attempt: int, base_s: float, cap_s: float, retry_after_s: float | None, rng: random.Random
) -> float:
    """Delay before retry number `attempt` (0-based): the server's Retry-After plus a little jitter when
    given, else full-jitter exponential backoff (AWS architecture blog, 2015) capped at cap_s."""
    if retry_after_s is not None:
        return retry_after_s + rng.uniform(0.0, base_s)
    return rng.uniform(0.0, min(cap_s, base_s * 2**attempt))


class RewardClient:
    """Scores rollouts over HTTP; splits batches to the server's limit and retries transient failures."""

    def __init__(self, settings: RewardServerSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.retries_made = 0
        self._rng = rng or random.Random()
        headers = {"Content-Type": "application/json"}
        if settings.auth_token is not None:
            headers["Authorization"] = f"Bearer {settings.auth_token.get_secret_value()}"
        self._http = httpx.AsyncClient(
            base_url=settings.url, headers=headers, timeout=httpx.Timeout(settings.client_timeout_s)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def ready(self) -> bool:
        """Whether the server answers /readyz with 200 (no retries)."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def score(self, items: Sequence[ScoreItem]) -> list[RewardBreakdown]:
        """One RewardBreakdown per item, in order; batches above max_batch_items go in several requests."""
        size = self.settings.max_batch_items
        results: list[RewardBreakdown] = []
        for start in range(0, len(items), size):
            chunk = list(items[start : start + size])
            response = await self._post_with_retries(ScoreRequest(items=chunk).model_dump_json().encode())
            if len(response.results) != len(chunk):
                raise RewardServerError(
                    f"server returned {len(response.results)} results for {len(chunk)} items"
                )
            results.extend(response.results)
        return results

    async def _post_with_retries(self, body: bytes) -> ScoreResponse:
        attempts = self.settings.client_retries + 1
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                response = await self._http.post("/v1/score", content=body)
            except httpx.TransportError as error:  # connect/read/write errors and timeouts
                failure, status = f"{type(error).__name__}: {error}", None
            else:
                if response.status_code == 200:
                    return self._decode(response)
                failure, status = f"HTTP {response.status_code}: {_detail(response)}", response.status_code
                if status not in RETRYABLE_STATUSES:
                    raise RewardServerError(f"reward server refused the batch: {failure}", status)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            if attempt + 1 == attempts:
                raise RewardServerError(f"reward server failed after {attempts} attempts: {failure}", status)
            delay = backoff_delay(
                attempt,
                self.settings.client_backoff_s,
                self.settings.client_backoff_cap_s,
                retry_after,
                self._rng,
            )
            self.retries_made += 1
            _log.warning(
                "retrying reward request",
                extra={"attempt": attempt + 1, "delay_s": round(delay, 3), "failure": failure},
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    @staticmethod
    def _decode(response: httpx.Response) -> ScoreResponse:
        try:
            return ScoreResponse.model_validate_json(response.content)
        except ValidationError as error:
            raise RewardServerError(f"reward server sent an invalid ScoreResponse: {error}", 200) from error


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))[:500]
    except (ValueError, AttributeError):
        return response.text[:500]
