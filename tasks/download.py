"""Fetch the CIFAR-10 archive into storage, verified, exactly once.

The archive streams from its source (the official URL, a local path or any
fsspec URL) into storage while its MD5 is computed, and is committed into
`raw/` only after the checksum passes (see `Storage.open_atomic`). A later run that finds a verified copy
does nothing. Network errors are transient (the task retries them with
backoff); a checksum mismatch or a missing source is permanent.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Iterator

import fsspec
import httpx
from prefect import task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from tasks.errors import ArchiveError, ChecksumMismatch, retry_on_transient
from tasks.logs import logger
from tasks.storage import Storage, file_md5

CHUNK_SIZE = 4 << 20


class ArchiveInfo(BaseModel):
    path: str
    md5: str
    bytes: int


def archive_name(source: str) -> str:
    return posixpath.basename(source.rstrip("/").split("?", 1)[0]) or "cifar-10-python.tar.gz"


def source_chunks(source: str) -> Iterator[bytes]:
    """The bytes of `source` in chunks: HTTP(S) streamed with httpx, anything else through fsspec."""
    if source.startswith(("http://", "https://")):
        with httpx.stream("GET", source, follow_redirects=True, timeout=httpx.Timeout(60.0)) as response:
            if response.status_code in (404, 410):
                raise ArchiveError(f"source {source!r} does not exist (HTTP {response.status_code}): check --source")
            response.raise_for_status()
            yield from response.iter_bytes(CHUNK_SIZE)
        return
    try:
        with fsspec.open(source, "rb") as stream:
            while chunk := stream.read(CHUNK_SIZE):
                yield chunk
    except FileNotFoundError:
        raise ArchiveError(f"source {source!r} does not exist: check --source") from None


def fetch_archive(source: str, expected_md5: str | None, storage_url: str) -> ArchiveInfo:
    """Return the verified archive in storage, fetching it only when it is not there yet (one fetcher at a time)."""
    storage = Storage(storage_url)
    destination = storage.path("raw", archive_name(source))
    if expected_md5 is None:
        logger().warning("MD5 check DISABLED for %s (--md5 none): the archive is used as it is", source)
    with storage.claim(destination):
        return stored_archive(storage, destination, source, expected_md5) or _fetch(storage, destination, source, expected_md5)


def stored_archive(storage: Storage, destination: str, source: str, expected_md5: str | None) -> ArchiveInfo | None:
    """The archive already in storage if it is the one asked for, else None."""
    if not storage.exists(destination):
        return None
    found_md5 = file_md5(destination, storage.fs)
    record_path = destination + ".source.json"
    recorded = json.loads(storage.read_bytes(record_path)) if storage.exists(record_path) else {}
    if found_md5 == expected_md5 or (expected_md5 is None and recorded.get("source") == source):
        logger().info("archive already in storage and verified: %s (md5 %s)", storage.uri(destination), found_md5)
        return ArchiveInfo(path=destination, md5=found_md5, bytes=storage.fs.size(destination))
    logger().warning("archive in storage has md5 %s, not the one asked for: fetching %s again", found_md5, source)
    return None


def _fetch(storage: Storage, destination: str, source: str, expected_md5: str | None) -> ArchiveInfo:
    """Stream `source` into storage, committed under `destination` only when its MD5 checks out."""
    digest = hashlib.md5()
    size = 0
    started = time.perf_counter()
    with storage.open_atomic(destination) as out:
        for chunk in source_chunks(source):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        found_md5 = digest.hexdigest()
        if expected_md5 is not None and found_md5 != expected_md5:
            raise ChecksumMismatch(
                f"archive from {source} has MD5 {found_md5}, expected {expected_md5}: "
                f"check --source, or pass --md5 {found_md5} if you trust this file"
            )
    for leftover in storage.stale_temp_files(destination):
        storage.fs.rm(leftover)
    storage.write_atomic(destination + ".source.json", json.dumps({"source": source, "md5": found_md5, "bytes": size}).encode())
    elapsed = max(time.perf_counter() - started, 1e-9)
    logger().info("fetched %s: %.1f MB in %.1f s (%.1f MB/s), md5 %s", source, size / 1e6, elapsed, size / 1e6 / elapsed, found_md5)
    return ArchiveInfo(path=destination, md5=found_md5, bytes=size)


@task(
    name="download",
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
)
def fetch_archive_task(source: str, expected_md5: str | None, storage_url: str) -> ArchiveInfo:
    return fetch_archive(source, expected_md5, storage_url)
