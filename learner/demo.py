"""`make demo` / `python -m learner.demo`: the whole Sparsity Forcing loop on one machine, end to end.

Starts a password-protected redis-server, the reward server (bearer token on), one rollout worker on vLLM and
the learner (a Ray actor on a local Ray), all on free loopback ports, shows progress (a live table on a
terminal, one plain line per learner step and per evaluation chunk when stdout is a file or a pipe), and
writes runs/<run>/: settings.yaml, logs/, metrics.jsonl, checkpoints, weights (the last version with a
model card, README.md), report.md and PNG plots. Every process it started is stopped at the end, on
Ctrl-C and on failure. `--print-settings` prints the resolved settings and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from learner.model_card import final_weights_folder, run_weights_root, write_run_card
from learner.progress import (
    StepClock,
    format_duration,
    live_progress,
    parse_chunk_line,
    planned_steps,
    step_line,
)
from learner.report import read_step_records, write_report
from services.data.build import RL_ITEMS, MissingDataset, prepare_rl_split
from services.processes import Service, ServiceFailed, Supervisor, free_port, wait_until
from services.settings import Settings, add_settings_arguments, load_settings, settings_yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [REPO / "configs" / "default.yaml", REPO / "configs" / "demo.yaml"]
VIDEO_MODEL = "assets/tiny-qwen25vl-video"  # `make video-model` (learner/sft_video.py) builds it
# --family video: the moving-digit videos on the video base model; --set flags still win over these.
FAMILY_OVERRIDES = {
    "digits": [],
    "video": [f"rollout.model_path={VIDEO_MODEL}", f"learner.model_path={VIDEO_MODEL}",
              "learner.datasets=[assets/tasks/video/rl.jsonl]"],
}


def metric_sum(exposition: str, sample_name: str, labels: dict[str, str] | None = None) -> float | None:
    """Sum of a sample over the series whose labels include `labels`; None when absent."""
    total, found = 0.0, False
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total, found = total + sample.value, True
    return total if found else None


def scrape(port: int) -> str:
    """A service's /metrics text, or '' while it is not up."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""


def run_settings(args: argparse.Namespace, run_dir: Path, ports: dict[str, int]) -> Settings:
    """The run's settings: demo defaults, the user's files and --set flags, then this run's ports and folder."""
    placement = [
        f"redis.url=redis://127.0.0.1:{ports['redis']}/0",
        f"reward_server.port={ports['reward']}", "reward_server.host=127.0.0.1",
        f"reward_server.url=http://127.0.0.1:{ports['reward']}",
        f"learner.run_dir={run_dir}", "telemetry.metrics_host=127.0.0.1",
    ]
    family = FAMILY_OVERRIDES[getattr(args, "family", "digits")]
    return load_settings([*DEFAULT_CONFIGS, *args.config], [*family, *args.overrides, *placement])


def write_settings_file(settings: Settings, path: Path) -> None:
    """The resolved settings every service loads; secrets stay out (they travel in the environment)."""
    raw = settings.model_dump(mode="json")
    raw["redis"]["password"] = None
    raw["reward_server"]["auth_token"] = None
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def progress_table(records: list[dict[str, Any]], rollouts_per_s: float | None, worker_version: float | None,
                   max_steps: int | None, eta_s: float | None = None) -> Table:
    """The live view: the last steps of the learner and the worker's throughput."""
    table = Table(title=f"Sparsity Forcing demo — step {records[-1]['step'] if records else 0}/{max_steps or '?'}"
                        f" · {'?' if rollouts_per_s is None else f'{rollouts_per_s:.1f}'} rollouts/s"
                        f" · worker on weights v{int(worker_version or 0)}"
                        f" · eta {format_duration(eta_s)}")
    for column in ("step", "reward", "accuracy", "reduction", "KL", "version", "step s"):
        table.add_column(column, justify="right")
    for record in records[-8:]:
        table.add_row(str(record["step"]), f"{record['reward_total']:.3f}", f"{record['accuracy']:.3f}",
                      f"{record['reduction_ratio']:.3f}", f"{record.get('kl_mean', 0.0):.4f}",
                      str(record["policy_version"]), f"{record['step_seconds']:.2f}")
    return table


