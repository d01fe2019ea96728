"""Parquet feature shards, per-split manifests, and the reading API.

Contract of a feature set folder `features/<backbone>-<size>px-<pooling>-<fingerprint>/`:
- `<split>/part-NNNNN.parquet`: columns `index` (int64, position in the split),
  `label` (int64), `features` (fixed_size_list<float32>[D]; spatial maps
  flattened in (height, width, channels) order). Schema metadata key
  `cifar_transfer` holds JSON with the fingerprint, feature shape, shard range,
  feature spec and the library versions that wrote it.
  `<split>` is `train`, `test`, or, with `--flip`, `train-flipped` / `test-flipped`:
  the same images mirrored left-right, same `index` and `label` as the originals.
- `<split>/_manifest.json`: written only when every shard of the split is done;
  lists each shard's rows, bytes and sha256. A split without it is incomplete.
- `feature_set.json`: the feature spec, fingerprint and feature shape.
Temporary files start with "." and manifests with "_", so Parquet readers and
`*.parquet` globs see only finished shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import posixpath
from collections.abc import Iterator
from datetime import datetime, timezone
from functools import cache
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, field_validator

from cifar_transfer import card, layout
from cifar_transfer.config import CollectionSettings, FeatureSpec, stable_hash
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.shards import FLIPPED, VIEWS, Shard
from cifar_transfer.sources.base import Item, UnreadableItem
from cifar_transfer.sources.kinds import kind_of
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)

METADATA_KEY = b"cifar_transfer"


class ShardRecord(BaseModel):
    """A finished shard as the manifest lists it."""

    file: str
    split: Literal[VIEWS]

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, file: str) -> str:
        """A manifest names files inside its own view folder, nothing else: a crafted path never reaches a reader or `repair`."""
        if not layout.is_plain_name(file):
            raise ValueError(f"shard file {file!r} is not a plain file name")
        return file

    number: int
    start: int
    stop: int
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """A complete view. A collection's view gets a new version when its images change; `retired` are the files the
    previous version listed and this one does not (kept for readers of that version, deleted by the next one)."""

    fingerprint: str
    split: str
    rows: int
    feature_shape: list[int]
    shards: list[ShardRecord]
    created_at: str
    version: int = 1
    retired: list[str] = []

    @field_validator("retired")
    @classmethod
    def _plain_file_names(cls, files: list[str]) -> list[str]:
        for file in files:
            ShardRecord._plain_file_name(file)
        return files


class Lineage(BaseModel):
    """Who made an output: the Prefect flow run (id and UI link) when one did, and the library versions."""

    flow_run_id: str | None = None
    flow_run_url: str | None = None
    versions: dict = Field(default_factory=lambda: library_versions())
    made_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class ExtractionRecord(BaseModel):
    """How the set's features were computed: by the last run that computed any (a rerun that reused them all keeps it)."""

    seconds: float
    images: int
    images_per_second: float


class FeatureSetInfo(BaseModel):
    """A feature set on storage: enough for later stages and other jobs to read it.

    `splits` holds only the complete splits (those with a manifest), with their row counts.
    """

    storage_url: str
    folder: str
    fingerprint: str
    spec: FeatureSpec
    feature_shape: list[int]
    splits: dict[str, int]
    classes: list[str]
    created_at: str
    content_version: str | None = None  # a collection's: changes with every new manifest version (None: an archive's)
    collection: CollectionSettings | None = None  # how to read the collection the set was made from
    bytes: int | None = None  # the complete views' shards on storage, as their manifests list them (None: no complete view)
    extraction: ExtractionRecord | None = None  # how its features were computed
    made_by: Lineage | None = None  # the flow run that computed them


