"""Task: train the heads on a feature set and choose on validation; Cached while every file of the head is there."""

from __future__ import annotations

import posixpath

from prefect import task
from prefect.events import emit_event

from cifar_transfer import layout
from cifar_transfer.config import HeadSettings
from cifar_transfer.head import HeadResult, train_head
from cifar_transfer.redact import redact
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.caching import committed_files_key, output_key_fn, remember_output
from cifar_transfer.tasks.lineage import current_lineage

HEAD_COMPLETED_EVENT = "cifar-transfer.head.completed"


def head_output_key(storage_url: str, folder: str, key: str, **_) -> str | None:
    return committed_files_key(Storage(storage_url), layout.head_files(folder, key).paths())


@task(name="head", cache_key_fn=output_key_fn(head_output_key, HeadResult))
def train_head_task(storage_url: str, folder: str, key: str, settings: HeadSettings, classes: list[str]) -> HeadResult:
    result = train_head(storage_url, folder, key, settings, classes, current_lineage())
    storage = Storage(storage_url)
    emit_event(
        event=HEAD_COMPLETED_EVENT,
        resource={
            "prefect.resource.id": f"cifar-transfer.head.{key}",
            "cifar-transfer.storage": redact(storage.uri(storage.root)),
            "cifar-transfer.fingerprint": posixpath.basename(folder).rsplit("-", 1)[-1],
            "cifar-transfer.head": key,
        },
        payload={"test_accuracy": result.test_accuracy, "kind": result.kind},
    )
    return remember_output(result, head_output_key(storage_url, folder, key))
