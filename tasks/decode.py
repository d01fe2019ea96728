"""Task: decode the archive into arrays once; Cached while every decoded file is there."""

from __future__ import annotations

from prefect import task

from cifar_transfer import layout
from cifar_transfer.dataset import DatasetInfo, dataset_id, decode_archive, resolved_format
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.caching import committed_files_key, output_key_fn, remember_output


def dataset_output_key(storage_url: str, archive_path: str, archive_md5: str, archive_format: str, label_mode: str | None) -> str | None:
    storage = Storage(storage_url)
    archive_format, label_mode = resolved_format(storage, archive_path, archive_format, label_mode)
    return committed_files_key(storage, layout.dataset_files(storage, dataset_id(archive_md5, archive_format, label_mode)).paths())


@task(name="decode-archive", cache_key_fn=output_key_fn(dataset_output_key, DatasetInfo))
def decode_archive_task(storage_url: str, archive_path: str, archive_md5: str, archive_format: str, label_mode: str | None) -> DatasetInfo:
    info = decode_archive(storage_url, archive_path, archive_md5, archive_format, label_mode)
    return remember_output(info, dataset_output_key(storage_url, archive_path, archive_md5, archive_format, label_mode))
