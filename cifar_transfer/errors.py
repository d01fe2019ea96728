"""Errors that say what is wrong and how to fix it, in one line.

`PermanentError` marks failures that retrying cannot fix (bad checksum, corrupt
archive, invalid configuration): task retry conditions stop on them at once.
So do a local file's own errors (missing, forbidden, a link loop, a read-only or
full disk), HTTP client errors and programming errors: retrying would fail the
same way, only later. What remains (the network, throttling, a server's 5xx, a
flaky worker) counts as transient.
"""

import errno


class PermanentError(Exception):
    """A failure that no retry can fix; the message names the cause and the fix."""


class ConfigError(PermanentError, ValueError):
    """An option is out of range or names something that does not exist."""


class ChecksumMismatch(PermanentError):
    """The fetched archive is not the one the caller asked for."""


class SourceError(PermanentError):
    """The source is not what the pipeline reads: no images, a layout it does not know, a table without its columns."""


class ArchiveError(SourceError):
    """The archive is truncated, not a CIFAR archive, or holds unexpected data."""


class FetchDeadlineExceeded(PermanentError):
    """Fetching the archive took longer than its deadline: the same path would likely be as slow again."""


class SourceUnreachable(ConnectionError):
    """The network did not answer (retried: it may come back); the message says how to work offline."""


class StorageFull(PermanentError):
    """The storage has no space left; finished work stays, the rerun resumes."""


class StorageNotWritable(PermanentError):
    """The storage refuses writes (read-only, no permission) and the run has something to write."""


class FeatureSetError(PermanentError):
    """A feature set on storage is incomplete or belongs to another configuration."""


class OpConversionFailure(PermanentError):
    """OpenVINO's converter lacks an operation of the model (its `frontend.OpConversionFailure`, re-raised as this so
    callers need not import OpenVINO): one line with the fix; the converter's whole report is `report`."""

    def __init__(self, report: str):
        self.report = report
        super().__init__(f"OpenVINO cannot convert this model ({self.operations}): pass --engine tensorflow")

    def __reduce__(self):  # across processes (Dask, Ray, Prefect's results) with its report, not its one line
        return type(self), (self.report,)

    @property
    def operations(self) -> str:
        """What it lacks, in a few words: "operations ResizeBicubic", else the report's first line."""
        marker = "No conversion rule found for operations:"
        if marker in self.report:
            return "operations " + self.report.split(marker, 1)[1].splitlines()[0].strip()
        return (self.report.strip().splitlines() or ["no reason given"])[0]


class NewerFormatError(PermanentError):
    """A stored record was written by a newer cifar-transfer than this one (`records`): never read as unreadable, so
    nothing newer is overwritten."""


_RETRYABLE_HTTP_STATUS = {408, 425, 429}
# What a local file or folder itself answers: the same on every retry.
_LOCAL_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENAMETOOLONG,
        errno.EROFS,
        errno.EINVAL,
        errno.ENXIO,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.EBADF,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EXDEV,
    }
)
# Errors of the code or of the data, never of the moment.
_NEVER_TRANSIENT = (
    PermanentError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    AssertionError,
    RecursionError,
    MemoryError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying may help: the network, throttling, a server's error, or a failure nothing here explains.

    HTTP client errors (4xx: not found, forbidden) are permanent, except the few that mean "try later"; server
    errors (5xx) are transient. A connection or timeout error is transient; any other OSError about a local file
    (missing, forbidden, a link loop, a read-only or full disk) is not.
    """
    if isinstance(exc, _NEVER_TRANSIENT):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int) and 400 <= status < 500:
        return status in _RETRYABLE_HTTP_STATUS
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return not (isinstance(exc, OSError) and exc.errno in _LOCAL_ERRNOS)
