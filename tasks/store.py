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
import platform
import posixpath
from datetime import datetime, timezone
from functools import cache

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.events import emit_event
from pydantic import BaseModel

from tasks.cifar import VIEWS, Shard
from tasks.config import FeatureSpec
from tasks.errors import FeatureSetError
from tasks.logs import logger
from tasks.storage import Storage

METADATA_KEY = b"cifar_transfer"
MANIFEST_NAME = "_manifest.json"
FEATURE_SET_NAME = "feature_set.json"


class ShardRecord(BaseModel):
    """A finished shard as the manifest lists it."""

    file: str
    split: str
    number: int
    start: int
    stop: int
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    fingerprint: str
    split: str
    rows: int
    feature_shape: list[int]
    shards: list[ShardRecord]
    created_at: str


class FeatureSetInfo(BaseModel):
    """A feature set on storage: enough for later stages and other jobs to read it.

    `splits` holds only the complete splits (those with a manifest), with their row counts.
    """

    storage_url: str
    folder: str
    fingerprint: str
    spec: dict
    feature_shape: list[int]
    splits: dict[str, int]
    classes: list[str]
    created_at: str


@cache
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("cifar-transfer", "tensorflow", "keras", "numpy", "pyarrow", "prefect"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def features_folder(storage: Storage, spec: FeatureSpec) -> str:
    return storage.path("features", spec.folder_name)


def shard_path(storage: Storage, spec: FeatureSpec, shard: Shard) -> str:
    return posixpath.join(features_folder(storage, spec), shard.split, shard.file_name)


def manifest_path(folder: str, split: str) -> str:
    return posixpath.join(folder, split, MANIFEST_NAME)


def shard_table(spec: FeatureSpec, shard: Shard, labels: np.ndarray, features: np.ndarray) -> pa.Table:
    """One shard's rows with the metadata that ties them to their configuration."""
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
    table = pa.table(
        {
            "index": pa.array(np.arange(shard.start, shard.stop, dtype=np.int64)),
            "label": pa.array(labels.astype(np.int64)),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
        }
    )
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def write_shard(storage: Storage, path: str, shard: Shard, table: pa.Table) -> ShardRecord:
    """Serialize in memory, hash, then commit atomically: the file is whole or absent."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    payload = sink.getvalue().to_pybytes()
    storage.write_atomic(path, payload)
    for leftover in storage.stale_temp_files(path):
        storage.fs.rm(leftover)
    return _record(shard, path, payload)


def _record(shard: Shard, path: str, payload: bytes) -> ShardRecord:
    return ShardRecord(
        file=posixpath.basename(path),
        split=shard.split,
        number=shard.number,
        start=shard.start,
        stop=shard.stop,
        rows=shard.rows,
        bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )


def shard_metadata(storage: Storage, path: str) -> tuple[int, dict]:
    """Row count and our metadata from a Parquet footer, without reading the data."""
    with storage.fs.open(path, "rb") as stream:
        footer = pq.read_metadata(stream)
    raw = (footer.metadata or {}).get(METADATA_KEY)
    return footer.num_rows, json.loads(raw) if raw else {}


def shard_problem(storage: Storage, path: str, spec: FeatureSpec, shard: Shard) -> str | None:
    """Why the file at `path` is not this finished shard, or None when it is."""
    if not storage.exists(path):
        return "missing"
    try:
        rows, metadata = shard_metadata(storage, path)
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable as Parquet ({exc})"
    if metadata.get("fingerprint") != spec.fingerprint:
        return f"written by another configuration (fingerprint {metadata.get('fingerprint')}, expected {spec.fingerprint})"
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


def existing_shard_record(storage: Storage, path: str, shard: Shard, manifest: Manifest | None = None) -> ShardRecord:
    """The record of a finished shard: from `manifest` when it lists this file at its size, else by hashing the file."""
    listed = {record.file: record for record in manifest.shards} if manifest else {}
    record = listed.get(posixpath.basename(path))
    if record is not None and (record.start, record.stop) == (shard.start, shard.stop) and record.bytes == storage.fs.size(path):
        return record
    return _record(shard, path, storage.read_bytes(path))


def read_manifest(storage: Storage, folder: str, split: str) -> Manifest | None:
    path = manifest_path(folder, split)
    if not storage.exists(path):
        return None
    return Manifest.model_validate_json(storage.read_bytes(path))


def write_manifest(storage: Storage, folder: str, spec: FeatureSpec, feature_shape: list[int], records: list[ShardRecord]) -> Manifest:
    """Declare a split complete (unless an identical manifest is already there)."""
    records = sorted(records, key=lambda record: record.number)
    split = records[0].split
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
    )
    storage.write_atomic(manifest_path(folder, split), manifest.model_dump_json(indent=2).encode())
    return manifest


def commit_feature_set(storage_url: str, spec: FeatureSpec, records: list[ShardRecord], classes: list[str]) -> FeatureSetInfo:
    """Describe the set, then write each split's manifest now that all its shards are done."""
    storage = Storage(storage_url)
    folder = features_folder(storage, spec)
    _, metadata = shard_metadata(storage, posixpath.join(folder, records[0].split, records[0].file))
    description = FeatureSetDescription(
        fingerprint=spec.fingerprint,
        spec=spec.model_dump(),
        feature_shape=metadata["feature_shape"],
        classes=classes,
        rebuild={"weights": spec.weights, "seed": spec.seed, "shard_size": max(record.rows for record in records)},
        versions=library_versions(),
    )
    storage.write_atomic(posixpath.join(folder, FEATURE_SET_NAME), description.model_dump_json(indent=2).encode())
    for split in sorted({record.split for record in records}):
        write_manifest(storage, folder, spec, metadata["feature_shape"], [record for record in records if record.split == split])
    return describe_feature_set(storage, folder)


FEATURES_COMPLETED_EVENT = "cifar-transfer.features.completed"


def announce_feature_set(info: FeatureSetInfo) -> None:
    """Emit the Prefect event that downstream deployments trigger on, with where the features are."""
    storage = Storage(info.storage_url)
    emit_event(
        event=FEATURES_COMPLETED_EVENT,
        resource={
            "prefect.resource.id": f"cifar-transfer.features.{info.fingerprint}",
            "prefect.resource.name": posixpath.basename(info.folder),
            "cifar-transfer.storage": storage.uri(storage.root),
            "cifar-transfer.fingerprint": info.fingerprint,
        },
        payload={"folder": storage.uri(info.folder), "splits": info.splits, "spec": info.spec},
    )


@task(name="commit-feature-set")
def commit_feature_set_task(storage_url: str, spec: FeatureSpec, records: list[ShardRecord], classes: list[str]) -> FeatureSetInfo:
    info = commit_feature_set(storage_url, spec, records, classes)
    announce_feature_set(info)
    return info


def read_split(storage: Storage, folder: str, split: str, pooled: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, label, features) of a complete split, in index order.

    Files are read one at a time into one preallocated array, so memory is
    the size of the result. `pooled=True` averages spatial maps over height
    and width, giving one channel vector per image.
    """
    manifest = read_manifest(storage, folder, split)
    if manifest is None:
        raise FeatureSetError(f"split {split!r} of {folder} has no manifest, so it is incomplete: run extraction to finish it")
    shape = manifest.feature_shape
    width = shape[-1] if pooled else int(np.prod(shape))
    index = np.empty(manifest.rows, np.int64)
    labels = np.empty(manifest.rows, np.int64)
    features = np.empty((manifest.rows, width), np.float32)
    row = 0
    for record in manifest.shards:
        with storage.fs.open(posixpath.join(folder, split, record.file), "rb") as stream:
            table = pq.read_table(stream)
        rows = table.num_rows
        values = table.column("features").combine_chunks().flatten().to_numpy().reshape(rows, -1)
        if pooled and len(shape) > 1:
            values = values.reshape(rows, -1, shape[-1]).mean(axis=1)
        index[row : row + rows] = table.column("index").to_numpy()
        labels[row : row + rows] = table.column("label").to_numpy()
        features[row : row + rows] = values
        row += rows
    return index, labels, features


class FeatureSetDescription(BaseModel):
    """The content of `feature_set.json`."""

    fingerprint: str
    spec: dict
    feature_shape: list[int]
    classes: list[str]
    rebuild: dict
    versions: dict


def read_description(storage: Storage, folder: str) -> FeatureSetDescription | None:
    """The folder's feature-set description; None (with a warning) if it is missing or unreadable."""
    path = posixpath.join(folder, FEATURE_SET_NAME)
    if not storage.exists(path):
        return None
    try:
        return FeatureSetDescription.model_validate_json(storage.read_bytes(path))
    except ValueError as exc:
        logger().warning("skipping %s: unreadable %s (%s)", storage.uri(folder), FEATURE_SET_NAME, str(exc).splitlines()[0])
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
        spec=description.spec,
        feature_shape=description.feature_shape,
        splits={split: manifest.rows for split, manifest in manifests.items()},
        classes=description.classes,
        created_at=max((manifest.created_at for manifest in manifests.values()), default=""),
    )


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
    raise FeatureSetError(
        f"no complete {'+'.join(splits)} features for {wanted} under {storage_url}: run `cifar-transfer extract` first"
    )


@task(name="find-feature-set")
def find_feature_set_task(storage_url: str, fingerprint: str | None = None) -> FeatureSetInfo:
    return find_feature_set(storage_url, fingerprint)


def load_features(storage_url: str, split: str, fingerprint: str | None = None, as_frame: bool = False):
    """Features of one complete split: the given fingerprint, or the newest complete set.

    Returns (index, labels, features) numpy arrays, or a pandas DataFrame with
    columns index, label, features when `as_frame` is true.
    """
    info = find_feature_set(storage_url, fingerprint, splits=(split,))
    index, labels, features = read_split(Storage(storage_url), info.folder, split)
    if not as_frame:
        return index, labels, features
    return pd.DataFrame({"index": index, "label": labels, "features": list(features)})