def start_stack(supervisor: Supervisor, settings_path: Path, settings: Settings, ports: dict[str, int],
                env: dict[str, str], run_dir: Path) -> dict[str, Service]:
    """Redis, reward server, rollout worker and learner, each waited for before the next depends on it."""
    py = sys.executable
    redis_dir = run_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    services = {"redis": supervisor.start("redis", [
        "redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--dir", str(redis_dir),
        "--requirepass", env["SF_REDIS__PASSWORD"], "--appendonly", "yes", "--save", ""], env)}
    wait_until(lambda: _port_open(ports["redis"]), 30, supervisor)
    services["reward"] = supervisor.start("reward_server", [py, "-m", "reward_server", "--config", str(settings_path)],
                                          env, REPO)
    wait_until(lambda: bool(scrape(ports["reward"])), 60, supervisor)
    services["worker"] = supervisor.start("rollout_worker", [
        py, "-m", "rollout_worker", "--config", str(settings_path), "--set",
        f"telemetry.metrics_port={ports['worker_metrics']}"], env, REPO)
    services["learner"] = supervisor.start("learner", [
        py, "-m", "learner.train", "--config", str(settings_path), "--set",
        f"telemetry.metrics_port={ports['learner_metrics']}"], env, REPO)
    return services


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class TrainingView:
    """The demo's view of training: a live table on a terminal, else one plain line per new learner step.

    rollouts/s is what the worker generates (its /metrics), the ETA comes from the steps' wall times.
    """

    def __init__(self, settings: Settings, console: Console) -> None:
        cfg = settings.learner
        self.total = planned_steps(cfg.max_steps, cfg.datasets, cfg.epochs, cfg.groups_per_step)
        self.clock = StepClock(self.total, settings.rollout.group_size)
        self.live = Live(console=console, refresh_per_second=2, transient=False) if console.is_terminal else None
        self.shown, self.eta = 0, None

    def update(self, records: list[dict[str, Any]], rollouts_per_s: float | None,
               worker_version: float | None) -> None:
        """Show the records that arrived since the last call."""
        for record in records[self.shown:]:
            _, self.eta = self.clock.update(record)
            if self.live is None:
                print(f"{step_line(record, self.total, rollouts_per_s, self.eta)} "
                      f"worker_version=v{int(worker_version or 0)}", flush=True)
        self.shown = len(records)
        if self.live is not None:
            self.live.update(progress_table(records, rollouts_per_s, worker_version, self.total, self.eta))

    def __enter__(self) -> Self:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.stop()


def follow_training(supervisor: Supervisor, services: dict[str, Service], run_dir: Path, settings: Settings,
                    ports: dict[str, int], console: Console) -> dict[str, Any]:
    """Show progress until the learner exits; returns what the summary needs."""
    learner = services["learner"]
    last_rollouts, last_time, version = 0.0, time.monotonic(), None
    rate: float | None = None  # the worker's rollouts/s, first measured after 5 s
    with TrainingView(settings, console) as view:
        while learner.process.poll() is None:
            supervisor.check_alive(expected_to_exit=(learner.name,))
            text = scrape(ports["worker_metrics"])
            rollouts = metric_sum(text, "sf_rollouts_total") or 0.0
            now = time.monotonic()
            if now - last_time >= 5:
                rate, last_rollouts, last_time = (rollouts - last_rollouts) / (now - last_time), rollouts, now
            version = metric_sum(text, "sf_policy_version", {"service": "rollout_worker"}) or version
            view.update(read_step_records(run_dir / "metrics.jsonl"), rate, version)
            time.sleep(1.0)
        view.update(read_step_records(run_dir / "metrics.jsonl"), rate, version)  # the steps of the last second
    if learner.process.returncode != 0:
        raise ServiceFailed(f"the learner exited with {learner.process.returncode}; its log ends:\n{learner.log_tail()}")
    text = scrape(ports["worker_metrics"])
    return {
        "worker_policy_version": metric_sum(text, "sf_policy_version", {"service": "rollout_worker"}),
        "rollouts_generated": metric_sum(text, "sf_rollouts_total"),
        "tokens_generated": metric_sum(text, "sf_generated_tokens_total"),
        "groups_published": metric_sum(text, "sf_queue_entries_put_total",
                                       {"stream": settings.queues.trajectories_stream}),
    }


