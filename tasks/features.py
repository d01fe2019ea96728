"""Tasks: commit a feature set (manifests last) and announce it; find a complete one for analysis."""

from __future__ import annotations

import posixpath

from prefect import task
from prefect.events import emit_event

from cifar_transfer.catalogue import find_feature_set
from cifar_transfer.commit import commit_feature_set
from cifar_transfer.config import CollectionSettings, FeatureSpec
from cifar_transfer.feature_records import ExtractionRecord, FeatureSetInfo, ShardRecord
from cifar_transfer.progress import ExtractionStats
from cifar_transfer.redact import redact
from cifar_transfer.sources.base import UnreadableItem
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.lineage import current_lineage

FEATURES_COMPLETED_EVENT = "cifar-transfer.features.completed"


def announce_feature_set(info: FeatureSetInfo) -> None:
    """Emit the Prefect event that downstream deployments trigger on, with where the features are."""
    storage = Storage(info.storage_url)
    emit_event(
        event=FEATURES_COMPLETED_EVENT,
        resource={
            "prefect.resource.id": f"cifar-transfer.features.{info.fingerprint}",
            "prefect.resource.name": posixpath.basename(info.folder),
            "cifar-transfer.storage": redact(storage.uri(storage.root)),
            "cifar-transfer.fingerprint": info.fingerprint,
        },
        payload={"folder": redact(storage.uri(info.folder)), "splits": info.splits, "spec": info.spec.model_dump()},
    )


@task(name="commit-feature-set")
def commit_feature_set_task(
    storage_url: str,
    spec: FeatureSpec,
    records: list[ShardRecord],
    classes: list[str],
    stats: ExtractionStats,
    retired: dict[str, list[str]] | None = None,
    collection: CollectionSettings | None = None,
    unusable: dict[str, list[UnreadableItem]] | None = None,
) -> FeatureSetInfo:
    extraction = None
    if stats.images_computed:
        extraction = ExtractionRecord(seconds=stats.seconds, images=stats.images_computed, images_per_second=stats.images_per_second)
    info = commit_feature_set(storage_url, spec, records, classes, retired, collection, extraction, current_lineage(), unusable)
    announce_feature_set(info)
    return info


@task(name="find-feature-set")
def find_feature_set_task(storage_url: str, fingerprint: str | None = None) -> FeatureSetInfo:
    return find_feature_set(storage_url, fingerprint)
