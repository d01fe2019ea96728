"""Fetch the CIFAR-10 archive into storage, verified, exactly once, within a size cap and a deadline.

The archive streams from its source (the official URL, a local path or any
fsspec URL) into storage while its MD5 is computed, and is committed into
`raw/` only after the checksum passes (see `Storage.open_atomic`). A later run that finds a verified copy
does nothing. Network errors are transient (the task retries them with
backoff); a checksum mismatch, a missing source, a source larger than the cap
or a fetch past its deadline is permanent.

The source may be a signed URL or carry credentials when this module is called
directly (the config refuses them), so it is redacted wherever it is shown or
stored: logs, error messages, the `raw/*.source.json` record.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import time
from collections.abc import Generator, Iterator
from contextlib import closing

import fsspec
import httpx
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.claims import claim
from cifar_transfer.errors import ArchiveError, ChecksumMismatch, FetchDeadlineExceeded, SourceUnreachable
from cifar_transfer.redact import redact
from cifar_transfer.storage import Storage, file_md5

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 << 20
READ_TIMEOUT_SECONDS = 60.0
# The official archive is 170,498,071 bytes: the cap leaves room for any repack, yet stops a wrong or endless source.
MAX_ARCHIVE_BYTES = 1 << 30
# Each read may wait READ_TIMEOUT_SECONDS, but a server trickling a byte a second never hits that: the whole fetch has a deadline.
FETCH_DEADLINE_SECONDS = 30 * 60.0


class _RedactedUrls(logging.Filter):
    """httpx logs every request's full URL at INFO, a signed URL's signature included: redact it first."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


logging.getLogger("httpx").addFilter(_RedactedUrls())


class ArchiveInfo(BaseModel):
    path: str
    md5: str
    bytes: int


def archive_name(source: str) -> str:
    """The file name in `source`'s path, or the official name when the URL has no path (never its host or userinfo)."""
    path = source.split("?", 1)[0].rstrip("/")
    name = posixpath.basename(path)
    return name if name and not re.search(r"://[^/]*$", path) else "cifar-10-python.tar.gz"


def source_chunks(source: str, max_bytes: int = MAX_ARCHIVE_BYTES) -> Generator[bytes, None, None]:
    """The bytes of `source` in chunks: HTTP(S) streamed with httpx, anything else through fsspec.

    HTTP chunks are whatever each network read returns (up to 64 KiB), not a fixed size, so even a trickle
    yields chunks and the caller can check its deadline between them. Errors from httpx or fsspec quoting
    the source are redacted.
    """
    try:
        if source.startswith(("http://", "https://")):
            yield from _http_chunks(source, max_bytes)
            return
        with fsspec.open(source, "rb") as stream:
            while chunk := stream.read(CHUNK_SIZE):
                yield chunk
    except FileNotFoundError:
        raise ArchiveError(f"source {redact(source)!r} does not exist: check --source") from None
    except httpx.TransportError as exc:  # no route, DNS, refused, timed out: name the URL and the offline way
        _redact_error(exc)
        raise SourceUnreachable(
            f"cannot reach {redact(source)} ({type(exc).__name__}: {exc}): check the network, or run offline from a local "
            "copy: --source PATH --md5 HEX (and --weights FILE instead of the 'imagenet' download)"
        ) from exc
    except Exception as exc:
        _redact_error(exc)
        raise


def _http_chunks(source: str, max_bytes: int) -> Iterator[bytes]:
    with httpx.stream("GET", source, follow_redirects=True, timeout=httpx.Timeout(READ_TIMEOUT_SECONDS)) as response:
        if response.status_code in (404, 410):
            raise ArchiveError(f"source {redact(source)!r} does not exist (HTTP {response.status_code}): check --source")
        response.raise_for_status()
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > max_bytes:
            raise _too_large(source, max_bytes, int(announced))
        yield from response.iter_bytes()


