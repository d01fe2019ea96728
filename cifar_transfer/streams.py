"""Features of a split as heads read them: shard by shard, never a whole split in memory.

A `FeatureStream` is one split of a feature set (with its mirrored view when
heads use flips) and a selection of its rows (the fit or the validation part);
it yields `ViewBatch`es of at most one shard, in index order or shuffled (a
seeded shard order, rows mixed within a window of shards). `held` reads a split
once into one array per column when it fits in `HELD_BYTES`, so heads that pass over
the rows many times (moments, validation, L-BFGS steps, the refit, predictions)
read the Parquet shards once instead of once per pass; above it they stream. Parts
of a held split laid out together (the fit and validation parts) are views of it,
not copies: fresh memory is what the head stage paid for most. `Moments` are the
streamed statistics the heads need (mean, variance, centred Gram, per-class
target sums); they add up, so the moments of all train rows are the fit part's
plus the validation part's, which makes a refit on all rows free.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from cifar_transfer.errors import FeatureSetError
from cifar_transfer.feature_records import ShardRecord, read_manifest, split_manifest
from cifar_transfer.shards import FLIPPED
from cifar_transfer.storage import Storage
from cifar_transfer.store import read_ahead, read_each, read_shard, shard_bytes

SHUFFLE_WINDOW = 4  # shards mixed together when training rows are shuffled
HELD_BYTES = 1 << 30  # a split whose rows (both views) take at most this is kept in memory by `held`


@dataclass(frozen=True)
class ViewBatch:
    """Rows of a split: their positions in it, ids, labels, features (flattened) and the mirrored view's (or None)."""

    positions: np.ndarray
    index: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    mirrored: np.ndarray | None = None

    def rows(self, start: int, stop: int) -> ViewBatch:
        """Rows `start:stop`, as views."""
        part = slice(start, stop)
        mirrored = None if self.mirrored is None else self.mirrored[part]
        return ViewBatch(self.positions[part], self.index[part], self.labels[part], self.features[part], mirrored)

    def take(self, rows: np.ndarray) -> ViewBatch:
        return ViewBatch(
            self.positions[rows],
            self.index[rows],
            self.labels[rows],
            self.features[rows],
            None if self.mirrored is None else self.mirrored[rows],
        )

    @property
    def views(self) -> list[np.ndarray]:
        """The features of each view these rows have: the original, and the mirrored one when read."""
        return [self.features] if self.mirrored is None else [self.features, self.mirrored]

    def training_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """What a head fits on: both views as separate examples (augmentation) when there are two."""
        if self.mirrored is None:
            return self.features, self.labels
        return np.concatenate([self.features, self.mirrored]), np.concatenate([self.labels, self.labels])

    def probabilities(self, predict) -> np.ndarray:
        """`predict` on the features, averaged with the mirrored view's when there is one (test-time augmentation)."""
        return sum(predict(view) for view in self.views) / len(self.views)


