"""Shard files: writing one atomically, reading its footer, and deciding whether a file on storage is a finished shard."""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifar_transfer import layout, records
from cifar_transfer.config import FeatureSpec
from cifar_transfer.feature_records import Manifest, ShardRecord, library_versions
from cifar_transfer.shards import Shard, ShardRows
from cifar_transfer.sources.base import Item
from cifar_transfer.storage import Storage

METADATA_KEY = b"cifar_transfer"


def features_folder(storage: Storage, spec: FeatureSpec) -> str:
    return layout.feature_set_folder(storage, spec.folder_name)


def shard_path(storage: Storage, spec: FeatureSpec, shard: Shard) -> str:
    return layout.shard_file(features_folder(storage, spec), shard.split, shard.file_name)


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
    extra_metadata, extra_columns = shard.content.footer(rows)
    metadata |= extra_metadata
    columns |= extra_columns
    return pa.table(columns).replace_schema_metadata({METADATA_KEY: records.SHARD.dump(metadata, indent=None)})


def shard_items_from_metadata(metadata: dict) -> list[tuple[str, str, int]] | None:
    """The (key, version, label) of each item a collection shard was planned with, from its footer metadata (None
    when it has none); tuples, not `Item`s, since planning compares 200,000 of them with the listing."""
    try:
        return [(key, version, label) for key, version, label in metadata["items"]]
    except (TypeError, ValueError, KeyError):
        return None


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file, to hash and commit atomically.

    The features are written without min/max statistics, which no reader of features uses, and with a dictionary
    only when they take few distinct values (`features_repeat`); the small columns keep both.
    """
    sink = pa.BufferOutputStream()
    small_columns = [name for name in table.column_names if name != "features"]
    every_column = "features" in table.column_names and features_repeat(table)  # (a nested column is named by its leaf)
    pq.write_table(table, sink, use_dictionary=True if every_column else small_columns, write_statistics=small_columns)
    return sink.getvalue().to_pybytes()


DICTIONARY_SAMPLE = 1 << 18  # feature values `features_repeat` looks at, evenly spaced
DICTIONARY_MAX_DISTINCT = 1 << 15  # distinct values among them up to which a dictionary is written


def features_repeat(table: pa.Table) -> bool:
    """Whether a dictionary pays for the features column. An int8 backbone's features repeat: 21,812 distinct values
    in a shard of 4,096,000 (InceptionV3), where a dictionary made the file 36% smaller, its write 26% and its read
    48% faster. Float features do not (1.2 million distinct in 2.8 million, MobileNetV2): a dictionary there made the
    file larger and its write 40% slower, only to be dropped. Decided from the values alone, so a shard written
    again is the same bytes."""
    values = table.column("features").combine_chunks().flatten().to_numpy()
    step = max(1, len(values) // DICTIONARY_SAMPLE)
    return len(np.unique(values[::step])) <= DICTIONARY_MAX_DISTINCT


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
    return footer.num_rows, records.SHARD.read(raw, storage.uri(path)) if raw else {}


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
    return shard.content.mismatch(rows, metadata)


def shard_size_conflict(storage: Storage, path: str, spec: FeatureSpec, shard: Shard) -> str | None:
    """A message when `path` is a finished shard of this feature set cut with another shard size."""
    try:
        _, metadata = shard_metadata(storage, path)
    except (OSError, pa.ArrowException):
        return None
    if metadata.get("fingerprint") != spec.fingerprint or (size := shard.content.other_shard_size(metadata)) is None:
        return None
    return (
        f"{storage.uri(path)} holds rows {metadata.get('start')}..{metadata.get('stop')} of these features, "
        f"cut with another shard size: pass --shard-size {size} "
        "(the size they were extracted with) or another --storage"
    )


def recorded_shard(storage: Storage, path: str, record: ShardRecord) -> Shard:
    """The shard a manifest's record names, holding what the footer of its file at `path` says it was planned with
    (a collection's items), so that `shard_problem` checks the file against its own record."""
    try:
        _, metadata = shard_metadata(storage, path)
    except (OSError, ValueError, pa.ArrowException):  # unreadable: `shard_problem` says so
        metadata = {}
    held = shard_items_from_metadata(metadata)
    items = None if held is None else [Item(key=key, version=version, label=label) for key, version, label in held]
    return Shard(split=record.split, number=record.number, start=record.start, stop=record.stop, items=items)


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
