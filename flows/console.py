"""What the command line shows: one line per event on the console, a failure's reason as the very last line,
and everything (tracebacks, native notices) in a log file the failure line points to."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
from pathlib import Path

from cifar_transfer.errors import ConfigError
from cifar_transfer.flows import temporary_api  # first: it sets Prefect's server settings before Prefect is imported
from cifar_transfer.redact import printable


class _Printable(logging.Formatter):
    """Formats a record as `inner` does, each line redacted and with control characters escaped (a file name's
    `ESC[2J` is shown, not obeyed); without any traceback unless `tracebacks` (the log file keeps them)."""

    def __init__(self, inner: logging.Formatter, tracebacks: bool):
        super().__init__()
        self.inner = inner
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if not self.tracebacks:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return "\n".join(printable(line) for line in self.inner.format(record).split("\n"))


class _PrivateFileHandler(logging.FileHandler):
    """A log file opened without following a link planted at its name, readable by its owner only."""

    def _open(self):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.fdopen(os.open(self.baseFilename, flags, 0o600), "a", encoding=self.encoding)


def log_folder() -> Path:
    """This user's folder for log files, private (0700): created so, or refused when it is a link, another user's, or
    open to others (someone could plant links or read the logs there)."""
    folder = Path(tempfile.gettempdir()) / f"cifar-transfer-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    status = os.lstat(folder)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise ConfigError(
            f"the log folder {folder} is not a private folder of yours (a link, another user's, or open to others): "
            "remove it, or set TMPDIR to a folder only you can write to"
        )
    return folder


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

    log_file = log_folder() / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    to_file = _PrivateFileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(_Printable(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"), tracebacks=True))
    for logger in (logging.getLogger(), _DETAILS):  # one log file per command, also when commands run in one process
        for handler in [handler for handler in logger.handlers if isinstance(handler, logging.FileHandler)]:
            logger.removeHandler(handler)
            handler.close()
        logger.addHandler(to_file)
    logging.getLogger("cifar_transfer").setLevel(logging.DEBUG if verbose else logging.INFO)
    for console in _console_handlers():
        inner = console.formatter.inner if isinstance(console.formatter, _Printable) else console.formatter
        console.setFormatter(_Printable(inner or logging.Formatter(), tracebacks=verbose))
    return log_file


def record_failure(error: BaseException) -> None:
    """The whole traceback of a failed command, into the log file only."""
    _DETAILS.error("command failed", exc_info=error)


def record_detail(message: str, error: BaseException) -> None:
    """A failure the command goes on after, with its traceback, into the log file only."""
    _DETAILS.warning(message, exc_info=error)


def stop_prefect_quietly() -> None:
    """Send the last log lines to the API, then stop the ephemeral API this command started (never a server given by
    PREFECT_API_URL), so its goodbye cannot follow a failure's reason."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    announcer = logging.getLogger("prefect")
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    try:
        temporary_api.stop()
    finally:
        announcer.setLevel(level)