@dataclass(frozen=True)
class FeatureStream:
    """A split of a feature set (and its mirrored view when `mirrored`), restricted to the rows `selected` marks."""

    storage: Storage
    folder: str
    split: str
    rows: int
    feature_shape: tuple[int, ...]
    shards: tuple[ShardRecord, ...]  # the split's, in index order
    mirrored_shards: tuple[ShardRecord, ...] | None  # the mirrored view's, shard for shard (None: no mirrored view read)
    selected: np.ndarray | None = None  # a mask over the split's rows; None: all of them
    # The selected rows in memory (`held`), in runs each sorted by position; None: read from storage.
    memory: ViewBatch | None = None

    @classmethod
    def open(cls, storage: Storage, folder: str, split: str, mirrored: bool) -> FeatureStream:
        manifest, flipped = split_manifest(storage, folder, split), None
        if mirrored:
            view = f"{split}{FLIPPED}"
            flipped = read_manifest(storage, folder, view)
            if flipped is None:
                raise FeatureSetError(
                    f"features {posixpath.basename(folder)} have no complete {view} view: run extraction with --flip first"
                )
            if [record.rows for record in flipped.shards] != [record.rows for record in manifest.shards]:
                raise _mismatched_views(folder, split)
        return cls(
            storage,
            folder,
            split,
            manifest.rows,
            tuple(manifest.feature_shape),
            tuple(manifest.shards),
            None if flipped is None else tuple(flipped.shards),
        )

    @property
    def mirrored(self) -> bool:
        return self.mirrored_shards is not None

    @property
    def width(self) -> int:
        return int(np.prod(self.feature_shape))

    @property
    def count(self) -> int:
        return self.rows if self.selected is None else int(self.selected.sum())

    def select(self, mask: np.ndarray) -> FeatureStream:
        """The rows `mask` marks (of the whole split). A held split's selection is held too: a view when its rows lie
        together in memory (`held`'s `order` put them so), else a copy of them."""
        if self.memory is None or self.selected is not None:
            return replace(self, selected=mask, memory=None)
        rows = np.flatnonzero(mask[self.memory.positions])
        together = len(rows) == 0 or rows[-1] - rows[0] + 1 == len(rows)
        memory = self.memory.rows(int(rows[0]), int(rows[-1]) + 1) if together and len(rows) else self.memory.take(rows)
        return replace(self, selected=mask, memory=memory)

    def held(self, budget: int = HELD_BYTES, order: np.ndarray | None = None, threads: int | None = None) -> FeatureStream:
        """This stream with its rows read once into memory when they take at most `budget` bytes, else itself; its
        shards are read on `threads` threads (default: `store.read_each`'s).

        `order`: the positions of the selected rows in the order memory keeps them (default: by position). Parts
        a caller will `select` laid out one after another, each by position, are then views of it."""
        size = self.count * self.width * np.dtype(np.float32).itemsize * (2 if self.mirrored else 1)
        if self.memory is not None or size > budget:
            return self
        wanted = np.arange(self.rows) if self.selected is None else np.flatnonzero(self.selected)
        order = wanted if order is None else np.asarray(order, np.int64)
        if not np.array_equal(np.sort(order), wanted):
            raise ValueError("held(order=...) must list each selected row's position once")
        slot = np.empty(self.rows, np.int64)
        slot[order] = np.arange(len(order))
        memory = ViewBatch(
            order,
            np.empty(len(order), np.int64),
            np.empty(len(order), np.int64),
            np.empty((len(order), self.width), np.float32),
            np.empty((len(order), self.width), np.float32) if self.mirrored else None,
        )

        def place(shard: int) -> None:
            batch = self._read(shard)
            where = run_or_rows(slot[batch.positions])
            memory.index[where], memory.labels[where], memory.features[where] = batch.index, batch.labels, batch.features
            if memory.mirrored is not None:
                memory.mirrored[where] = batch.mirrored

        read_each(len(self.shards), place, self._read_bytes, threads)
        return replace(self, memory=memory)

    def blocks(self, max_bytes: int) -> Iterator[ViewBatch]:
        """The selected rows in blocks of about `max_bytes` of features, in no set order: views of a held stream's
        memory, else shards read in index order."""
        if self.memory is None:
            yield from self.batches()
            return
        step = max(1, max_bytes // max(1, self.memory.features[:1].nbytes))
        for start in range(0, len(self.memory.index), step):
            yield self.memory.rows(start, start + step)

    def batches(self, seed: int | None = None) -> Iterator[ViewBatch]:
        """The selected rows, a shard at a time: in index order, or with `seed` shuffled within a window of shards."""
        count = len(self.shards)
        order = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)
        window = 1 if seed is None else SHUFFLE_WINDOW
        rng = np.random.default_rng(seed)
        # Shards in memory are views: only those read from storage are worth threads.
        reads = read_ahead(count, lambda number: self._read(order[number]), self._read_bytes, 1 if self.memory is not None else None)
        for start in range(0, count, window):
            batch = concatenate([next(reads) for _ in order[start : start + window]])
            if batch is None:
                continue
            if seed is not None:
                batch = batch.take(rng.permutation(len(batch.index)))
            yield batch

    def _read(self, shard: int) -> ViewBatch:
        if self.memory is not None:
            return self._held_shard(shard)
        shape = list(self.feature_shape)
        original = read_shard(self.storage, self.folder, self.split, self.shards[shard], shape)
        flipped = None
        if self.mirrored_shards is not None:
            flipped = read_shard(self.storage, self.folder, f"{self.split}{FLIPPED}", self.mirrored_shards[shard], shape)
            if not np.array_equal(flipped.index, original.index):
                raise _mismatched_views(self.folder, self.split)
        positions = self._offsets[shard] + np.arange(len(original.index))
        batch = ViewBatch(positions, original.index, original.labels, original.features, None if flipped is None else flipped.features)
        return batch if self.selected is None else batch.take(np.flatnonzero(self.selected[positions]))

    def _held_shard(self, shard: int) -> ViewBatch:
        """A shard's rows from memory, by position: a view when memory keeps them in one sorted run."""
        assert self.memory is not None
        low, high = self._offsets[shard], self._offsets[shard] + self.shards[shard].rows
        positions = self.memory.positions
        if self._memory_sorted:
            start, stop = np.searchsorted(positions, [low, high])
            return self.memory.rows(int(start), int(stop))
        rows = np.flatnonzero((positions >= low) & (positions < high))
        return self.memory.take(rows[np.argsort(positions[rows], kind="stable")])

    @functools.cached_property
    def _read_bytes(self) -> int:
        """What reading one of its shards (both views) holds at most: `store.read_ahead` sizes its threads by it."""
        return shard_bytes(self.shards, self.width, 2 if self.mirrored else 1)

    @functools.cached_property
    def _memory_sorted(self) -> bool:
        return self.memory is not None and bool(np.all(np.diff(self.memory.positions) > 0))

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([record.rows for record in self.shards])[:-1]]).astype(np.int64)


