"""The contract every collection source keeps: a cheap listing, then the bytes of the items a shard needs.

A collection (an image folder, a Parquet table of images) is never held in memory or copied: `list_items`
says what is there now (names, labels and a version that changes whenever an image's bytes may have
changed), and `read_items` streams the encoded bytes of just the items one shard holds. Decoding them
into pixels is `images.decode_image`'s job, the same for every source.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    from cifar_transfer.sources.files import NamedFiles

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


class UnlabelledReader(Protocol):
    """A format's images without labels (predict, similar): counted once, then read in order."""

    total: int
    path_width: int  # the widest row name, printed

    def rows(self) -> Iterator[tuple[str, bytes | None, str | None]]:
        """Each image's name with its encoded bytes, or None and the reason it could not be read; in order."""
        ...


class UnlabelledFormat(Protocol):
    """How a collection format reads images without labels from the files a SOURCE names (`sources.unlabelled`)."""

    wanted: str  # what it reads, in the message when a SOURCE holds nothing any format reads
    what: str  # what its files are, in the log line about the files a SOURCE holds beside them

    def select(self, named: NamedFiles) -> list[str]:
        """The files of `named` this format reads (none: it does not read this SOURCE)."""
        ...

    def __call__(self, named: NamedFiles, files: list[str], image_column: str | None, limit: int) -> UnlabelledReader:
        """Its reader of `files` (as `select` chose them), each image within `limit` bytes."""
        ...