@cache
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("cifar-transfer", "tensorflow", "keras", "openvino", "numpy", "pyarrow", "prefect"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def features_folder(storage: Storage, spec: FeatureSpec) -> str:
    return layout.feature_set_folder(storage, spec.folder_name)


def shard_path(storage: Storage, spec: FeatureSpec, shard: Shard) -> str:
    return layout.shard_file(features_folder(storage, spec), shard.split, shard.file_name)


class ShardRows(NamedTuple):
    """What one shard's rows are, before their features: labels and ids, and for a collection its items."""

    labels: np.ndarray  # int64, row for row
    ids: np.ndarray  # int64: the `index` column (the row's position in an archive split; a stable id in a collection)
    items: list[Item] | None = None  # a collection shard's decoded items, row for row
    skipped: list[UnreadableItem] = []  # a collection shard's items that could not be read or decoded


def shard_table(spec: FeatureSpec, shard: Shard, rows: ShardRows, features: np.ndarray) -> pa.Table:
    """One shard's rows with the metadata that ties them to their configuration (and, for a collection, its items)."""
    feature_shape = list(features.shape[1:])
    flat = np.ascontiguousarray(features.reshape(len(features), -1), dtype=np.float32)
    metadata = {
        "fingerprint": spec.fingerprint,
        "feature_shape": feature_shape,
        "split": shard.split,
        "shard": shard.number,
        "start": shard.start,
        "stop": shard.stop,
        "spec": spec.model_dump(),
        "versions": library_versions(),
    }
    columns = {
        "index": pa.array(rows.ids.astype(np.int64)),
        "label": pa.array(rows.labels.astype(np.int64)),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
    }
    if shard.items is not None:
        metadata |= {
            "items_digest": shard.items_digest,
            "items": [[item.key, item.version, item.label] for item in shard.items],
            "skipped": [entry.model_dump() for entry in rows.skipped],
        }
        columns |= {
            "key": pa.array([item.key for item in rows.items], pa.string()),
            "version": pa.array([item.version for item in rows.items], pa.string()),
        }
    return pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def shard_items_from_metadata(metadata: dict) -> list[tuple[str, str, int]] | None:
    """The (key, version, label) of each item a collection shard was planned with, from its footer metadata (None
    when it has none); tuples, not `Item`s, since planning compares 200,000 of them with the listing."""
    try:
        return [(key, version, label) for key, version, label in metadata["items"]]
    except (TypeError, ValueError, KeyError):
        return None


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file, to hash and commit atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_shard(storage: Storage, path: str, shard: Shard, table: pa.Table) -> ShardRecord:
    """Serialize in memory, hash, then commit atomically: the file is whole or absent."""
    payload = parquet_bytes(table)
    storage.write_atomic(path, payload)
    for leftover in storage.stale_temp_files(path):
        storage.fs.rm(leftover)
    return _record(shard, path, payload, table.num_rows)


def _record(shard: Shard, path: str, payload: bytes, rows: int) -> ShardRecord:
    return ShardRecord(
        file=posixpath.basename(path),
        split=shard.split,
        number=shard.number,
        start=shard.start,
        stop=shard.stop,
        rows=rows,
        bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )


def shard_metadata(storage: Storage, path: str) -> tuple[int, dict]:
    """Row count and our metadata from a Parquet footer, without reading the data."""
    with storage.fs.open(path, "rb") as stream:
        footer = pq.read_metadata(stream)
    raw = (footer.metadata or {}).get(METADATA_KEY)
    return footer.num_rows, json.loads(raw) if raw else {}


SHARD_MISSING = "missing"  # the one `shard_problem` callers tell apart: nothing there yet, so nothing to warn about


def shard_problem(storage: Storage, path: str, spec: FeatureSpec, shard: Shard, listed: ShardRecord | None = None) -> str | None:
    """Why the file at `path` is not this finished shard, or None when it is.

    Checks what is cheap: the footer's fingerprint and rows, and the size the manifest lists (`listed`), if any.
    """
    if not storage.exists(path):
        return SHARD_MISSING
    if listed is not None and storage.fs.size(path) != listed.bytes:
        return f"{storage.fs.size(path)} bytes, the manifest says {listed.bytes}"
    try:
        rows, metadata = shard_metadata(storage, path)
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable as Parquet ({exc})"
    if metadata.get("fingerprint") != spec.fingerprint:
        return f"written by another configuration (fingerprint {metadata.get('fingerprint')}, expected {spec.fingerprint})"
    if shard.items is not None:  # a collection shard: its rows are the decodable ones among the items it was planned with
        if (metadata.get("start"), metadata.get("items_digest")) != (shard.start, shard.items_digest):
            return "holds other images than planned (the collection changed, or another plan wrote it)"
        return None
    if (rows, metadata.get("start"), metadata.get("stop")) != (shard.rows, shard.start, shard.stop):
        return f"holds rows {metadata.get('start')}..{metadata.get('stop')} ({rows}), expected {shard.start}..{shard.stop}"
    return None


def shard_size_conflict(storage: Storage, path: str, spec: FeatureSpec, shard: Shard) -> str | None:
    """A message when `path` is a finished shard of this feature set cut with another shard size."""
    try:
        _, metadata = shard_metadata(storage, path)
    except (OSError, pa.ArrowException):
        return None
    if metadata.get("fingerprint") != spec.fingerprint or metadata.get("start") == shard.start and metadata.get("stop") == shard.stop:
        return None
    return (
        f"{storage.uri(path)} holds rows {metadata.get('start')}..{metadata.get('stop')} of these features, "
        f"cut with another shard size: pass --shard-size {metadata.get('stop') - metadata.get('start')} "
        "(the size they were extracted with) or another --storage"
    )


def listed_record(manifest: Manifest | None, shard: Shard) -> ShardRecord | None:
    """The manifest's record of this shard (same file and rows), if it lists one."""
    for record in manifest.shards if manifest else []:
        if (record.file, record.start, record.stop) == (shard.file_name, shard.start, shard.stop):
            return record
    return None


def existing_shard_record(storage: Storage, path: str, shard: Shard, listed: ShardRecord | None = None) -> ShardRecord:
    """The record of a finished shard: the manifest's (`listed`) when its size matches, else by hashing the file."""
    if listed is not None and listed.bytes == storage.fs.size(path):
        return listed
    rows, _ = shard_metadata(storage, path)
    return _record(shard, path, storage.read_bytes(path), rows)


def read_manifest(storage: Storage, folder: str, split: str) -> Manifest | None:
    """The view's manifest; None when it is missing, or unreadable (logged: the view then counts as incomplete)."""
    path = layout.manifest(folder, split)
    if not storage.exists(path):
        return None
    try:
        return Manifest.model_validate_json(storage.read_bytes(path))
    except ValueError as exc:
        log.warning("ignoring %s: not a valid manifest (%s)", storage.uri(path), str(exc).splitlines()[0])
        return None


def write_manifest(
    storage: Storage,
    folder: str,
    spec: FeatureSpec,
    feature_shape: list[int],
    split: str,
    records: list[ShardRecord],
    retired: list[str] = (),
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
    storage.write_atomic(layout.manifest(folder, split), manifest.model_dump_json(indent=2).encode())
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
    storage.write_atomic(layout.feature_set_description(folder), description.model_dump_json(indent=2).encode())
    card.write_card(storage, folder, description, view_shards(storage, folder, records))
    for split in sorted({record.split for record in records}):
        view_records = [record for record in records if record.split == split]
        if kind_of(collection).incremental:
            write_skipped(storage, folder, split, view_records, (unusable or {}).get(split.removesuffix(FLIPPED), []))
        write_manifest(storage, folder, spec, metadata["feature_shape"], split, view_records, (retired or {}).get(split, []))
    return describe_feature_set(storage, folder)


def view_shards(storage: Storage, folder: str, records: list[ShardRecord]) -> dict[str, list[ShardRecord]]:
    """Each view's shards once this commit is done: the ones committed now, else its manifest's (a view the commit
    leaves alone keeps its shards); views with neither are absent."""
    views = {}
    for view in VIEWS:
        committed = sorted((record for record in records if record.split == view), key=lambda record: record.number)
        manifest = None if committed else read_manifest(storage, folder, view)
        if committed or manifest is not None:
            views[view] = committed or manifest.shards
    return views


def _committed_as(storage: Storage, folder: str, records: list[ShardRecord], classes: list[str]) -> FeatureSetInfo | None:
    """The set as committed, when its description and every view's manifest already say exactly this; else None."""
    info = describe_feature_set(storage, folder)
    if info is None or info.classes != classes:
        return None
    for split in {record.split for record in records}:
        manifest = read_manifest(storage, folder, split)
        view = sorted((record for record in records if record.split == split), key=lambda record: record.number)
        if manifest is None or manifest.shards != view:
            return None
    return info


def write_skipped(storage: Storage, folder: str, split: str, records: list[ShardRecord], listed: list[UnreadableItem] = ()) -> list[dict]:
    """Gather the images a collection view's listing (`listed`) and shards could not use into `<view>/_skipped.json`
    (written before the manifest)."""
    skipped = [entry.model_dump() for entry in listed]
    for record in records:
        _, metadata = shard_metadata(storage, layout.shard_file(folder, split, record.file))
        skipped += metadata.get("skipped", [])
    storage.write_if_changed(layout.skipped_record(folder, split), json.dumps(skipped, indent=2).encode())
    if skipped:
        log.warning("%s: %d images could not be used (listed in %s)", split, len(skipped), layout.SKIPPED_NAME)
    return skipped


class SplitBatch(NamedTuple):
    """The rows of one shard of a split: their ids, labels and features (flattened, or pooled when asked)."""

    index: np.ndarray
    labels: np.ndarray
    features: np.ndarray


def split_manifest(storage: Storage, folder: str, split: str) -> Manifest:
    """The manifest of a complete split, or a FeatureSetError saying how to complete it."""
    manifest = read_manifest(storage, folder, split)
    if manifest is None:
        raise FeatureSetError(f"split {split!r} of {folder} has no manifest, so it is incomplete: run extraction to finish it")
    return manifest


def read_shard(storage: Storage, folder: str, split: str, record: ShardRecord, shape: list[int], pooled: bool = False) -> SplitBatch:
    """One shard's rows; `pooled=True` averages spatial maps (of `shape`) over height and width."""
    with storage.fs.open(layout.shard_file(folder, split, record.file), "rb") as stream:
        table = pq.read_table(stream, columns=["index", "label", "features"])
    rows = table.num_rows
    values = table.column("features").combine_chunks().flatten().to_numpy().reshape(rows, -1)
    if pooled and len(shape) > 1:
        values = values.reshape(rows, -1, shape[-1]).mean(axis=1)
    return SplitBatch(table.column("index").to_numpy(), table.column("label").to_numpy(), values)


def iter_split(storage: Storage, folder: str, split: str, pooled: bool = False) -> Iterator[SplitBatch]:
    """A complete split shard by shard, in index order: one shard in memory at a time."""
    manifest = split_manifest(storage, folder, split)
    for record in manifest.shards:
        yield read_shard(storage, folder, split, record, manifest.feature_shape, pooled)


def read_split(
    storage: Storage,
    folder: str,
    split: str,
    pooled: bool = False,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, label, features) of a complete split in index order, or of its rows at the sorted positions `rows`,
    into one preallocated array per column: memory is the size of the result plus one shard.
    `pooled=True` averages spatial maps over height and width."""
    manifest = split_manifest(storage, folder, split)
    shape = manifest.feature_shape
    width = shape[-1] if pooled else int(np.prod(shape))
    wanted = np.arange(manifest.rows) if rows is None else rows
    index = np.empty(len(wanted), np.int64)
    labels = np.empty(len(wanted), np.int64)
    features = np.empty((len(wanted), width), np.float32)
    start = filled = 0
    for batch in iter_split(storage, folder, split, pooled):
        stop = start + len(batch.index)
        taken = wanted[(wanted >= start) & (wanted < stop)] - start
        index[filled : filled + len(taken)] = batch.index[taken]
        labels[filled : filled + len(taken)] = batch.labels[taken]
        features[filled : filled + len(taken)] = batch.features[taken]
        start, filled = stop, filled + len(taken)
    return index, labels, features


class RebuildRecord(BaseModel):
    """What the fingerprint leaves out but a rebuild of the same features needs (`verify --repair`)."""

    weights: str
    seed: int
    shard_size: int
    flip: bool = False  # the mirrored views were extracted too (absent in sets written before it was recorded)
    collection: CollectionSettings | None = None  # how to read the collection the set was made from (None: an archive)


def read_keys(storage: Storage, folder: str, split: str) -> dict[int, str]:
    """A collection view's image names by row id (its `index`), reading only those two columns."""
    manifest = split_manifest(storage, folder, split)
    keys = {}
    for record in manifest.shards:
        with storage.fs.open(layout.shard_file(folder, split, record.file), "rb") as stream:
            table = pq.read_table(stream, columns=["index", "key"])
        keys.update(zip(table.column("index").to_pylist(), table.column("key").to_pylist(), strict=True))
    return keys


class FeatureSetDescription(BaseModel):
    """The content of `feature_set.json`."""

    fingerprint: str
    spec: dict  # FeatureSpec's fingerprinted fields, as stored
    feature_shape: list[int]
    classes: list[str]
    rebuild: RebuildRecord
    versions: dict
    extraction: ExtractionRecord | None = None
    made_by: Lineage | None = None

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(**self.spec, weights=self.rebuild.weights, seed=self.rebuild.seed)


def read_description(storage: Storage, folder: str) -> FeatureSetDescription | None:
    """The folder's feature-set description; None (with a warning) if it is missing or unreadable."""
    path = layout.feature_set_description(folder)
    if not storage.exists(path):
        return None
    try:
        return FeatureSetDescription.model_validate_json(storage.read_bytes(path))
    except ValueError as exc:
        log.warning("skipping %s: unreadable %s (%s)", storage.uri(folder), layout.FEATURE_SET_NAME, str(exc).splitlines()[0])
        return None


def describe_feature_set(storage: Storage, folder: str) -> FeatureSetInfo | None:
    """The feature set in `folder` with its complete splits, or None if there is none."""
    description = read_description(storage, folder)
    if description is None:
        return None
    manifests = {split: manifest for split in VIEWS if (manifest := read_manifest(storage, folder, split)) is not None}
    return FeatureSetInfo(
        storage_url=storage.url,
        folder=folder,
        fingerprint=description.fingerprint,
        spec=description.feature_spec(),
        feature_shape=description.feature_shape,
        splits={split: manifest.rows for split, manifest in manifests.items()},
        classes=description.classes,
        created_at=max((manifest.created_at for manifest in manifests.values()), default=""),
        content_version=content_version(description, manifests),
        collection=description.rebuild.collection,
        bytes=sum(record.bytes for manifest in manifests.values() for record in manifest.shards) if manifests else None,
        extraction=description.extraction,
        made_by=description.made_by,
    )


def content_version(description: FeatureSetDescription, manifests: dict[str, Manifest]) -> str | None:
    """Names this version of the features, for the keys of maps and heads made from them; None where the features
    never change under one fingerprint (an archive's: the keys stay what they always were)."""
    if not kind_of(description.rebuild.collection).incremental:
        return None
    return stable_hash({view: [record.sha256 for record in manifest.shards] for view, manifest in manifests.items()}, 16)


def list_feature_sets(storage_url: str) -> list[FeatureSetInfo]:
    """Every feature set under the storage root, newest first; `splits` says which are complete."""
    storage = Storage(storage_url)
    root = storage.path("features")
    if not storage.exists(root):
        return []
    found = [describe_feature_set(storage, folder) for folder in storage.fs.ls(root, detail=False)]
    return sorted((info for info in found if info is not None), key=lambda info: info.created_at, reverse=True)


def find_feature_set(storage_url: str, fingerprint: str | None = None, splits: tuple[str, ...] = ("train", "test")) -> FeatureSetInfo:
    """The set with this fingerprint, or the newest one, whose `splits` are all complete."""
    for info in list_feature_sets(storage_url):
        if (fingerprint is None or info.fingerprint == fingerprint) and all(split in info.splits for split in splits):
            return info
    wanted = f"fingerprint {fingerprint}" if fingerprint else "any configuration"
    raise FeatureSetError(f"no complete {'+'.join(splits)} features for {wanted} under {storage_url}: run `cifar-transfer extract` first")


def load_features(storage_url: str, split: str, fingerprint: str | None = None, as_frame: bool = False):
    """Features of one complete split: the given fingerprint, or the newest complete set.

    Returns (index, labels, features) numpy arrays, or a pandas DataFrame with
    columns index, label, features when `as_frame` is true.
    """
    info = find_feature_set(storage_url, fingerprint, splits=(split,))
    index, labels, features = read_split(Storage(storage_url), info.folder, split)
    if not as_frame:
        return index, labels, features
    import pandas as pd  # only here: a run never needs it, and it takes a third of a second to import

    return pd.DataFrame({"index": index, "label": labels, "features": list(features)})