def run_or_rows(rows: np.ndarray) -> slice | np.ndarray:
    """`rows` as a slice when they are one increasing run (a shard read in order): copying rows into a slice runs at
    memory speed, into an index array at about half of it (0.36-0.40 s against 0.63-0.70 s for 50,000 rows of 4,096)."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and bool(np.all(np.diff(rows) == 1)):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _mismatched_views(folder: str, split: str) -> FeatureSetError:
    return FeatureSetError(f"{split}{FLIPPED} of {posixpath.basename(folder)} does not match {split} row for row: run verify --repair")


def concatenate(batches: list[ViewBatch]) -> ViewBatch | None:
    """The rows of `batches` as one batch (None when they have none)."""
    batches = [batch for batch in batches if len(batch.index)]
    if not batches:
        return None
    if len(batches) == 1:
        return batches[0]
    mirrored = None if batches[0].mirrored is None else np.concatenate([batch.mirrored for batch in batches])
    return ViewBatch(
        np.concatenate([batch.positions for batch in batches]),
        np.concatenate([batch.index for batch in batches]),
        np.concatenate([batch.labels for batch in batches]),
        np.concatenate([batch.features for batch in batches]),
        mirrored,
    )


def validation_mask(rows: int, fraction: float, seed: int) -> np.ndarray:
    """The seeded validation part of a train split of `rows` rows, as a mask (the same rows the heads always held out)."""
    order = np.random.default_rng(seed).permutation(rows)
    mask = np.zeros(rows, bool)
    mask[order[: max(1, int(round(rows * fraction)))]] = True
    return mask


def gram(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """rows^T rows written into `out` (row-major, rows' dtype) by numpy's product of a matrix with its own transpose:
    BLAS `syrk` (half a matrix product's work) and a copy of its triangle, with the GIL released. scipy's `syrk`
    wrapper is as fast alone but holds the GIL throughout: beside the map, whose optimizer needs the GIL between its
    native steps, it stalled the map for 7.3 s of a 32 s analysis. `out` is reused: a width² result is fresh memory
    at every call otherwise."""
    return np.dot(rows.T, rows, out=out)


def _kept_rows(
    kept: tuple[np.ndarray, np.ndarray] | None, rows: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """`kept` with `rows` added, while the `count` rows so far are fewer than the features; else None."""
    if kept is None or count >= rows.shape[1]:
        return None
    return np.concatenate([kept[0], rows.astype(np.float32)]), np.concatenate([kept[1], np.asarray(labels, np.int64)])


@dataclass
class Sums:
    """The sums of the rows added so far, around `shift` (the first batch's mean), in float64."""

    shift: np.ndarray
    total: np.ndarray  # sum of (x - shift)
    squares: np.ndarray  # sum of (x - shift)^2
    gram: np.ndarray | None  # sum of (x - shift)(x - shift)^T, when asked for
    class_totals: np.ndarray  # (classes, width): sum of (x - shift) per class
    class_counts: np.ndarray
    # The rows themselves, (x - shift) in float32 with their labels, while there are fewer of them than features:
    # then the Gram matrix has low rank and a solve from the rows is far cheaper (`ridge.solve`); None above that.
    rows: tuple[np.ndarray, np.ndarray] | None = None
    # Work arrays reused by every addition (the shifted rows, their Gram matrix): fresh memory is slow, and at 4,096
    # features each addition's temporaries were 200 MB.
    work: dict[str, np.ndarray] = field(default_factory=dict)

    def scratch(self, features: np.ndarray) -> np.ndarray:
        """Where `features - shift` go: at least as many rows, reused."""
        dtype = np.result_type(features, self.shift)
        held = self.work.get("shifted")
        if held is None or held.dtype != dtype or len(held) < len(features):
            held = self.work["shifted"] = np.empty(features.shape, dtype)
        return held[: len(features)]

    def block_gram(self, dtype: np.dtype) -> np.ndarray:
        """Where one addition's Gram matrix goes (row-major, as `gram` writes it), reused."""
        held = self.work.get("gram")
        if held is None or held.dtype != dtype:
            assert self.gram is not None
            held = self.work["gram"] = np.empty(self.gram.shape, dtype)
        return held


@dataclass
class Moments:
    """Streamed sums of features (pooled or not, as added), their outer products and per-class sums.

    Sums run on features shifted by the first batch's mean, in float64 across batches, so the centred
    Gram matrix keeps its precision however many rows are added.
    """

    classes: int
    with_gram: bool = True
    count: int = 0
    sums: Sums | None = None  # None until a row is added

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        if not len(features):
            return
        if self.sums is None:
            width = features.shape[1]
            self.sums = Sums(
                shift=features.mean(axis=0, dtype=np.float64).astype(np.float32),
                total=np.zeros(width),
                squares=np.zeros(width),
                gram=np.zeros((width, width)) if self.with_gram else None,
                class_totals=np.zeros((self.classes, width)),
                class_counts=np.zeros(self.classes),
                rows=(np.zeros((0, width), np.float32), np.zeros(0, np.int64)) if self.with_gram else None,
            )
        sums = self.sums
        shifted = np.subtract(features, sums.shift, out=sums.scratch(features))
        self.count += len(features)
        sums.total += shifted.sum(axis=0, dtype=np.float64)
        if sums.gram is not None:
            sums.gram += gram(shifted, sums.block_gram(shifted.dtype))
            sums.rows = _kept_rows(sums.rows, shifted, labels, self.count)
        one_hot = np.eye(self.classes, dtype=np.float32)[labels]
        sums.class_totals += (shifted.T @ one_hot).T  # (one_hot.T @ shifted took twice as long in OpenBLAS)
        sums.class_counts += one_hot.sum(axis=0)
        sums.squares += np.square(shifted, out=shifted).sum(axis=0, dtype=np.float64)  # last: squares in place

    def __add__(self, other: Moments) -> Moments:
        if self.sums is None:
            return other
        if other.sums is None:
            return self
        mine, theirs = self.sums, other.sums
        delta = (theirs.shift - mine.shift).astype(np.float64)  # re-express `other`'s sums around this shift
        total = theirs.total + other.count * delta
        squares = theirs.squares + 2 * delta * theirs.total + other.count * delta**2
        gram = None
        if mine.gram is not None and theirs.gram is not None:
            gram = (
                mine.gram
                + theirs.gram
                + np.outer(theirs.total, delta)
                + np.outer(delta, theirs.total)
                + other.count * np.outer(delta, delta)
            )
        class_totals = mine.class_totals + theirs.class_totals + np.outer(theirs.class_counts, delta)
        rows = None
        if gram is not None and mine.rows is not None and theirs.rows is not None:
            rows = _kept_rows(mine.rows, theirs.rows[0] + delta.astype(np.float32), theirs.rows[1], self.count + other.count)
        counts = mine.class_counts + theirs.class_counts
        sums = Sums(mine.shift, mine.total + total, mine.squares + squares, gram, class_totals, counts, rows)
        return Moments(self.classes, gram is not None, self.count + other.count, sums)

    def centred_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows minus their mean, labels) while fewer rows than features were added; else None."""
        if self.sums is None or self.sums.rows is None:
            return None
        shifted, labels = self.sums.rows
        return shifted - (self.sums.total / self.count).astype(np.float32), labels

    @property
    def _sums(self) -> Sums:
        if self.sums is None:
            raise ValueError("no rows were added to these moments")
        return self.sums

    @property
    def mean(self) -> np.ndarray:
        return self._sums.shift + self._sums.total / self.count

    @property
    def variance(self) -> np.ndarray:
        centred = self._sums.total / self.count
        return np.maximum(self._sums.squares / self.count - centred**2, 0.0)

    def covariance(self, scratch: np.ndarray | None = None) -> np.ndarray:
        """The covariance matrix. `scratch`, a width² float64 array, holds the temporary: a fresh one is slow memory,
        at 4,096 features 134 MB."""
        if self._sums.gram is None:
            raise ValueError("these moments were summed without their Gram matrix (with_gram=False)")
        centred = self._sums.total / self.count
        covariance = self._sums.gram / self.count
        scratch = np.empty_like(covariance) if scratch is None else scratch
        np.multiply(centred[:, None], centred[None, :], out=scratch)
        covariance -= scratch
        return covariance

    def target_covariance(self) -> np.ndarray:
        """(width, classes): the covariance of each feature with each class's one-hot indicator."""
        centred = self._sums.total / self.count
        return (self._sums.class_totals - np.outer(self._sums.class_counts, centred)).T / self.count

    @property
    def class_frequencies(self) -> np.ndarray:
        return self._sums.class_counts / self.count
