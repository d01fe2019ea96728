"""The shard plan: each view of each split cut into fixed slices, the unit of extraction, storage and resume."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel

from cifar_transfer import layout
from cifar_transfer.sources.base import SPLITS, Item

FLIPPED = "-flipped"
# Every view of the data a feature set may hold: the splits, and their horizontal mirrors
# (feature-level augmentation: extracted once, stored beside the originals as splits of their own).
VIEWS = (*SPLITS, *(f"{split}{FLIPPED}" for split in SPLITS))


class Shard(BaseModel):
    """A fixed slice of one view of a split: the unit of extraction, storage and resume.

    An archive's shard is the rows [start, stop) of its decoded arrays. A collection's shard is a list of
    `items`, whose rows get the ids start, start + 1, ... (stable while the shard is kept; an item that cannot
    be decoded leaves its id unused).
    """

    split: str  # "train", "test", or a mirrored view such as "train-flipped"
    number: int
    start: int
    stop: int
    items: list[Item] | None = None

    @property
    def items_digest(self) -> str | None:
        """What a collection shard holds (names, versions, labels): a finished file must carry the same digest."""
        if self.items is None:
            return None
        return hashlib.sha256("\n".join(f"{item.key}\t{item.version}\t{item.label}" for item in self.items).encode()).hexdigest()[:32]

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
