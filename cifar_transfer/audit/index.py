"""The nearest-neighbour index kept with a feature set, under `features/<set>/audit/index/` (`layout.index_files`).

Up to `exact_limit` rows the index is exact: nothing is stored but its record, and a search streams the shards and
takes matrix products of normalized vectors a block at a time (cosine similarity; a shard and the queries' top k in
memory). Above it, an HNSW graph from usearch (Apache-2.0): chosen over hnswlib (no release since 2023) and faiss-cpu
(a far larger wheel, no incremental save of one file) for its active releases, its one-file index that is added to
in place, and half-precision storage (f16: 2.5 GB for a million 1,280-float vectors instead of 5). Its recall against
the exact search is measured by `bench/audit.py` and the tests.

The record (`index.json`, written last) names the feature set's fingerprint and, per split, the SHA-256 of every shard
it holds. When a collection grows (its manifest lists new shards and keeps every old one) only the new shards' rows are
added; when a shard it holds was replaced or removed, or the fingerprint or the settings differ, it is rebuilt. A rerun
on unchanged features writes nothing.

Keys in the approximate index are `(split code << 40) | index`, stable as a collection grows (positions are not).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.audit.vectors import Block, SetRows
from cifar_transfer.sources.base import SPLITS
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)

EXACT_LIMIT = 200_000  # rows searched exactly; above this an approximate (HNSW) index is built
QUERY_BLOCK = 4096  # query rows compared with the whole set in one pass over its shards
SPLIT_BITS = 40
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 64


class IndexRecord(BaseModel):
    """What `index.json` says: which features it indexes, how, and which shards it holds."""

    fingerprint: str
    kind: Literal["exact", "usearch"]
    rows: int
    dimension: int
    shards: dict[str, list[str]]  # split -> the SHA-256 of each shard it holds, in manifest order
    library: str | None = None  # "usearch 2.26.6" for an approximate index
    dtype: str | None = None
    connectivity: int | None = None
    expansion_add: int | None = None
    expansion_search: int | None = None


@dataclass(frozen=True)
class IndexUpdate:
    record: IndexRecord
    change: Literal["reused", "written", "added", "rebuilt"]
    added: int  # rows added or indexed by this update


def encode_keys(splits: np.ndarray, index: np.ndarray) -> np.ndarray:
    codes = np.array([SPLITS.index(split) for split in splits], np.uint64)
    return (codes << np.uint64(SPLIT_BITS)) | index.astype(np.uint64)


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = keys.astype(np.uint64)
    codes = (keys >> np.uint64(SPLIT_BITS)).astype(np.int64)
    return np.array(SPLITS, dtype=object)[codes], (keys & np.uint64((1 << SPLIT_BITS) - 1)).astype(np.int64)


def read_index_record(storage: Storage, folder: str) -> IndexRecord | None:
    path = layout.index_files(folder).record
    if not storage.exists(path):
        return None
    try:
        return records.AUDIT_INDEX.load(IndexRecord, storage.read_bytes(path), storage.uri(path))
    except ValueError as exc:
        log.warning("rebuilding the index: %s is unreadable (%s)", storage.uri(path), str(exc).splitlines()[0])
        return None


def _usearch_version() -> str:
    from importlib.metadata import version

    return f"usearch {version('usearch')}"


def _new_index(dimension: int):
    from usearch.index import Index

    return Index(
        ndim=dimension, metric="cos", dtype="f16", connectivity=CONNECTIVITY, expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH
    )


def update_index(storage: Storage, folder: str, fingerprint: str, exact_limit: int = EXACT_LIMIT, threads: int = 0) -> IndexUpdate:
    """Bring the set's index up to its complete splits: reuse, add the new shards' rows, or rebuild."""
    rows = SetRows.open(storage, folder)
    shards = {split: [record.sha256 for record in manifest.shards] for split, manifest in rows.manifests.items()}
    files = layout.index_files(folder)
    old = read_index_record(storage, folder)
    if rows.rows <= exact_limit:
        record = IndexRecord(fingerprint=fingerprint, kind="exact", rows=rows.rows, dimension=rows.width, shards=shards)
        if old == record:
            return IndexUpdate(record, "reused", 0)
        storage.write_atomic(files.record, records.AUDIT_INDEX.dump(record))
        if storage.exists(files.vectors):
            storage.fs.rm(files.vectors)
        return IndexUpdate(record, "written", rows.rows)
    record = IndexRecord(
        fingerprint=fingerprint,
        kind="usearch",
        rows=rows.rows,
        dimension=rows.width,
        shards=shards,
        library=_usearch_version(),
        dtype="f16",
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )
    if old == record and storage.exists(files.vectors):
        return IndexUpdate(record, "reused", 0)
    grows = (
        old is not None
        and storage.exists(files.vectors)
        and old.model_dump(exclude={"rows", "shards", "library"}) == record.model_dump(exclude={"rows", "shards", "library"})
        and all(old.shards.get(split, []) == shards.get(split, [])[: len(old.shards.get(split, []))] for split in SPLITS)
        and set(old.shards) <= set(shards)
    )
    with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, "vectors.usearch")
        index = _new_index(rows.width)
        blocks: Iterator[Block]
        if grows:
            assert old is not None
            _fetch(storage, files.vectors, local)
            index.load(local)
            blocks = (
                block
                for split in rows.splits
                for block in rows.shard_blocks(split, list(range(len(old.shards.get(split, [])), len(shards[split]))))
            )
        else:
            blocks = rows.blocks()
        added = 0
        for block in blocks:
            index.add(encode_keys(np.full(len(block.index), block.split, dtype=object), block.index), block.vectors, threads=threads)
            added += len(block.index)
        index.save(local)
        del index
        with open(local, "rb") as source, storage.open_atomic(files.vectors, os.path.getsize(local)) as target:
            shutil.copyfileobj(source, target, 16 << 20)
    storage.write_atomic(files.record, records.AUDIT_INDEX.dump(record))
    log.info("nearest-neighbour index of %d rows: %s %d rows", rows.rows, "added" if grows else "built with", added)
    return IndexUpdate(record, "added" if grows else "rebuilt", added)


def _fetch(storage: Storage, path: str, local: str) -> None:
    with storage.fs.open(path, "rb") as source, open(local, "wb") as target:
        shutil.copyfileobj(source, target, 16 << 20)


def top_k(similarities: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best columns, best first: (their `positions`, a row per query, and similarities)."""
    k = min(k, similarities.shape[1])
    if k == 0:
        return np.zeros((len(similarities), 0), np.int64), np.zeros((len(similarities), 0), np.float32)
    best = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    taken = np.take_along_axis(similarities, best, axis=1)
    order = np.argsort(-taken, axis=1, kind="stable")
    return np.take_along_axis(np.take_along_axis(positions, best, axis=1), order, axis=1), np.take_along_axis(taken, order, axis=1)


