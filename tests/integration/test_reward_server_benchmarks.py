"""The reward server over real HTTP on the benchmark answer types: graded 'vqa' credit and 'relaxed' numbers."""

from __future__ import annotations

import httpx
import pytest

HUMANS = ["coca cola"] * 4 + ["coke"] * 3 + ["pepsi"] * 2 + ["Coca-Cola"]


def score(server, items: list[dict]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/score", json={"items": items}, headers=server.auth_headers, timeout=10)


def test_vqa_credit_is_fractional_and_scales_the_efficiency_reward(reward_server) -> None:
    base = {"answer": "coca cola", "answer_type": "vqa", "answers": HUMANS, "visual_tokens_kept": 16,
            "visual_tokens_total": 64}
    response = score(reward_server, [{**base, "completion_text": "Coke."}, {**base, "completion_text": "Coca-Cola"},
                                     {**base, "completion_text": "sprite"}])
    assert response.status_code == 200, response.text
    coke, full, wrong = response.json()["results"]
    # Defaults: accuracy_weight 1, efficiency_weight 0.5; reduction 0.75.
    assert (coke["correct"], coke["accuracy"], coke["parsed_answer"]) == (False, pytest.approx(0.9), "coke")
    assert coke["total"] == pytest.approx(0.9 + 0.5 * 0.75 * 0.9)
    assert (full["correct"], full["accuracy"], full["total"]) == (True, 1.0, pytest.approx(1.375))
    assert (wrong["accuracy"], wrong["total"]) == (0.0, 0.0)


def test_relaxed_numbers_within_five_percent(reward_server) -> None:
    base = {"answer": "23.5", "answer_type": "relaxed", "visual_tokens_kept": 64, "visual_tokens_total": 64}
    response = score(reward_server, [{**base, "completion_text": "24"}, {**base, "completion_text": "24.8"}])
    assert [result["correct"] for result in response.json()["results"]] == [True, False]


def test_vqa_without_answers_scores_the_reference_and_empty_answers_are_a_422(reward_server) -> None:
    base = {"completion_text": "Coke", "answer": "coke", "answer_type": "vqa", "visual_tokens_kept": 1,
            "visual_tokens_total": 2}
    response = score(reward_server, [base])
    assert response.status_code == 200 and response.json()["results"][0]["accuracy"] == 1.0
    response = score(reward_server, [{**base, "answers": ["the", "a"]}])  # nothing left once normalised
    assert response.status_code == 422 and "items.0.answers" in response.text
