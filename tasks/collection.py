"""Tasks: list a collection (names, labels, versions; no image is read), and watch it for changes."""

from __future__ import annotations

from prefect import task
from prefect.events import emit_event

from cifar_transfer.collection import CollectionDataset, WatchResult, list_collection, watch_collection
from cifar_transfer.config import CollectionSettings
from cifar_transfer.redact import redact
from cifar_transfer.tasks.retries import transient_retries


@task(name="list-collection", **transient_retries(2, backoff_factor=2))
def list_collection_task(settings: CollectionSettings) -> CollectionDataset:
    dataset, _ = list_collection(settings)
    return dataset


COLLECTION_CHANGED_EVENT = "cifar-transfer.collection.changed"


@task(name="watch-collection", **transient_retries(2, backoff_factor=2))
def watch_collection_task(settings: CollectionSettings, storage_url: str, run_options: dict) -> WatchResult:
    """List the collection; when it changed since the last watch, emit the event the extraction deployment triggers on,
    with `run_options` (the watched run's flat `config`, so the extraction it starts is the one this watch stands for)."""
    result = watch_collection(settings, storage_url)
    if result.changed:
        emit_event(
            event=COLLECTION_CHANGED_EVENT,
            resource={
                "prefect.resource.id": f"cifar-transfer.collection.{result.dataset.id}",
                "cifar-transfer.source": redact(settings.source),
                "cifar-transfer.storage": redact(storage_url),
            },
            payload={
                "sizes": result.dataset.sizes,
                "listing_digest": result.dataset.listing_digest,
                "config": run_options,
            },
        )
    return result
