"""Errors that say what is wrong and how to fix it, in one line.

`PermanentError` marks failures that retrying cannot fix (bad checksum, corrupt
archive, invalid configuration): task retry conditions stop on them at once.
Everything else (network hiccups, a flaky worker) counts as transient.
"""


class PermanentError(Exception):
    """A failure that no retry can fix; the message names the cause and the fix."""


class ConfigError(PermanentError, ValueError):
    """An option is out of range or names something that does not exist."""


class ChecksumMismatch(PermanentError):
    """The fetched archive is not the one the caller asked for."""


class ArchiveError(PermanentError):
    """The archive is truncated, not a CIFAR-10 archive, or holds unexpected data."""


class FetchDeadlineExceeded(PermanentError):
    """Fetching the archive took longer than its deadline: the same path would likely be as slow again."""


class SourceUnreachable(ConnectionError):
    """The network did not answer (retried: it may come back); the message says how to work offline."""


class StorageFull(PermanentError):
    """The storage has no space left; finished work stays, the rerun resumes."""


class FeatureSetError(PermanentError):
    """A feature set on storage is incomplete or belongs to another configuration."""


_RETRYABLE_HTTP_STATUS = {408, 425, 429}


def is_transient(exc: BaseException) -> bool:
    """True when retrying may help: anything that is not a known permanent failure.

    HTTP client errors (4xx: not found, forbidden) are permanent, except the
    few that mean "try later"; server errors (5xx) are transient.
    """
    if isinstance(exc, (PermanentError, FileNotFoundError, PermissionError)):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in _RETRYABLE_HTTP_STATUS)
