"""Task: fetch the archive into storage, verified; network errors retried with backoff."""

from __future__ import annotations

from prefect import task

from cifar_transfer.download import ArchiveInfo, fetch_archive
from cifar_transfer.tasks.retries import transient_retries


@task(name="download", **transient_retries(4, backoff_factor=1))
def fetch_archive_task(source: str, expected_md5: str | None, storage_url: str) -> ArchiveInfo:
    return fetch_archive(source, expected_md5, storage_url)
