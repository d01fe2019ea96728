"""What the command line shows: one line per event on the console, a failure's reason as the very last line,
and everything (tracebacks, native notices) in a log file the failure line points to."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

# Before Prefect reads its settings: no telemetry calls (offline they log an error at every start), and a first
# start of the ephemeral API on a fresh PREFECT_HOME migrates its database, which takes 2 cores longer than 20 s.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, leaving out any traceback (the log file keeps it)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        brief = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(brief)


def _console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    return [handler for handler in logging.getLogger().handlers if isinstance(handler, PrefectConsoleHandler)]


_DETAILS = logging.getLogger("cifar_transfer.cli.details")  # to the log file only
_DETAILS.propagate = False


def start_console(verbose: bool) -> Path:
    """Set up the console for a command (tracebacks only with `verbose`) and a full log file; returns its path."""
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging

    if not PROCESS_LOGGING_CONFIG:  # Prefect's console first: it leaves the root logger alone once a handler is there
        setup_logging()

    folder = Path(tempfile.gettempdir()) / "cifar-transfer"
    folder.mkdir(exist_ok=True)
    log_file = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for logger in (logging.getLogger(), _DETAILS):  # one log file per command, also when commands run in one process
        for handler in [handler for handler in logger.handlers if isinstance(handler, logging.FileHandler)]:
            logger.removeHandler(handler)
            handler.close()
        logger.addHandler(to_file)
    logging.getLogger("cifar_transfer").setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in _console_handlers():
        inner = handler.formatter.inner if isinstance(handler.formatter, _WithoutTraceback) else handler.formatter
        handler.setFormatter(inner if verbose else _WithoutTraceback(inner or logging.Formatter()))
    return log_file


def record_failure(error: BaseException) -> None:
    """The whole traceback of a failed command, into the log file only."""
    _DETAILS.error("command failed", exc_info=error)


def stop_prefect_quietly() -> None:
    """Send the last log lines to the API, then stop the ephemeral API this command started (never a server given by
    PREFECT_API_URL), so its goodbye cannot follow a failure's reason."""
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    APILogWorker.drain_all(timeout=5)
    if get_current_settings().api.url:
        return

    announcer = logging.getLogger("prefect")
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    try:
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    finally:
        announcer.setLevel(level)
