"""Retry policy shared by the tasks: transient failures only, with backoff and jitter."""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from cifar_transfer.errors import is_transient


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry transient errors only, never permanent ones."""
    try:
        state.result()
    except Exception as exc:  # the state's own exception, re-raised by result()
        return is_transient(exc)
    return False


def transient_retries(count: int, backoff_factor: float) -> dict:
    """`@task` options: `count` retries of transient errors with exponential backoff and jitter."""
    return {
        "retries": count,
        "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_factor),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_on_transient,
    }
