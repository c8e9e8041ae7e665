"""`sf-rollout-worker` / `python -m rollout_worker`: consume tasks, generate budgeted groups, publish them.

SIGTERM or SIGINT finishes the batch in flight (its tasks are acked after their groups are published),
then exits; a kill -9, or a stop while the reward server is down, leaves that batch's tasks pending, and a
restarted worker (or another one) takes them back.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys

from reward_server.client import RewardClient
from rollout_worker.weights import WeightWatcher
from rollout_worker.worker import RolloutWorker
from services.queues import InsecureRedisError, StreamQueue, connect_redis
from services.settings import Settings, SettingsError, add_settings_arguments, settings_from_args
from services.telemetry import Telemetry, configure_logging


def build_worker(settings: Settings, telemetry: Telemetry, cleanup: contextlib.ExitStack) -> RolloutWorker:
    """Wire the worker from settings: Redis queues, the vLLM engine, the reward client, the weight watcher.

    Each resource is registered on cleanup as it is opened (Redis sockets, vLLM's engine-core process, the
    watcher's private weight copies, the worker's event loop), so that a failure half-way releases the rest.
    """
    from rollout_worker.vllm_engine import VllmRolloutEngine

    worker_id = settings.rollout.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    client = cleanup.enter_context(contextlib.closing(connect_redis(settings.redis)))
    tasks = StreamQueue(client, settings.queues.tasks_stream, settings.queues, group="workers",
                        consumer=worker_id, metrics=telemetry.queue)
    trajectories = StreamQueue(client, settings.queues.trajectories_stream, settings.queues,
                               metrics=telemetry.queue)
    engine = VllmRolloutEngine(settings)
    cleanup.callback(engine.shutdown)
    # initial_folder: what the engine is rolled back to if its first reload fails part-way.
    watcher = WeightWatcher(client, settings.run_name, engine.load_weights, initial_folder=settings.rollout.model_path,
                            poll_s=settings.rollout.weights_poll_s, metrics=telemetry.weights,
                            load_verified=engine.load_verified if engine.loads_in_place else None)
    cleanup.callback(watcher.close)
    watcher.maybe_update(force=True)  # a restarted worker starts on the run's latest weights
    worker = RolloutWorker(
        settings=settings.rollout, budget_set=settings.sparsity.budgets, engine=engine,
        reward_client=RewardClient(settings.reward_server), tasks=tasks, trajectories=trajectories,
        worker_id=worker_id, watcher=watcher, metrics=telemetry.rollout,
    )
    cleanup.callback(worker.close)
    return worker


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="sf-rollout-worker", description=__doc__)
    add_settings_arguments(parser)
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many non-empty batches")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as error:
        print(f"sf-rollout-worker: {error}", file=sys.stderr)
        return 2
    log = configure_logging(settings.telemetry, "rollout_worker")
    telemetry = Telemetry("rollout_worker").define("queue", "rollout", "weights")
    if settings.telemetry.metrics_port:
        port = telemetry.serve(settings.telemetry.metrics_host, settings.telemetry.metrics_port)
        log.info("metrics", extra={"port": port})
    with contextlib.ExitStack() as cleanup:  # closes the worker, watcher, engine and Redis, in that order
        try:
            worker = build_worker(settings, telemetry, cleanup)
        except InsecureRedisError as error:
            print(f"sf-rollout-worker: refusing to start: {error}", file=sys.stderr)
            return 2
        batches = run(worker, args.max_batches, log)
    log.info("stopped", extra={"batches": batches})
    return 0


def run(worker: RolloutWorker, max_batches: int | None, log: logging.Logger) -> int:
    """Run batches until SIGTERM/SIGINT (or max_batches non-empty ones); returns how many ran."""
    stopping = worker.stopping
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    log.info("ready", extra={"worker": worker.worker_id, "version": worker.policy_version})
    batches = 0
    while not stopping.is_set() and (max_batches is None or batches < max_batches):
        report = worker.run_batch()
        if report.tasks or report.dead_lettered:
            batches += 1
            log.info("batch", extra={"tasks": report.tasks, "rollouts": report.rollouts,
                                     "published": report.groups_published, "dead": report.dead_lettered,
                                     "version": report.policy_version,
                                     "seconds": {k: round(v, 3) for k, v in report.phase_seconds.items()}})
    return batches


if __name__ == "__main__":
    sys.exit(main())
