"""Task: the t-SNE map of a feature set; Cached while every file of the map is there."""

from __future__ import annotations

from prefect import task

from cifar_transfer import layout
from cifar_transfer.config import TsneSettings
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.caching import committed_files_key, output_key_fn, remember_output
from cifar_transfer.tasks.lineage import current_lineage
from cifar_transfer.tsne import TsneResult, tsne_map


def tsne_output_key(storage_url: str, folder: str, key: str, **_) -> str | None:
    return committed_files_key(Storage(storage_url), layout.tsne_files(folder, key).paths())


@task(name="tsne", cache_key_fn=output_key_fn(tsne_output_key, TsneResult))
def tsne_task(storage_url: str, folder: str, key: str, settings: TsneSettings, classes: list[str]) -> TsneResult:
    result = tsne_map(storage_url, folder, key, settings, classes, current_lineage())
    return remember_output(result, tsne_output_key(storage_url, folder, key))
