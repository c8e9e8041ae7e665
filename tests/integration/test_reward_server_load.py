"""The reward server under hostile load, over real HTTP: scoring never stalls the event loop, a batch that
scores too long is cut at the deadline, and requests without the token take no in-flight slot.

Every request loop here is bounded in count and in time, and talks to a loopback server only.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from support import MAX_BATCH_ITEMS, MAX_BODY_BYTES, heavy_body, inflight, stall_a_request, wait_until

SMALL_BATCH = {
    "items": [
        {
            "completion_text": "The answer is (B) blue square.",
            "answer": "B",
            "answer_type": "choice",
            "choices": ["red circle", "blue square"],
            "visual_tokens_kept": 16,
            "visual_tokens_total": 64,
        }
    ]
}


def post(server, body: bytes, timeout_s: float, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/score",
        content=body,
        timeout=timeout_s,
        headers={"Content-Type": "application/json", **(server.auth_headers if headers is None else headers)},
    )


def metric_value(server, line_prefix: str) -> float:
    """The value of the first /metrics sample line that starts with line_prefix (0 when absent)."""
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class RequestLoop(threading.Thread):
    """Sends one body again and again (at most max_requests times) until stopped; records status and latency."""

    def __init__(self, send: Callable[[], httpx.Response], max_requests: int, pause_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.send, self.max_requests, self.pause_s = send, max_requests, pause_s
        self.stop = threading.Event()
        self.results: list[tuple[int, float]] = []  # (status, seconds); status 0 = no answer in time

    def run(self) -> None:
        while not self.stop.is_set() and len(self.results) < self.max_requests:
            started = time.perf_counter()
            try:
                status = self.send().status_code
            except httpx.TimeoutException:
                status = 0
            self.results.append((status, time.perf_counter() - started))
            self.stop.wait(self.pause_s)


PROBES = 200
PROBE_GAP_S = 0.03
PROBE_TIMEOUT_S = 2.0  # a probe this late fails the test already; waiting longer would only slow it down


@pytest.mark.heavy  # a load test: ~10 s of the heaviest batches
def test_healthz_answers_fast_while_the_heaviest_batches_are_scored(start_reward_server: Callable) -> None:
    # Format timeout above the default so the heavy item's ~10 ms regex stays far from it on a busy machine:
    # a regex refused at item 0 would end the batch early and hide the load this test exists to make.
    server = start_reward_server(
        max_batch_items=MAX_BATCH_ITEMS, max_body_bytes=MAX_BODY_BYTES, **{"rewards.format_timeout_s": 0.25}
    )
    body = heavy_body()
    small = json.dumps(SMALL_BATCH).encode()
    heavy = RequestLoop(lambda: post(server, body, timeout_s=60), max_requests=20)
    light = RequestLoop(lambda: post(server, small, timeout_s=30), max_requests=200, pause_s=0.05)
    probe_seconds: list[float] = []
    heavy.start()
    light.start()
    try:
        with httpx.Client(base_url=server.url, timeout=PROBE_TIMEOUT_S) as prober:
            assert prober.get("/healthz").status_code == 200  # opens the probe's keep-alive connection
            time.sleep(0.5)  # the first heavy body is uploaded and being scored
            for _ in range(PROBES):
                started = time.perf_counter()
                try:
                    assert prober.get("/healthz").status_code == 200
                except httpx.TimeoutException:
                    probe_seconds.append(PROBE_TIMEOUT_S)
                    break
                probe_seconds.append(time.perf_counter() - started)
                time.sleep(PROBE_GAP_S)
    finally:
        heavy.stop.set()
        light.stop.set()
        heavy.join(timeout=90)
        light.join(timeout=60)

    worst = sorted(probe_seconds)[-5:]
    assert percentile(probe_seconds, 0.99) < 0.1, f"/healthz p99 over {len(probe_seconds)} probes; worst {worst}"
    # The load was real: heavy batches were scored or cut at the deadline, never refused for another reason.
    heavy_statuses = {status for status, _seconds in heavy.results}
    assert heavy.results and heavy_statuses <= {200, 503}, heavy.results
    light_statuses = [status for status, _seconds in light.results]
    assert len(light_statuses) >= 10 and set(light_statuses) == {200}, light_statuses


def test_a_batch_past_the_score_deadline_gets_503_and_frees_its_worker(start_reward_server: Callable) -> None:
    server = start_reward_server(
        max_batch_items=MAX_BATCH_ITEMS,
        max_body_bytes=MAX_BODY_BYTES,
        score_deadline_s=0.5,
        score_threads=1,  # the small batch below needs the very thread the heavy one held
        shed_retry_after_s=2,
        **{"rewards.format_timeout_s": 0.25},
    )
    # ~250 heavy items take seconds to score, far past the 0.5 s deadline.
    response = post(server, heavy_body(items=250, max_bytes=2 * 1024 * 1024), timeout_s=60)
    assert response.status_code == 503, response.text[:300]
    assert response.headers["retry-after"] == "2"
    assert "deadline" in response.json()["detail"]
    assert metric_value(server, 'sf_reward_server_errors_total{kind="score_deadline"}') == 1
    # The thread stopped at the deadline: had it gone on scoring, this batch would find no free thread
    # within its own 0.5 s and get a 503 as well.
    assert post(server, json.dumps(SMALL_BATCH).encode(), timeout_s=30).status_code == 200
    wait_until(lambda: inflight(server) == 0)


def test_unauthenticated_requests_get_401_and_take_no_inflight_slot(start_reward_server: Callable) -> None:
    server = start_reward_server(max_inflight_requests=1)
    small = json.dumps(SMALL_BATCH).encode()
    stalled = stall_a_request(server, small)  # holds the only slot
    overloaded = 'sf_reward_server_errors_total{kind="overloaded"}'
    try:
        shed_before = metric_value(server, overloaded)
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {server.token}"}):
            for _ in range(10):
                response = post(server, small, timeout_s=10, headers=headers)
                assert response.status_code == 401, (headers, response.status_code, response.text[:200])
                assert response.headers["www-authenticate"] == "Bearer"
                assert "Authorization" in response.json()["detail"]
        assert metric_value(server, overloaded) == shed_before  # refused for the token, not for load
        assert metric_value(server, 'sf_reward_server_errors_total{kind="unauthorized"}') == 30
        assert inflight(server) == 1
        # A caller with the token is still shed while the slot is held: the gate itself is unchanged.
        assert post(server, small, timeout_s=10).status_code == 503
        stalled.sendall(small[10:])
        stalled.settimeout(10)
        assert stalled.recv(65_536).startswith(b"HTTP/1.1 200")
    finally:
        stalled.close()
    wait_until(lambda: inflight(server) == 0)
    assert post(server, small, timeout_s=10).status_code == 200
