"""The reading API: a complete view of a feature set, a shard at a time or whole, and `load_features` for users.

Readers read only complete views (those with a manifest, `feature_records.split_manifest`); the catalogue
(`catalogue`) finds a set by fingerprint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeVar

import numpy as np
import pyarrow.parquet as pq

from cifar_transfer import layout
from cifar_transfer.catalogue import find_feature_set
from cifar_transfer.feature_records import ShardRecord, split_manifest
from cifar_transfer.hardware import in_order_on_threads, usable_cores
from cifar_transfer.storage import Storage

# Shards read at once (`read_ahead`) hold about this much memory at most: a reading thread per core up to it.
READ_BYTES_IN_FLIGHT = 512 << 20
T = TypeVar("T")


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


def shard_bytes(records: Iterable[ShardRecord], width: int, views: int = 1) -> int:
    """About what reading the largest of `records` holds: its features as Arrow reads them and as numpy gives them."""
    return 2 * max((record.rows for record in records), default=0) * width * np.dtype(np.float32).itemsize * views


def read_ahead(count: int, read: Callable[[int], T], bytes_each: int, threads: int | None = None) -> Iterator[T]:
    """`read(0)`, ..., `read(count - 1)`, in that order, each reading one shard, on `threads` threads (default: one per
    usable core, as many as `READ_BYTES_IN_FLIGHT` holds reads of `bytes_each`), at most that many ahead of the one
    handed over. pyarrow's reads and numpy's copies release the GIL, so a split reads about as many times faster as
    there are cores: 50,000 rows of 4,096 features took 1.25-1.35 s on one of 2 cores and 0.76-0.83 s on both, and a
    head, a map or an audit on a machine of many cores would otherwise wait for one. A failure is raised in its turn,
    once the reads under way end; reads not begun are dropped, as they are when the caller stops early."""
    threads = min(count, threads or max(1, min(usable_cores(), READ_BYTES_IN_FLIGHT // max(bytes_each, 1))))
    return in_order_on_threads(range(count), read, threads, ahead=threads, name="shard-read")


def read_each(count: int, read: Callable[[int], None], bytes_each: int, threads: int | None = None) -> None:
    """`read_ahead` for reads that put their rows in place themselves."""
    deque(read_ahead(count, read, bytes_each, threads), maxlen=0)


def iter_split(storage: Storage, folder: str, split: str, pooled: bool = False) -> Iterator[SplitBatch]:
    """A complete split shard by shard, in index order, the next ones read meanwhile (`read_ahead`): memory holds a
    shard per reading thread besides the one handed over."""
    manifest = split_manifest(storage, folder, split)

    def read(shard: int) -> SplitBatch:
        return read_shard(storage, folder, split, manifest.shards[shard], manifest.feature_shape, pooled)

    yield from read_ahead(len(manifest.shards), read, shard_bytes(manifest.shards, int(np.prod(manifest.feature_shape))))


def read_split(
    storage: Storage,
    folder: str,
    split: str,
    pooled: bool = False,
    rows: np.ndarray | None = None,
    out: np.ndarray | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, label, features) of a complete split in index order, or of its rows at the sorted positions `rows`,
    into one preallocated array per column (the features into `out` when given: rows x width float32): memory is
    the size of the result plus a shard per reading thread (`threads`, default `read_each`'s). `pooled=True` averages
    spatial maps over height and width."""
    manifest = split_manifest(storage, folder, split)
    shape = manifest.feature_shape
    width = shape[-1] if pooled else int(np.prod(shape))
    wanted = np.arange(manifest.rows) if rows is None else rows
    index = np.empty(len(wanted), np.int64)
    labels = np.empty(len(wanted), np.int64)
    features = np.empty((len(wanted), width), np.float32) if out is None else out
    if features.shape != (len(wanted), width) or features.dtype != np.float32:
        raise ValueError(f"read_split(out=...) needs a {len(wanted)} x {width} float32 array, not {features.shape} {features.dtype}")
    starts = np.concatenate([[0], np.cumsum([record.rows for record in manifest.shards])]).astype(np.int64)
    filled = np.searchsorted(wanted, starts)  # where each shard's wanted rows begin in the result

    def place(shard: int) -> None:
        batch = read_shard(storage, folder, split, manifest.shards[shard], shape, pooled)
        low, high = filled[shard], filled[shard + 1]
        taken = wanted[low:high] - starts[shard]
        index[low:high], labels[low:high], features[low:high] = batch.index[taken], batch.labels[taken], batch.features[taken]

    read_each(len(manifest.shards), place, shard_bytes(manifest.shards, int(np.prod(shape))), threads)
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