def evaluation_markdown(evaluation: dict[str, Any]) -> str:
    """sf-eval's results as the report's plot and one table row per (model, budget)."""
    lines = [f"![accuracy against reduction](eval/{Path(evaluation['plot']).name})", "",
             "| model | budget | reduction | accuracy [95% CI] | prefill ms/req | KV entries/req |", "|---|---|---|---|---|---|"]
    for model in evaluation["models"]:
        for row in model["rows"]:
            low, high = row["accuracy_ci95"]
            lines.append(f"| {model['label']} | {row['budget']} | {row['reduction_mean']:.3f} | {row['accuracy']:.3f} "
                         f"[{low:.3f}, {high:.3f}] | {row['speed']['prefill_ms_per_request']:.1f} | "
                         f"{row['kv_entries_mean']:.1f} |")
    return "\n".join(lines)


def run_with_progress(command: list[str], env: dict[str, str], log_path: Path, console: Console) -> int:
    """Run a tool whose stdout is a pipe (so it prints progress.chunk_line lines), its whole output into
    log_path, its chunk lines as progress bars on a terminal or echoed as they are; returns its exit code."""
    bars = live_progress(console) if console.is_terminal else None
    tasks: dict[str, Any] = {}
    with log_path.open("w") as log, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        try:
            if bars is not None:
                bars.start()
            for line in process.stdout:
                log.write(line)
                chunk = parse_chunk_line(line)
                if chunk is None:
                    continue
                if bars is None:
                    print(f"eval {line.strip()}", flush=True)
                    continue
                label, done, total = chunk
                if label not in tasks:
                    tasks[label] = bars.add_task(f"eval {label}", total=total)
                bars.update(tasks[label], completed=done)
            return process.wait()
        except BaseException:
            process.terminate()  # Ctrl-C reaches the child by itself; SIGTERM to the demo does not
            raise
        finally:
            if bars is not None:
                bars.stop()


def evaluate_base_and_trained(settings: Settings, run_dir: Path, env: dict[str, str], limit: int,
                              console: Console) -> tuple[str, dict[str, Any] | None]:
    """Run sf-eval on the base and the last published weights, showing its progress; returns a markdown
    section ('' if skipped) and sf-eval's results (None unless it ran)."""
    weights = final_weights_folder(run_weights_root(settings))
    dataset = Path(settings.learner.datasets[0]).with_name("test.jsonl")
    if weights is None or not dataset.is_file():
        return "", None
    out = run_dir / "eval"
    command = [sys.executable, "-m", "learner.evaluate", "--model", str(settings.learner.model_path or
               settings.rollout.model_path), "--label", "base", "--model", str(weights), "--label", "trained",
               "--dataset", str(dataset), "--limit", str(limit), "--out", str(out),
               "--budgets", "r=1,r=0.5,r=0.25,r=0.125,tau=0.94,tau=0.975",
               # The run's own settings (completion cap, vLLM dtype, scorer), as make base-eval and the fidelity bench use.
               "--config", str(run_dir / "settings.yaml")]
    console.print(f"evaluating base and trained ({weights.name}) on {limit} items of {dataset}")
    returncode = run_with_progress(command, env, run_dir / "logs" / "eval.log", console)
    if returncode != 0:
        return f"Evaluation failed (exit {returncode}); see logs/eval.log.", None
    evaluation = json.loads((out / "eval.json").read_text())
    return evaluation_markdown(evaluation), evaluation


def prepare_datasets(settings: Settings, rl_items: int, console: Console) -> None:
    """The demo's preparation step: build each missing bundled RL split it trains on, saying what it writes.

    Any other missing dataset raises MissingDataset (naming what builds it) before a service starts.
    """
    for dataset in settings.learner.datasets:
        prepare_rl_split(dataset if dataset.is_absolute() else REPO / dataset, rl_items, say=console.print)


