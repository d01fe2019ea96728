"""A feature set's rows as the audit reads them: train then test, pooled to vectors and normalized, a shard at a time.

A row's position is its place in that order (train's rows first); its name is `(split, index)`, and its key the
collection's image name (an archive's rows have none: `<split>/<index>`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from cifar_transfer import layout
from cifar_transfer.feature_records import Manifest, read_manifest
from cifar_transfer.sources.base import SPLITS
from cifar_transfer.storage import Storage
from cifar_transfer.store import iter_split, read_shard


def normalized(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity is then a dot product); all-zero rows stay zero."""
    features = np.asarray(features, np.float32)
    return features / np.maximum(row_norms(features), 1e-12)[:, None]


def row_norms(rows: np.ndarray) -> np.ndarray:
    """Each row's Euclidean length, without `np.linalg.norm`'s squared copy of all the rows (410 MB of new memory at
    25,000 rows of 4,096 features: 4.2 s of a 13 s neighbour search where numpy's huge-page advice stalled)."""
    from sklearn.utils.extmath import row_norms as lengths

    return lengths(rows)


@dataclass(frozen=True)
class Block:
    """Consecutive rows of the set: their positions start at `start`."""

    split: str
    start: int
    index: np.ndarray
    labels: np.ndarray
    vectors: np.ndarray  # normalized, pooled

    @property
    def stop(self) -> int:
        return self.start + len(self.index)


@dataclass(frozen=True)
class SetRows:
    """The complete splits of a feature set, in the audit's order, with what names their rows."""

    storage: Storage
    folder: str
    manifests: dict[str, Manifest]  # split -> its manifest, in SPLITS order

    @classmethod
    def open(cls, storage: Storage, folder: str) -> SetRows:
        manifests = {split: manifest for split in SPLITS if (manifest := read_manifest(storage, folder, split)) is not None}
        return cls(storage, folder, manifests)

    @property
    def splits(self) -> list[str]:
        return list(self.manifests)

    @property
    def rows(self) -> int:
        return sum(manifest.rows for manifest in self.manifests.values())

    @property
    def width(self) -> int:
        shape = next(iter(self.manifests.values())).feature_shape
        return int(shape[-1])

    def offsets(self) -> dict[str, int]:
        """Each split's first position."""
        offsets, start = {}, 0
        for split, manifest in self.manifests.items():
            offsets[split], start = start, start + manifest.rows
        return offsets

    def blocks(self, splits: list[str] | None = None) -> Iterator[Block]:
        """Every row a shard at a time, in order (pooled: a spatial map is averaged over height and width)."""
        offsets = self.offsets()
        for split in splits or self.splits:
            start = offsets[split]
            for batch in iter_split(self.storage, self.folder, split, pooled=True):
                yield Block(split, start, batch.index, batch.labels, normalized(batch.features))
                start += len(batch.index)

    def shard_blocks(self, split: str, shard_numbers: list[int]) -> Iterator[Block]:
        """The rows of some shards of a split (by their place in its manifest), with their positions."""
        manifest = self.manifests[split]
        start = self.offsets()[split]
        for number, record in enumerate(manifest.shards):
            if number in shard_numbers:
                batch = read_shard(self.storage, self.folder, split, record, manifest.feature_shape, pooled=True)
                yield Block(split, start, batch.index, batch.labels, normalized(batch.features))
            start += record.rows

    def grouped(self, rows: int) -> Iterator[Block]:
        """`blocks`, gathered into blocks of about `rows` rows (at least one shard) within a split: fewer passes over
        the set when every block is compared with all of it."""
        pending: list[Block] = []
        for block in self.blocks():
            if pending and (pending[0].split != block.split or sum(len(item.index) for item in pending) + len(block.index) > rows):
                yield _joined(pending)
                pending = []
            pending.append(block)
        if pending:
            yield _joined(pending)

    def names(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(split, index, label) of every row, by position (reads only those two columns of each shard)."""
        splits, index, labels = [], [], []
        for split, manifest in self.manifests.items():
            for record in manifest.shards:
                with self.storage.fs.open(layout.shard_file(self.folder, split, record.file), "rb") as stream:
                    table = pq.read_table(stream, columns=["index", "label"])
                splits.append(np.full(table.num_rows, split, dtype=object))
                index.append(table.column("index").to_numpy())
                labels.append(table.column("label").to_numpy())
        if not index:
            return np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(splits), np.concatenate(index).astype(np.int64), np.concatenate(labels).astype(np.int64)


def _joined(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    return Block(
        blocks[0].split,
        blocks[0].start,
        np.concatenate([block.index for block in blocks]),
        np.concatenate([block.labels for block in blocks]),
        np.concatenate([block.vectors for block in blocks]),
    )
