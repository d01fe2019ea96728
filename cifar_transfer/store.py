"""The reading API: a complete view of a feature set, a shard at a time or whole, and `load_features` for users.

Readers read only complete views (those with a manifest, `feature_records.split_manifest`); the catalogue
(`catalogue`) finds a set by fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from cifar_transfer import layout
from cifar_transfer.catalogue import find_feature_set
from cifar_transfer.feature_records import ShardRecord, split_manifest
from cifar_transfer.storage import Storage


class SplitBatch(NamedTuple):
    """The rows of one shard of a split: their ids, labels and features (flattened, or pooled when asked)."""

    index: np.ndarray  # type: ignore[assignment]  # the Parquet column's name (public API); hides tuple.index, unused
    labels: np.ndarray
    features: np.ndarray


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
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, label, features) of a complete split in index order, or of its rows at the sorted positions `rows`,
    into one preallocated array per column (the features into `out` when given: rows x width float32): memory is
    the size of the result plus one shard. `pooled=True` averages spatial maps over height and width."""
    manifest = split_manifest(storage, folder, split)
    shape = manifest.feature_shape
    width = shape[-1] if pooled else int(np.prod(shape))
    wanted = np.arange(manifest.rows) if rows is None else rows
    index = np.empty(len(wanted), np.int64)
    labels = np.empty(len(wanted), np.int64)
    features = np.empty((len(wanted), width), np.float32) if out is None else out
    if features.shape != (len(wanted), width) or features.dtype != np.float32:
        raise ValueError(f"read_split(out=...) needs a {len(wanted)} x {width} float32 array, not {features.shape} {features.dtype}")
    start = filled = 0
    for batch in iter_split(storage, folder, split, pooled):
        stop = start + len(batch.index)
        taken = wanted[(wanted >= start) & (wanted < stop)] - start
        index[filled : filled + len(taken)] = batch.index[taken]
        labels[filled : filled + len(taken)] = batch.labels[taken]
        features[filled : filled + len(taken)] = batch.features[taken]
        start, filled = stop, filled + len(taken)
    return index, labels, features


def read_keys(storage: Storage, folder: str, split: str) -> dict[int, str]:
    """A collection view's image names by row id (its `index`), reading only those two columns."""
    manifest = split_manifest(storage, folder, split)
    keys: dict[int, str] = {}
    for record in manifest.shards:
        with storage.fs.open(layout.shard_file(folder, split, record.file), "rb") as stream:
            table = pq.read_table(stream, columns=["index", "key"])
        keys.update(zip(table.column("index").to_pylist(), table.column("key").to_pylist(), strict=True))
    return keys


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
