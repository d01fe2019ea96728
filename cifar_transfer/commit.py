"""Commit a feature set: its description, its card, then each view's manifest, once all the view's shards are done."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone

from cifar_transfer import card, layout
from cifar_transfer.catalogue import describe_feature_set, read_feature_set
from cifar_transfer.config import CollectionSettings, FeatureSpec
from cifar_transfer.feature_records import (
    ExtractionRecord,
    FeatureSetDescription,
    FeatureSetInfo,
    Lineage,
    Manifest,
    RebuildRecord,
    ShardRecord,
    library_versions,
    read_description,
    read_manifest,
)
from cifar_transfer.records import FEATURE_SET, MANIFEST, SKIPPED
from cifar_transfer.shard_files import features_folder, shard_metadata
from cifar_transfer.shards import FLIPPED, VIEWS
from cifar_transfer.sources.base import UnreadableItem
from cifar_transfer.sources.kinds import kind_of
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)


def write_manifest(
    storage: Storage,
    folder: str,
    spec: FeatureSpec,
    feature_shape: list[int],
    split: str,
    records: list[ShardRecord],
    retired: Sequence[str] = (),
) -> Manifest:
    """Declare a view complete, as a new version when its shards changed (one atomic replace: a reader sees the old
    version or the new one, never a mix); then delete the files the previous version retired, listed by neither."""
    records = sorted(records, key=lambda record: record.number)
    existing = read_manifest(storage, folder, split)
    if existing is not None and existing.shards == records:
        return existing
    manifest = Manifest(
        fingerprint=spec.fingerprint,
        split=split,
        rows=sum(record.rows for record in records),
        feature_shape=feature_shape,
        shards=records,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        version=existing.version + 1 if existing else 1,
        retired=sorted(set(retired) - {record.file for record in records}),
    )
    storage.write_atomic(layout.manifest(folder, split), MANIFEST.dump(manifest))
    listed = {record.file for record in records} | set(manifest.retired)
    for file in existing.retired if existing else []:
        path = layout.shard_file(folder, split, file)
        if file not in listed and storage.exists(path):
            storage.fs.rm(path)
    return manifest


def commit_feature_set(
    storage_url: str,
    spec: FeatureSpec,
    records: list[ShardRecord],
    classes: list[str],
    retired: dict[str, list[str]] | None = None,
    collection: CollectionSettings | None = None,
    extraction: ExtractionRecord | None = None,
    lineage: Lineage | None = None,
    unusable: dict[str, list[UnreadableItem]] | None = None,
) -> FeatureSetInfo:
    """Describe the set, then write each view's manifest now that all its shards are done.

    `extraction` and `lineage` say how and by whom the shards were computed; a run that computed none passes None
    and the set keeps the record of the run that did.

    For a collection, `retired` names each view's files the new version no longer lists, and the images its shards
    could not use are gathered into `<view>/_skipped.json` beside the manifest, after the listing's `unusable` ones
    (by split: images without a usable label)."""
    storage = Storage(storage_url)
    folder = features_folder(storage, spec)
    if extraction is None and not any((retired or {}).values()) and (same := _committed_as(storage, folder, records, classes)):
        return same  # nothing computed, nothing changed: nothing written (a read-only storage reruns as a no-op)
    _, metadata = shard_metadata(storage, layout.shard_file(folder, records[0].split, records[0].file))
    earlier = read_description(storage, folder)
    description = FeatureSetDescription(
        fingerprint=spec.fingerprint,
        spec=spec.model_dump(),
        feature_shape=metadata["feature_shape"],
        classes=classes,
        rebuild=RebuildRecord(
            weights=spec.weights,
            seed=spec.seed,
            shard_size=max(record.rows for record in records),
            flip=any(record.split.endswith(FLIPPED) for record in records) or bool(earlier and earlier.rebuild.flip),
            collection=collection,
        ),
        versions=library_versions(),
        extraction=extraction or (earlier.extraction if earlier else None),
        made_by=lineage if extraction else (earlier.made_by if earlier else lineage),
    )
    storage.write_atomic(layout.feature_set_description(folder), FEATURE_SET.dump(description))
    card.write_card(storage, folder, description, view_shards(storage, folder, records))
    for split in sorted({record.split for record in records}):
        view_records = [record for record in records if record.split == split]
        if kind_of(collection).incremental:
            write_skipped(storage, folder, split, view_records, (unusable or {}).get(split.removesuffix(FLIPPED), []))
        write_manifest(storage, folder, spec, metadata["feature_shape"], split, view_records, (retired or {}).get(split, []))
    info = describe_feature_set(storage, folder)
    assert info is not None, "its description was just written"
    return info


def view_shards(storage: Storage, folder: str, records: list[ShardRecord]) -> dict[str, list[ShardRecord]]:
    """Each view's shards once this commit is done: the ones committed now, else its manifest's (a view the commit
    leaves alone keeps its shards); views with neither are absent."""
    views: dict[str, list[ShardRecord]] = {}
    for view in VIEWS:
        committed = sorted((record for record in records if record.split == view), key=lambda record: record.number)
        if committed:
            views[view] = committed
        elif (manifest := read_manifest(storage, folder, view)) is not None:
            views[view] = manifest.shards
    return views


def _committed_as(storage: Storage, folder: str, records: list[ShardRecord], classes: list[str]) -> FeatureSetInfo | None:
    """The set as committed, when its description and every view's manifest already say exactly this; else None.

    The manifests compared are the ones the description was made from: a run committing the same set at the same
    time writes them one by one, and a manifest read again after describing could be one the description lacks."""
    found = read_feature_set(storage, folder)
    if found is None or found[0].classes != classes:
        return None
    info, manifests = found
    for split in {record.split for record in records}:
        view = sorted((record for record in records if record.split == split), key=lambda record: record.number)
        if split not in manifests or manifests[split].shards != view:
            return None
    return info


def write_skipped(
    storage: Storage, folder: str, split: str, records: list[ShardRecord], listed: Sequence[UnreadableItem] = ()
) -> list[dict]:
    """Gather the images a collection view's listing (`listed`) and shards could not use into `<view>/_skipped.json`
    (written before the manifest)."""
    skipped = [entry.model_dump() for entry in listed]
    for record in records:
        _, metadata = shard_metadata(storage, layout.shard_file(folder, split, record.file))
        skipped += metadata.get("skipped", [])
    storage.write_if_changed(layout.skipped_record(folder, split), SKIPPED.dump({"skipped": skipped}))
    if skipped:
        log.warning("%s: %d images could not be used (listed in %s)", split, len(skipped), layout.SKIPPED_NAME)
    return skipped
