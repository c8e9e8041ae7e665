"""`python -m learner.train --config ...`: run the GRPO learner, in a Ray actor or in this process.

Works the same locally and under `ray job submit --working-dir . -- python -m learner.train --config ...`:
`ray.init()` joins the cluster named by RAY_ADDRESS (which `ray job submit` sets for its entrypoint) and
starts a local one otherwise. The actor's stdout/stderr reach the driver, so `ray job logs` shows progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from learner.model_card import run_folder, write_run_card
from learner.progress import StepProgress, planned_steps
from services.model_folders import ModelFolderMissing, check_model_folder
from services.queues import InsecureRedisError, connect_redis
from services.settings import add_settings_arguments, settings_document, settings_from_args
from services.settings.models import Settings
from services.telemetry import Telemetry, configure_logging
from services.telemetry.trackers import TrackerUnavailable, check_trackers_installed, open_trackers

StepCallback = Callable[[dict[str, object]], None]


def build_parser() -> argparse.ArgumentParser:
    """The entrypoint's flags: --config/--set (and --print-settings), --resume and --no-ray."""
    parser = argparse.ArgumentParser(prog="sf-train", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--no-ray", action="store_true", help="train in this process (same as learner.use_ray=false)")
    return parser


def run_training(
    settings: Settings, resume: bool, on_step: Callable[[dict[str, object]], None] | None = None,
    rank: int = 0, world_size: int = 1,
) -> dict[str, object]:
    """Build the trainer, serve /metrics if configured, train, and return the run summary."""
    # Where the model loads (this process or a Ray actor), before seconds of torch imports.
    check_model_folder(settings.learner.model_path or settings.rollout.model_path)
    from transformers.utils import logging as transformers_logging

    from learner.trainer import Trainer  # torch/transformers load here, inside the actor, not in the driver

    transformers_logging.disable_progress_bar()  # one save_pretrained bar per publish would drown the step log
    log = configure_logging(settings.telemetry, "learner")
    telemetry = Telemetry("learner").define("queue", "learner", "weights")
    if settings.telemetry.metrics_port and rank == 0:
        port = telemetry.serve(settings.telemetry.metrics_host, settings.telemetry.metrics_port)
        log.info("serving metrics", extra={"port": port})
    trainer = Trainer(settings, resume=resume, telemetry=telemetry, on_step=on_step, rank=rank, world_size=world_size)
    log.info("learner started", extra={"run_dir": str(trainer.run_dir), "step": trainer.state.step,
                                       "policy_version": trainer.state.policy_version, "resume": resume})
    try:
        return trainer.run()
    finally:
        trainer.close()


@contextmanager
def step_reporting(settings: Settings, live: bool | None = None) -> Iterator[StepCallback]:
    """The on_step callback of a run: progress (a live bar on a terminal, one plain line per step otherwise)
    and the experiment trackers telemetry.trackers names; both closed when the run ends."""
    cfg = settings.learner
    total = planned_steps(cfg.max_steps, cfg.datasets, cfg.epochs, cfg.groups_per_step)
    progress = StepProgress(total, settings.rollout.group_size, live=live)
    try:
        with open_trackers(settings.telemetry, run_folder(settings), settings.run_name,
                           settings_document(settings)) as trackers:
            def on_step(record: dict[str, object]) -> None:
                progress(record)
                trackers(record)

            yield on_step
    finally:
        progress.close()


class TrainerActor:
    """The Ray actor around run_training (wrapped with ray.remote at launch, with the configured resources).

    It runs with max_concurrency=2, so the driver can ask for progress while `run` is busy.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def run(self, settings: Settings, resume: bool) -> dict[str, object]:
        """Train to the end inside the actor."""
        return run_training(settings, resume, on_step=self.records.append)

    def progress(self, since: int) -> list[dict[str, object]]:
        """Step records from index `since` on."""
        return self.records[since:]


def run_in_ray(settings: Settings, resume: bool, on_step: StepCallback, poll_s: float = 2.0) -> dict[str, object]:
    """Start the trainer actor on the cluster (or a local Ray), pass each step record to on_step here in the
    driver, return its summary.

    The driver reports each step itself: actor output is forwarded to the driver asynchronously and can
    miss the job log's tail when the driver exits, while the driver's own lines always land in it.
    """
    import ray

    ray.init(log_to_driver=True)
    try:
        actor_class = ray.remote(num_cpus=settings.learner.ray_num_cpus, num_gpus=settings.learner.ray_num_gpus,
                                 max_concurrency=2)(TrainerActor)
        actor = actor_class.options(name=f"learner-{settings.run_name}").remote()
        finished, printed = actor.run.remote(settings, resume), 0
        while True:
            done, _ = ray.wait([finished], timeout=poll_s)
            for record in ray.get(actor.progress.remote(printed)):
                on_step(record)
                printed += 1
            if done:
                return ray.get(finished)
    finally:
        ray.shutdown()


def train_worker(config: dict[str, object]) -> None:
    """One Ray Train worker: its rank of the sharded trainer (torch.distributed is set up by Ray Train; the
    trainer shards the policy over the ranks with FSDP2, learner.sharding)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    settings: Settings = config["settings"]
    if settings.learner.ray_num_gpus > 0:
        settings.learner.device = str(ray.train.torch.get_device())
    rank = context.get_world_rank()
    # Rank 0 reports the steps (plain lines: a worker's stdout is a log) and feeds the trackers.
    with step_reporting(settings, live=False) if rank == 0 else nullcontext(None) as on_step:
        summary = run_training(settings, bool(config["resume"]), on_step=on_step, rank=rank,
                               world_size=context.get_world_size())
    # Ray Train keeps only metrics that come with a checkpoint: rank 0 attaches a one-file one (the summary);
    # the model checkpoints themselves stay in the run dir, written by the trainer.
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            (Path(folder) / "summary.json").write_text(json.dumps(summary))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(summary, checkpoint=checkpoint)


def run_in_ray_train(settings: Settings, resume: bool) -> dict[str, object]:
    """Run learner.num_workers sharded trainer ranks as a Ray Train worker group; rank 0's summary."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(log_to_driver=True)
    try:
        cfg = settings.learner
        use_gpu = cfg.ray_num_gpus > 0
        resources = {"CPU": cfg.ray_num_cpus, **({"GPU": cfg.ray_num_gpus} if use_gpu else {})}
        run_dir = Path(cfg.run_dir or Path("runs") / settings.run_name).resolve()
        trainer = TorchTrainer(
            train_worker, train_loop_config={"settings": settings, "resume": resume},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name="ray_train", storage_path=str(run_dir)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return dict(result.metrics or {})
    finally:
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, load settings, train, write the model card; print the summary as JSON on the last line."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)  # exits here after printing them, with --print-settings
    if args.no_ray:
        settings.learner.use_ray = False
    configure_logging(settings.telemetry, "learner")
    try:
        check_trackers_installed(settings.telemetry.trackers)
        connect_redis(settings.redis).close()  # before any model loads: refuse an unauthenticated Redis now
    except (InsecureRedisError, TrackerUnavailable) as error:
        print(f"sf-train: refusing to start: {error}", file=sys.stderr)
        return 2
    if settings.learner.use_ray and settings.learner.num_workers > 1:
        summary = run_in_ray_train(settings, args.resume)  # rank 0 reports its steps (train_worker)
    else:
        with step_reporting(settings) as on_step:
            if settings.learner.use_ray:
                summary = run_in_ray(settings, args.resume, on_step)
            else:
                try:
                    summary = run_training(settings, args.resume, on_step=on_step)
                except ModelFolderMissing as error:
                    print(f"sf-train: cannot start: {error}", file=sys.stderr)
                    return 2
    write_run_card(settings)
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
