"""The reward server over real HTTP: a uvicorn subprocess on a free port, hit with httpx and RewardClient."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support import inflight, read_until_closed, stall_a_request, wait_until

from reward_server.client import RewardClient, RewardServerError
from services.schemas.models import AnswerType, ScoreItem

VALID_ITEMS = [
    {
        "completion_text": "The answer is (B) blue square.",
        "answer": "B",
        "answer_type": "choice",
        "choices": ["red circle", "blue square"],
        "visual_tokens_kept": 16,
        "visual_tokens_total": 64,
    },
    {
        "completion_text": "I count three.",
        "answer": "3",
        "answer_type": "number",
        "visual_tokens_kept": 64,
        "visual_tokens_total": 64,
    },
    {
        "completion_text": "No.",
        "answer": "yes",
        "answer_type": "yes_no",
        "visual_tokens_kept": 8,
        "visual_tokens_total": 64,
    },
    {
        "completion_text": "<answer>Red</answer>",
        "answer": "red",
        "answer_type": "exact",
        "visual_tokens_kept": 0,
        "visual_tokens_total": 10,
        "required_format": "^<answer>.*</answer>$",
    },
]


def post(
    server, payload: object = None, *, content: bytes | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST /v1/score with the server's token unless headers are given."""
    body = content if content is not None else json.dumps(payload).encode()
    return httpx.post(
        f"{server.url}/v1/score",
        content=body,
        timeout=10,
        headers={"Content-Type": "application/json", **(server.auth_headers if headers is None else headers)},
    )


def item(**changes: object) -> dict:
    return {**VALID_ITEMS[0], **changes}