def merge(
    found: tuple[np.ndarray, np.ndarray] | None, positions: np.ndarray, similarities: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of what was found so far and a block's (positions: one row of column positions per query)."""
    if found is not None:
        positions = np.concatenate([found[0], positions], axis=1)
        similarities = np.concatenate([found[1], similarities], axis=1)
    return top_k(similarities, positions, k)


def exact_search(rows: SetRows, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of the set most like each normalized query, by streaming the shards: (positions, cosine similarities).
    `exclude` gives each query's own position (or -1), never returned."""
    found: tuple[np.ndarray, np.ndarray] | None = None
    for block in rows.blocks():
        similarities = queries @ block.vectors.T
        columns = np.arange(block.start, block.stop)
        if exclude is not None:
            similarities[(exclude[:, None] == columns[None, :])] = -np.inf
        block_best = top_k(similarities, np.broadcast_to(columns, similarities.shape), k)
        found = merge(found, *block_best, k)
    if found is None:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    return found


class Searcher:
    """Searches a set through its index: exact, or the approximate index's file (loaded once, memory-mapped when local)."""

    def __init__(self, storage: Storage, folder: str, record: IndexRecord):
        self.rows = SetRows.open(storage, folder)
        self.record = record
        self._index = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._positions: dict[tuple[str, int], int] | None = None
        if record.kind == "usearch":
            path = layout.index_files(folder).vectors
            index = _new_index(record.dimension)
            if storage.is_local:
                index.view(path)
            else:
                self._scratch = tempfile.TemporaryDirectory()
                local = os.path.join(self._scratch.name, "vectors.usearch")
                _fetch(storage, path, local)
                index.view(local)
            self._index = index

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions, similarities) of each normalized query's k nearest rows, best first (-1 where fewer exist)."""
        if self._index is None:
            return exact_search(self.rows, queries, k, exclude)
        wanted = k + (exclude is not None)
        matches = self._index.search(queries, wanted, threads=0)
        keys = np.asarray(matches.keys).reshape(len(queries), -1)
        distances = np.asarray(matches.distances, np.float32).reshape(len(queries), -1)
        splits, index = decode_keys(keys.ravel())
        lookup = self.positions()
        positions = np.array([lookup.get((split, int(number)), -1) for split, number in zip(splits, index, strict=True)], np.int64)
        positions = positions.reshape(keys.shape)
        similarities = 1.0 - distances
        if exclude is not None:
            similarities[positions == exclude[:, None]] = -np.inf
        similarities[positions < 0] = -np.inf
        return top_k(similarities, positions, k)

    def positions(self) -> dict[tuple[str, int], int]:
        if self._positions is None:
            splits, index, _ = self.rows.names()
            self._positions = {(split, int(number)): position for position, (split, number) in enumerate(zip(splits, index, strict=True))}
        return self._positions

    def close(self) -> None:
        self._index = None
        if self._scratch is not None:
            self._scratch.cleanup()


def all_neighbours(storage: Storage, folder: str, record: IndexRecord, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k nearest other rows, by position: (rows x k positions, rows x k similarities), best first."""
    searcher = Searcher(storage, folder, record)
    try:
        positions, similarities = [], []
        for block in searcher.rows.grouped(QUERY_BLOCK):
            found = searcher.search(block.vectors, k, exclude=np.arange(block.start, block.stop))
            positions.append(found[0])
            similarities.append(found[1])
        return np.concatenate(positions), np.concatenate(similarities).astype(np.float32)
    finally:
        searcher.close()
