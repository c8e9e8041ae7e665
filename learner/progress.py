"""Progress lines of the learner's step records (shared by the trainer's log and the Ray driver)."""

from __future__ import annotations


def format_step(record: dict[str, object]) -> str:
    """One progress line for a step's log record."""
    return (
        f"step {record['step']} loss={record['loss']:.4f} kl={record.get('kl_mean', 0.0):.4g} "
        f"reward={record['reward_total']:.3f} acc={record['accuracy']:.3f} "
        f"reduction={record['reduction_ratio']:.3f} grad_norm={record['grad_norm']:.3g} "
        f"version={record['policy_version']} step_s={record['step_seconds']:.2f}"
    )
