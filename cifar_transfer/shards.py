"""The shard plan: each view of each split cut into fixed slices, the unit of extraction, storage and resume, and
what a shard holds (an archive's `RowRange`, a collection's `ItemList`), which says what its file must carry."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from cifar_transfer import layout
from cifar_transfer.sources.base import SPLITS, Item, UnreadableItem

FLIPPED = "-flipped"
# Every view of the data a feature set may hold: the splits, and their horizontal mirrors
# (feature-level augmentation: extracted once, stored beside the originals as splits of their own).
VIEWS = (*SPLITS, *(f"{split}{FLIPPED}" for split in SPLITS))


class ShardRows(NamedTuple):
    """What one shard's rows are, before their features: labels and ids, and for a collection its items."""

    labels: np.ndarray  # int64, row for row
    ids: np.ndarray  # int64: the `index` column (the row's position in an archive split; a stable id in a collection)
    items: list[Item] | None = None  # a collection shard's decoded items, row for row
    skipped: list[UnreadableItem] = []  # a collection shard's items that could not be read or decoded


class ShardContent(Protocol):
    """What a shard holds, and what that means for its file: the identity a finished file must carry, what it
    writes beyond index, label and features, and whether a file cut with another shard size can be told apart."""

    def footer(self, rows: ShardRows) -> tuple[dict, dict[str, pa.Array]]:
        """The metadata and columns the shard's file holds beyond every shard's (`shard_files.shard_table`)."""
        ...

    def mismatch(self, rows: int, metadata: dict) -> str | None:
        """Why a file of these features with `rows` rows and this footer `metadata` is not this shard, or None."""
        ...

    def other_shard_size(self, metadata: dict) -> int | None:
        """The shard size a file of these features with this footer was cut with, when it is not this one's."""
        ...


@dataclass(frozen=True)
class RowRange:
    """An archive's shard: the rows [start, stop) of its decoded arrays, every one of them in its file."""

    start: int
    stop: int

    def footer(self, rows: ShardRows) -> tuple[dict, dict[str, pa.Array]]:
        return {}, {}  # the footer's start and stop say it all

    def mismatch(self, rows: int, metadata: dict) -> str | None:
        if (rows, metadata.get("start"), metadata.get("stop")) == (self.stop - self.start, self.start, self.stop):
            return None
        return f"holds rows {metadata.get('start')}..{metadata.get('stop')} ({rows}), expected {self.start}..{self.stop}"

    def other_shard_size(self, metadata: dict) -> int | None:
        if (metadata.get("start"), metadata.get("stop")) == (self.start, self.stop):
            return None
        return metadata["stop"] - metadata["start"]  # archives are cut into fixed ranges: other bounds, another size


@dataclass(frozen=True)
class ItemList:
    """A collection's shard: the items it was planned with, whose rows get the ids start, start + 1, ... (stable while
    the shard is kept); its file holds the decodable ones (an item that cannot be decoded leaves its id unused)."""

    start: int
    items: list[Item]

    @property
    def digest(self) -> str:
        """What the shard holds (names, versions, labels): a finished file must carry the same digest."""
        return hashlib.sha256("\n".join(f"{item.key}\t{item.version}\t{item.label}" for item in self.items).encode()).hexdigest()[:32]

    def footer(self, rows: ShardRows) -> tuple[dict, dict[str, pa.Array]]:
        assert rows.items is not None, "a collection shard's rows carry its items (collection.shard_rows)"
        metadata = {
            "items_digest": self.digest,
            "items": [[item.key, item.version, item.label] for item in self.items],
            "skipped": [entry.model_dump() for entry in rows.skipped],
        }
        columns = {
            "key": pa.array([item.key for item in rows.items], pa.string()),
            "version": pa.array([item.version for item in rows.items], pa.string()),
        }
        return metadata, columns

    def mismatch(self, rows: int, metadata: dict) -> str | None:
        if (metadata.get("start"), metadata.get("items_digest")) == (self.start, self.digest):
            return None  # its rows are the decodable ones among the items, however many that is
        return "holds other images than planned (the collection changed, or another plan wrote it)"

    def other_shard_size(self, metadata: dict) -> int | None:
        return None  # a collection's shards differ in size by design: other bounds are another plan, not another size


class Shard(BaseModel):
    """A fixed slice of one view of a split: the unit of extraction, storage and resume.

    What it holds (`content`) is an archive's `RowRange` or a collection's `ItemList`; stored (in task
    parameters and plans) as the row range with the `items`, if any, as it always was.
    """

    split: str  # "train", "test", or a mirrored view such as "train-flipped"
    number: int
    start: int
    stop: int
    items: list[Item] | None = None

    @property
    def content(self) -> ShardContent:
        """What the shard holds, read from its stored form: the one place that tells the two apart."""
        return RowRange(self.start, self.stop) if self.items is None else ItemList(self.start, self.items)

    @property
    def source_split(self) -> str:
        return self.split.removesuffix(FLIPPED)

    @property
    def flipped(self) -> bool:
        return self.split.endswith(FLIPPED)

    @property
    def name(self) -> str:
        return f"{self.split}/{self.number:05d}"

    @property
    def file_name(self) -> str:
        return layout.shard_file_name(self.number)

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(sizes: dict[str, int], shard_size: int, flip: bool = False) -> list[Shard]:
    """Cut each split into consecutive shards of `shard_size` images (the last may be smaller).

    With `flip`, the mirrored views follow the originals, so the originals are complete first.
    """
    views = {**sizes, **({f"{split}{FLIPPED}": size for split, size in sizes.items()} if flip else {})}
    return [
        Shard(split=view, number=number, start=start, stop=min(start + shard_size, size))
        for view, size in views.items()
        for number, start in enumerate(range(0, size, shard_size))
    ]
