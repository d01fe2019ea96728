"""Task: train the heads on a feature set and choose on validation; Cached while every file of the head is there."""

from __future__ import annotations

from prefect import task

from cifar_transfer import layout
from cifar_transfer.config import HeadSettings
from cifar_transfer.head import HeadResult, train_head
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.caching import committed_files_key, output_key_fn, remember_output


def head_output_key(storage_url: str, folder: str, key: str, **_) -> str | None:
    return committed_files_key(Storage(storage_url), layout.head_files(folder, key).paths())


@task(name="head", cache_key_fn=output_key_fn(head_output_key, HeadResult))
def train_head_task(storage_url: str, folder: str, key: str, settings: HeadSettings, classes: list[str]) -> HeadResult:
    result = train_head(storage_url, folder, key, settings, classes)
    return remember_output(result, head_output_key(storage_url, folder, key))
