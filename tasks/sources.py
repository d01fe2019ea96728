"""Tasks: make a source ready for extraction, by its kind's own steps, each a task run of its own."""

from __future__ import annotations

from collections.abc import Callable

from cifar_transfer.collection import CollectionDataset
from cifar_transfer.config import PipelineConfig
from cifar_transfer.dataset import DatasetInfo
from cifar_transfer.tasks.collection import list_collection_task
from cifar_transfer.tasks.decode import decode_archive_task
from cifar_transfer.tasks.download import fetch_archive_task

# Every kind's `sources.kinds.SourceDataset`, as one type: flows validate their parameters against it.
PreparedSource = DatasetInfo | CollectionDataset


def _prepare_archive(config: PipelineConfig) -> DatasetInfo:
    archive = fetch_archive_task(config.source, config.expected_md5, config.storage)
    return decode_archive_task(config.storage, archive.path, archive.md5, config.archive_format, config.label_mode)


def _prepare_collection(config: PipelineConfig) -> CollectionDataset:
    return list_collection_task(config.collection_settings)


PREPARATIONS: dict[str, Callable[[PipelineConfig], PreparedSource]] = {"archive": _prepare_archive, "collection": _prepare_collection}


def prepare_source(config: PipelineConfig) -> PreparedSource:
    """The source of `config`, ready for extraction: an archive downloaded and decoded, a collection listed."""
    return PREPARATIONS[config.source_kind.name](config)