def _redact_error(exc: BaseException | None) -> None:
    """Redact, in place, what an error and its causes quote of a URL: the type stays, so retry rules still apply."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in exc.args)
        if isinstance(exc, OSError):  # str() of an OSError shows these, not its args
            for name in ("filename", "filename2", "strerror"):
                if isinstance(getattr(exc, name), str):
                    setattr(exc, name, redact(getattr(exc, name)))
        exc = exc.__cause__ or exc.__context__


def _too_large(source: str, max_bytes: int, announced: int | None = None) -> ArchiveError:
    size = f" ({announced:,} bytes by its Content-Length)" if announced is not None else ""
    return ArchiveError(
        f"source {redact(source)}{size} is over the {max_bytes:,} byte cap (the CIFAR-10 archive is 170,498,071 bytes): "
        "check --source points at cifar-10-python.tar.gz"
    )


def fetch_archive(
    source: str,
    expected_md5: str | None,
    storage_url: str,
    max_bytes: int = MAX_ARCHIVE_BYTES,
    deadline_s: float = FETCH_DEADLINE_SECONDS,
) -> ArchiveInfo:
    """Return the verified archive in storage, fetching it only when it is not there yet (one fetcher at a time).

    A fetch past `max_bytes` or `deadline_s` fails at once with a permanent error and leaves nothing in storage.
    The deadline is permanent rather than retried: a fetch that used all of it has spent the time it was given,
    and the same path would likely be as slow again (five tries would take five deadlines). A server that sends
    nothing for READ_TIMEOUT_SECONDS is a stall, not slowness: that is transient and retried.
    """
    storage = Storage(storage_url)
    destination = layout.raw_archive(storage, archive_name(source))
    if expected_md5 is None:
        log.warning("MD5 check DISABLED for %s (--md5 none): the archive is used as it is", redact(source))
    found = stored_archive(storage, destination, source, expected_md5)  # no claim (no write) when it is there
    if found is not None:
        return found
    with claim(storage, destination):
        return stored_archive(storage, destination, source, expected_md5) or _fetch(
            storage, destination, source, expected_md5, max_bytes, deadline_s
        )


def stored_archive(storage: Storage, destination: str, source: str, expected_md5: str | None) -> ArchiveInfo | None:
    """The archive already in storage if it is the one asked for, else None.

    Records hold the redacted source, so sources compare redacted: a signed URL re-signed later is the same source.
    """
    if not storage.exists(destination):
        return None
    found_md5 = file_md5(destination, storage.fs)
    record_path = layout.source_record(destination)
    recorded = read_source_record(storage, record_path) if storage.exists(record_path) else {}
    if found_md5 == expected_md5 or (expected_md5 is None and redact(recorded.get("source", "")) == redact(source)):
        log.info("archive already in storage and verified: %s (md5 %s)", redact(storage.uri(destination)), found_md5)
        return ArchiveInfo(path=destination, md5=found_md5, bytes=storage.fs.size(destination))
    log.warning("archive in storage has md5 %s, not the one asked for: fetching %s again", found_md5, redact(source))
    return None


def read_source_record(storage: Storage, path: str) -> dict:
    """Where an archive in storage came from (redacted), its MD5 and size."""
    return records.SOURCE.read(storage.read_bytes(path), storage.uri(path))


def _fetch(storage: Storage, destination: str, source: str, expected_md5: str | None, max_bytes: int, deadline_s: float) -> ArchiveInfo:
    """Stream `source` into storage, committed under `destination` only when its MD5 checks out."""
    shown = redact(source)
    digest = hashlib.md5()
    size = 0
    started = time.monotonic()
    with storage.open_atomic(destination) as out, closing(source_chunks(source, max_bytes)) as chunks:
        for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(source, max_bytes)
            if time.monotonic() - started > deadline_s:
                raise FetchDeadlineExceeded(
                    f"fetching {shown} took longer than its {deadline_s:.0f} s deadline ({size / 1e6:.1f} MB received): "
                    "check the network and --source, or download the file yourself and pass its local path with --source PATH --md5 HEX"
                )
            digest.update(chunk)
            out.write(chunk)
        found_md5 = digest.hexdigest()
        if expected_md5 is not None and found_md5 != expected_md5:
            raise ChecksumMismatch(
                f"archive from {shown} has MD5 {found_md5}, expected {expected_md5}: "
                f"check --source, or pass --md5 {found_md5} if you trust this file"
            )
    for leftover in storage.stale_temp_files(destination):
        storage.fs.rm(leftover)
    storage.write_atomic(layout.source_record(destination), records.SOURCE.dump({"source": shown, "md5": found_md5, "bytes": size}))
    elapsed = max(time.monotonic() - started, 1e-9)
    log.info("fetched %s: %.1f MB in %.1f s (%.1f MB/s), md5 %s", shown, size / 1e6, elapsed, size / 1e6 / elapsed, found_md5)
    return ArchiveInfo(path=destination, md5=found_md5, bytes=size)
