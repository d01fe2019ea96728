"""Thin Prefect task wrappers around the `cifar_transfer` library: names, caching, retries, artifacts, events.

Installed as `cifar_transfer.tasks` (never as a top-level `tasks` that could shadow a user's own).
Importing it routes the library's log lines (logger `cifar_transfer`) into the Prefect run they
happen in, so they show in the UI beside the task's own, and opens object storage with the credentials
block a run names (`credentials`).
"""

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from cifar_transfer.tasks import credentials  # noqa: F401  (sets where storages get their fsspec options)


class _InsideRuns(logging.Filter):
    """Pass only records logged inside a flow or task run (outside one there is no run to attach them to)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _send_library_logs_to_runs() -> None:
    library = logging.getLogger("cifar_transfer")
    if not any(isinstance(handler, APILogHandler) for handler in library.handlers):
        handler = APILogHandler()
        handler.addFilter(_InsideRuns())
        library.addHandler(handler)
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)


_send_library_logs_to_runs()
