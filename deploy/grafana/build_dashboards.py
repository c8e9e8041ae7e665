"""Generate the Grafana dashboards (JSON) from one readable panel list: `python deploy/grafana/build_dashboards.py`.

Every query names only metrics defined in services/telemetry/metrics.py; tests/integration/test_deploy.py
checks them against a live scrape of the running services.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "sf-prometheus"}


def quantile(q: float, metric: str, by: str = "") -> str:
    """PromQL for a histogram quantile over 5 minutes, optionally grouped."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum(rate({metric}_bucket[5m])) by ({group}))"


def mean_of(metric: str, by: str) -> str:
    """PromQL for a histogram's mean over 5 minutes, grouped."""
    return f"sum(rate({metric}_sum[5m])) by ({by}) / sum(rate({metric}_count[5m])) by ({by})"


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", width: int = 12) -> dict:
    """A time-series panel; targets are (PromQL, legend) pairs."""
    return {
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"w": width, "h": 8},
        "targets": [
            {"refId": chr(ord("A") + index), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
            for index, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(uid: str, title: str, panels: list[dict]) -> dict:
    """A dashboard with panels laid out two per row."""
    x = y = 0
    for panel_id, item in enumerate(panels, start=1):
        item["id"] = panel_id
        width = item["gridPos"]["w"]
        if x + width > 24:
            x, y = 0, y + 8
        item["gridPos"].update({"x": x, "y": y})
        x += width
    return {
        "uid": uid, "title": title, "tags": ["sparsity-forcing"], "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "panels": panels,
    }


THROUGHPUT = dashboard("sf-throughput", "Sparsity Forcing / Throughput", [
    panel("Rollouts per second", [("sum(rate(sf_rollouts_total[1m]))", "all"),
                                  ("sum(rate(sf_rollouts_total[1m])) by (budget)", "{{budget}}")], "ops"),
    panel("Generated tokens per second", [("sum(rate(sf_generated_tokens_total[1m]))", "tokens/s")], "ops"),
    panel("Learner steps per minute", [("sum(rate(sf_learner_steps_total[5m])) * 60", "steps/min")]),
    panel("Learner step time", [(quantile(0.5, "sf_learner_step_seconds"), "p50"),
                                (quantile(0.95, "sf_learner_step_seconds"), "p95")], "s"),
    panel("Queue depth (waiting + pending)", [("sf_queue_depth", "{{stream}}")]),
    panel("Queue pending (delivered, not acked)", [("sf_queue_pending", "{{stream}}"),
                                                   ("sum(rate(sf_queue_reclaimed_total[5m])) by (stream)",
                                                    "reclaimed/s {{stream}}")]),
    panel("Dead-lettered entries", [("sum(increase(sf_queue_dead_lettered_total[1h])) by (stream, reason)",
                                     "{{stream}}: {{reason}}")]),
    panel("Producer backpressure wait", [("sum(rate(sf_queue_backpressure_wait_seconds_total[5m])) by (stream)",
                                          "{{stream}}")], "s"),
    panel("Weight-sync latency", [(quantile(0.5, "sf_weight_sync_seconds"), "p50"),
                                  (quantile(0.99, "sf_weight_sync_seconds"), "p99"),
                                  ("sum(increase(sf_weight_sync_failures_total[1h])) by (reason)",
                                   "failures {{reason}}")], "s"),
    panel("Worker batch time by phase", [(quantile(0.5, "sf_rollout_batch_phase_seconds", "phase"),
                                          "p50 {{phase}}")], "s"),
    panel("Reward server", [("sum(rate(sf_reward_server_items_scored_total[1m]))", "items/s"),
                            ("sum(rate(sf_reward_server_requests_total[1m])) by (status)", "req/s {{status}}")],
          "ops"),
    panel("Reward server latency", [(quantile(0.5, "sf_reward_server_request_seconds"), "p50"),
                                    (quantile(0.99, "sf_reward_server_request_seconds"), "p99")], "s"),
])

SPARSITY = dashboard("sf-sparsity", "Sparsity Forcing / Sparsity", [
    panel("Reduction ratio by budget", [(mean_of("sf_reduction_ratio", "budget"), "{{budget}}")], "percentunit"),
    panel("Visual tokens kept (share)", [(("sum(rate(sf_visual_tokens_kept_total[5m])) / "
                                           "sum(rate(sf_visual_tokens_seen_total[5m]))"), "kept / seen")],
          "percentunit"),
    panel("Accuracy by budget", [("sf_accuracy", "{{budget}}")], "percentunit"),
    panel("Reward components", [(mean_of("sf_rollout_reward", "component"), "{{component}}")]),
    panel("KL to the reference (k3)", [("sf_kl", "KL")]),
    panel("Clip fraction and grad norm", [("sf_clip_fraction", "clip fraction"), ("sf_grad_norm", "grad norm")]),
    panel("Policy version", [("sf_policy_version", "{{service}} {{instance}}")]),
    panel("Policy version lag", [(quantile(0.5, "sf_policy_version_lag"), "p50"),
                                 (quantile(0.9, "sf_policy_version_lag"), "p90"),
                                 ("sum(rate(sf_stale_groups_dropped_total[5m]))", "stale groups dropped/s")]),
    panel("Learner loss parts", [("sf_learner_loss", "{{part}}")]),
    panel("Zero-variance groups", [("sum(rate(sf_zero_variance_groups_total[5m]))", "groups/s")]),
])


def main() -> None:
    """Write both dashboards into deploy/grafana/dashboards/."""
    OUT.mkdir(parents=True, exist_ok=True)
    for board in (THROUGHPUT, SPARSITY):
        path = OUT / f"{board['uid']}.json"
        path.write_text(json.dumps(board, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