def _interrupt(*_: object) -> None:
    """SIGTERM handler: stop the demo the way Ctrl-C does, so every service is torn down."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit code 0 when the learner finished its steps and the report was written."""
    parser = argparse.ArgumentParser(prog="sf-demo", description=__doc__)
    add_settings_arguments(parser)
    parser.add_argument("--run-name", default=None, help="folder under the runs root (default: demo-<time>)")
    parser.add_argument("--runs-root", type=Path, default=REPO / "runs", help="where run folders go")
    parser.add_argument("--eval-limit", type=int, default=200, help="test items per model in the final evaluation")
    parser.add_argument("--no-eval", action="store_true", help="skip the base-vs-trained evaluation")
    parser.add_argument("--rl-items", type=int, default=RL_ITEMS,
                        help="items of a bundled RL split (assets/tasks/<family>/rl.jsonl) that the demo builds when missing")
    parser.add_argument("--family", choices=tuple(FAMILY_OVERRIDES), default="digits",
                        help="task family to train on: digit grids (images) or moving digits (videos, on the video "
                             "base model that `make video-model` builds)")
    args = parser.parse_args(argv)
    if args.family == "video" and not (REPO / VIDEO_MODEL / "config.json").is_file():
        print(f"demo failed: {VIDEO_MODEL} does not exist; build it with `make video-model`", file=sys.stderr)
        return 2
    if args.print_settings:  # this run's ports and folder are chosen when it starts
        overrides = [*FAMILY_OVERRIDES[args.family], *args.overrides]
        print(settings_yaml(load_settings([*DEFAULT_CONFIGS, *args.config], overrides)), end="")
        return 0
    console = Console(soft_wrap=True)  # without a terminal rich would cut lines at 80 columns
    run_dir = args.runs_root.resolve() / (args.run_name or time.strftime("demo-%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("redis", "reward", "worker_metrics", "learner_metrics")}
    settings = run_settings(args, run_dir, ports)
    settings_path = run_dir / "settings.yaml"
    write_settings_file(settings, settings_path)
    try:  # before the clock starts; the learner itself only reads its datasets
        prepare_datasets(settings, args.rl_items, console)
    except MissingDataset as error:
        console.print(f"[red]demo failed: {error}[/red]")
        return 2
    env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
    env.update({"SF_REDIS__PASSWORD": secrets.token_urlsafe(24),
                "SF_REWARD_SERVER__AUTH_TOKEN": secrets.token_urlsafe(24), "PYTHONUNBUFFERED": "1"})
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "started_at": time.time()}
    console.print(f"[bold]Sparsity Forcing demo[/bold] → {run_dir} (logs in {run_dir / 'logs'})")
    try:
        with Supervisor(run_dir / "logs") as supervisor:
            services = start_stack(supervisor, settings_path, settings, ports, env, run_dir)
            console.print("services up: redis, reward server, rollout worker (vLLM starting), learner")
            summary |= follow_training(supervisor, services, run_dir, settings, ports, console)
        summary["training_minutes"] = round((time.monotonic() - started) / 60, 2)
        summary["training_finished_at"] = time.time()
        evaluation, results = ("", None) if args.no_eval else evaluate_base_and_trained(
            settings, run_dir, env, args.eval_limit, console)
        card = write_run_card(settings, results)  # sf-train wrote it without sf-eval's table
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every service was stopped[/yellow]")
        write_report(run_dir, summary | {"status": "interrupted"})
        return 130
    except (ServiceFailed, TimeoutError) as error:
        console.print(f"[red]demo failed: {error}[/red]")
        write_report(run_dir, summary | {"status": f"failed: {str(error).splitlines()[0]}"})
        return 1
    records = read_step_records(run_dir / "metrics.jsonl")
    summary |= {"status": "finished", "learner_steps": len(records)}
    report = write_report(run_dir, summary, evaluation)
    console.print(f"[green]done[/green]: {len(records)} learner steps in {summary['training_minutes']} min; "
                  f"report {report}; model card {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