def metric_value(server, line_prefix: str) -> float:
    """The value of the first /metrics sample line that starts with line_prefix (0 when absent)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_valid_batch_returns_every_component(reward_server) -> None:
    response = post(reward_server, {"items": VALID_ITEMS})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["correct"] for r in results] == [True, True, False, True]
    assert [r["parsed_answer"] for r in results] == ["B", "3", "no", "red"]
    assert [r["efficiency"] for r in results] == [0.75, 0.0, 0.875, 1.0]
    assert [r["format"] for r in results] == [0.0, 0.0, 0.0, 1.0]
    # defaults: accuracy_weight 1, lambda 0.5, mu 0; a wrong answer earns no efficiency reward
    assert [r["total"] for r in results] == [1.375, 1.0, 0.0, 1.5]
    assert all(set(r) >= {"correct", "accuracy", "efficiency", "format", "total"} for r in results)


def test_auth_is_required_and_enforced(reward_server) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {reward_server.token}"},
        {"Authorization": f"Bearer {reward_server.token}x"},
    ):
        response = post(reward_server, {"items": VALID_ITEMS}, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Authorization" in response.json()["detail"]
    # probes and metrics stay open for orchestrators and Prometheus
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{reward_server.url}{path}", timeout=10).status_code == 200


BAD_REQUESTS = [
    # (case id, body bytes, expected status, text the message must contain)
    ("malformed_json", b'{"items": [{"completion_text": "3",', 400, "body"),
    ("not_json_at_all", b"hello", 400, "not valid JSON"),
    ("non_utf8", b'{"items": [{"completion_text": "\xff\xfe"}]}', 400, "UTF-8"),
    (
        "wrong_type_int",
        json.dumps({"items": [item(visual_tokens_total="many")]}).encode(),
        422,
        "items.0.visual_tokens_total",
    ),
    (
        "wrong_type_enum",
        json.dumps({"items": [item(answer_type="essay")]}).encode(),
        422,
        "items.0.answer_type",
    ),
    ("wrong_type_items", json.dumps({"items": "all of them"}).encode(), 422, "items"),
    ("top_level_list", json.dumps([item()]).encode(), 422, "body"),
    ("missing_items", b"{}", 422, "items"),
    (
        "missing_field",
        json.dumps({"items": [{k: v for k, v in item().items() if k != "answer"}]}).encode(),
        422,
        "items.0.answer",
    ),
    ("empty_batch", json.dumps({"items": []}).encode(), 422, "items"),
    ("unknown_field", json.dumps({"items": [item(reward=1.0)]}).encode(), 422, "items.0.reward"),
    (
        "nan_kept",
        (
            b'{"items": [{"completion_text": "B", "answer": "B", "answer_type": "choice", '
            b'"choices": ["x", "y"], "visual_tokens_kept": NaN, "visual_tokens_total": 64}]}'
        ),
        422,
        "items.0.visual_tokens_kept",
    ),
    (
        "infinite_total",
        (
            b'{"items": [{"completion_text": "B", "answer": "B", "answer_type": "choice", "choices": '
            b'["x", "y"], "visual_tokens_kept": 1, "visual_tokens_total": Infinity}]}'
        ),
        422,
        "items.0.visual_tokens_total",
    ),
    (
        "float_count",
        json.dumps({"items": [item(visual_tokens_kept=1.5)]}).encode(),
        422,
        "items.0.visual_tokens_kept",
    ),
    (
        "kept_above_total",
        json.dumps({"items": [item(visual_tokens_kept=65)]}).encode(),
        422,
        "visual_tokens_kept=65",
    ),
    (
        "negative_kept",
        json.dumps({"items": [item(visual_tokens_kept=-1)]}).encode(),
        422,
        "items.0.visual_tokens_kept",
    ),
    (
        "zero_total",
        json.dumps({"items": [item(visual_tokens_kept=0, visual_tokens_total=0)]}).encode(),
        422,
        "items.0.visual_tokens_total",
    ),
    ("bad_reference", json.dumps({"items": [item(), item(answer="Q")]}).encode(), 422, "items.1.answer"),
    (
        "bad_number_reference",
        json.dumps({"items": [item(answer_type="number", answer="lots")]}).encode(),
        422,
        "items.0.answer",
    ),
    (
        "bad_format_regex",
        json.dumps({"items": [item(required_format="(unclosed")]}).encode(),
        422,
        "items.0.required_format",
    ),
    (
        "format_regex_unrolls_to_gigabytes",
        json.dumps({"items": [item(required_format="a{1000000000}")]}).encode(),
        422,
        "items.0.required_format",
    ),
    ("too_many_items", json.dumps({"items": [item()] * 101}).encode(), 413, "items"),
    ("future_schema", json.dumps({"schema_version": 99, "items": [item()]}).encode(), 422, "schema_version"),
]


@pytest.mark.parametrize(
    ("body", "status", "names"), [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_requests_get_a_4xx_that_names_the_field(
    reward_server, body: bytes, status: int, names: str
) -> None:
    response = post(reward_server, content=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert names in payload["detail"], payload
    assert payload["errors"], payload


def test_oversized_bodies_are_refused(reward_server) -> None:
    huge = json.dumps({"items": [item(completion_text="x" * 60_000)] * 5}).encode()  # > 256 KiB
    response = post(reward_server, content=huge)
    assert response.status_code == 413
    assert "body" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold on the streamed body too
        for start in range(0, len(huge), 65_536):
            yield huge[start : start + 65_536]

    streamed = httpx.post(
        f"{reward_server.url}/v1/score",
        content=chunks(),
        timeout=10,
        headers={**reward_server.auth_headers, "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413


def test_metrics_show_requests_items_components_and_errors(reward_server) -> None:
    before = metric_value(reward_server, "sf_reward_server_items_scored_total")
    assert post(reward_server, {"items": VALID_ITEMS}).status_code == 200
    assert post(reward_server, content=b"{").status_code == 400
    assert metric_value(reward_server, "sf_reward_server_items_scored_total") == before + len(VALID_ITEMS)
    assert metric_value(reward_server, 'sf_reward_server_requests_total{status="200"}') >= 1
    assert metric_value(reward_server, 'sf_reward_server_errors_total{kind="malformed_json"}') >= 1
    assert metric_value(reward_server, "sf_reward_server_request_seconds_count") >= 2
    for component in ("accuracy", "efficiency", "format", "total"):
        assert metric_value(reward_server, f'sf_reward_count{{component="{component}"}}') >= len(VALID_ITEMS)
    assert metric_value(reward_server, 'sf_reward_server_requests_total{status="500"}') == 0


def test_refuses_to_start_with_auth_on_and_no_token() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "reward_server", "--set", "reward_server.port=1"],
        cwd=Path(__file__).resolve().parents[2],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert "auth_token" in done.stderr and "auth_required" in done.stderr


def test_auth_can_be_switched_off_for_the_local_demo(start_reward_server: Callable) -> None:
    server = start_reward_server(auth=False)
    response = post(server, {"items": VALID_ITEMS}, headers={})
    assert response.status_code == 200, response.text


def _score_items() -> list[ScoreItem]:
    return [ScoreItem.model_validate(raw) for raw in VALID_ITEMS]


def test_client_scores_and_splits_batches_to_the_server_limit(reward_server) -> None:
    items = _score_items() * 63  # 252 items: three requests of at most 100

    async def run() -> tuple[list, int]:
        async with RewardClient(reward_server.client_settings()) as client:
            assert await client.ready()
            return await client.score(items), client.retries_made

    before = metric_value(reward_server, 'sf_reward_server_requests_total{status="200"}')
    results, retries = asyncio.run(run())
    assert len(results) == 252 and retries == 0
    assert [r.correct for r in results[:4]] == [True, True, False, True]
    assert metric_value(reward_server, 'sf_reward_server_requests_total{status="200"}') == before + 3


def test_client_does_not_retry_client_errors(reward_server) -> None:
    bad = [
        ScoreItem(
            completion_text="x",
            answer="Q",
            answer_type=AnswerType.CHOICE,
            choices=["a", "b"],
            visual_tokens_kept=1,
            visual_tokens_total=2,
        )
    ]

    async def run(settings) -> RewardClient:
        async with RewardClient(settings) as client:
            with pytest.raises(RewardServerError) as raised:
                await client.score(bad)
            assert raised.value.status in (401, 422)
            return client

    assert asyncio.run(run(reward_server.client_settings())).retries_made == 0
    wrong_token = reward_server.client_settings(auth_token="not-the-token")
    assert asyncio.run(run(wrong_token)).retries_made == 0


def test_client_retries_connection_errors_then_gives_up() -> None:
    from support import free_port

    from services.settings import RewardServerSettings

    settings = RewardServerSettings(
        url=f"http://127.0.0.1:{free_port()}", client_retries=2, client_backoff_s=0.01, client_timeout_s=2
    )

    async def run() -> int:
        async with RewardClient(settings) as client:
            assert not await client.ready()
            with pytest.raises(RewardServerError, match="after 3 attempts"):
                await client.score(_score_items())
            return client.retries_made

    assert asyncio.run(run()) == 2


def test_load_is_shed_with_retry_after_and_the_client_backs_off(start_reward_server: Callable) -> None:
    server = start_reward_server(max_inflight_requests=1, shed_retry_after_s=1)
    body = json.dumps({"items": VALID_ITEMS}).encode()
    stalled = stall_a_request(server, body)
    overloaded = 'sf_reward_server_errors_total{kind="overloaded"}'
    try:
        shed = post(server, {"items": VALID_ITEMS})
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert "in flight" in shed.json()["detail"]
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 503

        async def score_while_busy() -> tuple[int, int]:
            async with RewardClient(server.client_settings()) as client:
                task = asyncio.create_task(client.score(_score_items()))
                while metric_value(server, overloaded) < 2:  # the client's first try was shed
                    await asyncio.sleep(0.02)
                stalled.sendall(body[10:])  # the held request completes; the client's retry gets through
                results = await task
                return len(results), client.retries_made

        scored, retries = asyncio.run(score_while_busy())
        assert scored == len(VALID_ITEMS) and retries >= 1
        assert b"200 OK" in stalled.recv(65_536)
    finally:
        stalled.close()
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_slow_bodies_time_out_and_free_their_slot(start_reward_server: Callable) -> None:
    server = start_reward_server(max_inflight_requests=1, body_timeout_s=0.5)
    stalled = stall_a_request(server, json.dumps({"items": VALID_ITEMS}).encode())
    try:
        answer = read_until_closed(stalled)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"body_timeout" not in answer and b"not received within 0.5s" in answer
    finally:
        stalled.close()
    wait_until(lambda: inflight(server) == 0)
    assert post(server, {"items": VALID_ITEMS}).status_code == 200
    assert metric_value(server, 'sf_reward_server_errors_total{kind="body_timeout"}') == 1
