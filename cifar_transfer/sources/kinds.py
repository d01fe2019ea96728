"""What each kind of source (an archive, a collection) means for the feature sets made from it, and the registry
that picks one.

A kind is how a source's images reach the backbone: a CIFAR archive is decoded once into arrays (`dataset.py`),
a collection (an image folder, a Parquet table) is listed cheaply and read image by image (`collection.py`).
Three shapes say all the rest of the pipeline needs, so no stage asks which kind it has:

- `prepared.SourceDataset`, a source made ready for extraction (a decoded archive, a listed collection): its
  identity and classes, its shard plan, the images of a shard, the first images to calibrate a precision on, and
  what its feature set records about it.
- `SourceKind`, what a kind means for a feature set made from it, read back from that set's record: whether its
  features get versions, the card's wording and columns, predict's input size, the options it needs. What a kind
  keeps in storage and how a rebuild reads it again is `stored.StoredSource`'s, a level up (it reads decoded
  arrays, listings and keys), so this module imports nothing the configuration imports.

Adding a collection format is one `CollectionSource` module and one entry in `collection.COLLECTION_FORMATS`;
adding a kind is one `SourceKind` here, one `StoredSource` in `stored.py` and its preparation steps in
`tasks/sources.py`.
"""

from __future__ import annotations

from typing import Protocol

from cifar_transfer.cifar import ARCHIVE_FORMATS, IMAGE_SHAPE
from cifar_transfer.redact import redact
from cifar_transfer.sources import detect

OFFICIAL_URLS = frozenset(archive_format.official_url for archive_format in ARCHIVE_FORMATS.values())


class ReadAgain(Protocol):
    """What a feature set records of how to read its source again (`config.CollectionSettings`), as far as a kind reads it."""

    source: str


class SourceKind(Protocol):
    """What a kind of source means for the feature sets made from it."""

    name: str
    # Its images may change under one fingerprint: its features get versions (`content_version`, retired
    # shards), and the images it could not read are listed in `<view>/_skipped.json`.
    incremental: bool
    index_meaning: str  # what a row's `index` is, for the card
    item_columns: tuple[tuple[str, str], ...]  # (name, Arrow type) of the columns its shards hold beyond index, label, features
    item_columns_note: tuple[str, ...]  # the card's lines on those columns

    def check(self, source: str, md5: str | None) -> None:
        """Refuse options this kind cannot work with (raises ValueError with the fix)."""
        ...

    def title(self, dataset_id: str, collection: ReadAgain | None) -> str:
        """Where a feature set's images came from, in a sentence of its card (from its record: `collection`, None for an archive)."""
        ...

    def predict_size(self, input_size: int) -> int:
        """The side new images are brought to before the backbone, as the features' images were."""
        ...


class ArchiveKind:
    name = "archive"
    incremental = False
    index_meaning = "the row position in its split"
    item_columns: tuple[tuple[str, str], ...] = ()
    item_columns_note: tuple[str, ...] = ()

    def check(self, source: str, md5: str | None) -> None:
        if source not in OFFICIAL_URLS and md5 is None:
            raise ValueError(f"source {source!r} is not the official URL: pass its MD5 (--md5 HEX) or --md5 none to skip the check")

    def title(self, dataset_id: str, collection: ReadAgain | None) -> str:
        return f"the archive `{dataset_id}`"

    def predict_size(self, input_size: int) -> int:
        return IMAGE_SHAPE[0]  # the features saw 32 px images, brought to the input size inside the model


class CollectionKind:
    name = "collection"
    incremental = True
    index_meaning = "a stable id of the image within its split"
    item_columns: tuple[tuple[str, str], ...] = (("key", "string"), ("version", "string"))
    item_columns_note: tuple[str, ...] = (
        "- `key` (string), `version` (string): the image's name in the collection and the version it was read at.",
    )

    def check(self, source: str, md5: str | None) -> None:
        return None  # every option of a collection is checked where it is declared

    def title(self, dataset_id: str, collection: ReadAgain | None) -> str:
        assert collection is not None, "a collection's feature set records how to read it"
        return f"the collection `{redact(collection.source)}`"

    def predict_size(self, input_size: int) -> int:
        return input_size  # each image was decoded straight to the input size


SOURCE_KINDS: dict[str, SourceKind] = {kind.name: kind for kind in (ArchiveKind(), CollectionKind())}


def kind_for(source: str, source_format: str) -> SourceKind:
    """The kind of a `--source` (see `detect`: by the format given, else by the name, without I/O)."""
    return SOURCE_KINDS["archive" if detect.is_archive(source, source_format, OFFICIAL_URLS) else "collection"]


def kind_of(collection: object | None) -> SourceKind:
    """The kind of source a feature set was made from, as its record says (`collection`: how to read it, None for an
    archive): the one reader of that record."""
    return SOURCE_KINDS["archive" if collection is None else "collection"]
