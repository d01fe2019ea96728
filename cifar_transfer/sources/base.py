"""The contract every collection source keeps: a cheap listing, then the bytes of the items a shard needs.

A collection (an image folder, a Parquet table of images) is never held in memory or copied: `list_items`
says what is there now (names, labels and a version that changes whenever an image's bytes may have
changed), and `read_items` streams the encoded bytes of just the items one shard holds. Decoding them
into pixels is `images.decode_image`'s job, the same for every source.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from pydantic import BaseModel

SPLITS = ("train", "test")


class Item(BaseModel):
    """One image of a collection."""

    key: str  # stable name within the collection: a path relative to the root, or "<file>#<row>" in a table
    label: int  # index into `Listing.classes`
    version: str  # changes whenever the bytes may have changed: size + mtime/ETag, or the table file's identity


class UnreadableItem(BaseModel):
    """An item whose bytes could not be read or decoded: skipped, counted and listed, never a crashed shard."""

    key: str
    reason: str


class Listing(BaseModel):
    """What a collection holds now. `identity` names the collection itself (format, root, split rule, classes),
    not its content, so a grown collection keeps its features' folder and only the new images are extracted."""

    classes: list[str]
    splits: dict[str, list[Item]]  # "train" and "test", each sorted by key
    identity: dict
    skipped: list[str] = []  # entries that are not images of a class (stray files, unknown layout), with the reason
    unusable: dict[str, list[UnreadableItem]] = {}  # by split: images with no usable label, listed beside the unreadable ones


class CollectionSource(Protocol):
    def list_items(self) -> Listing: ...

    def read_items(self, items: list[Item]) -> Iterator[tuple[Item, bytes | None, str | None]]:
        """Each item with its encoded bytes, or None and the reason it could not be read; in the order given."""
        ...
