"""Every kind of source behind one shape, chosen through one registry.

A kind is how a source's images reach the backbone: a CIFAR archive is decoded once into arrays (`dataset.py`),
a collection (an image folder, a Parquet table) is listed cheaply and read image by image (`collection.py`).
Two shapes say all the rest of the pipeline needs, so no stage asks which kind it has:

- `SourceDataset`, a source made ready for extraction (a decoded archive, a listed collection): its identity and
  classes, its shard plan, the images of a shard, the first images to calibrate a precision on, and what its
  feature set records about it.
- `SourceKind`, what a kind means for a feature set made from it, read back from that set's record (the card's
  wording and columns, the report's pictures, what `verify` checks and how it rebuilds, predict's input size).

Adding a collection format is one `CollectionSource` module and one entry in `collection.COLLECTION_FORMATS`;
adding a kind is one `SourceKind` here and its preparation steps in `tasks/sources.py`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

from cifar_transfer.errors import FeatureSetError
from cifar_transfer.redact import redact
from cifar_transfer.sources import detect

if TYPE_CHECKING:
    import numpy as np

    from cifar_transfer.config import CollectionSettings, FeatureSpec, PipelineConfig
    from cifar_transfer.shards import Shard
    from cifar_transfer.sources.base import UnreadableItem
    from cifar_transfer.storage import Storage
    from cifar_transfer.store import FeatureSetInfo, ShardRows


class SourceDataset(Protocol):
    """A source made ready for extraction: what planning, extraction, calibration and commit need of it."""

    classes: list[str]
    sizes: dict[str, int]

    @property
    def id(self) -> str:
        """Names the images in the features' fingerprint (`FeatureSpec.dataset_id`)."""
        ...

    @property
    def collection(self) -> CollectionSettings | None:
        """How to read the source again, recorded with its feature set (None: an archive, known by its id)."""
        ...

    @property
    def unusable(self) -> dict[str, list[UnreadableItem]]:
        """By split: images the listing could not use (no usable label), recorded beside the unreadable ones."""
        ...

    def plan_shards(self, storage: Storage, folder: str, shard_size: int, flip: bool) -> tuple[list[Shard], dict[str, list[str]]]:
        """Every shard of the features' next version, and by view the files of the current version it retires."""
        ...

    def shard_rows(self, storage_url: str, shard: Shard, input_size: int) -> tuple[np.ndarray, ShardRows]:
        """The shard's images (uint8) and what its rows are."""
        ...

    def calibration_images(self, storage_url: str, count: int, input_size: int) -> np.ndarray:
        """The first `count` train images, as extraction would feed them to the backbone."""
        ...


class SourceKind(Protocol):
    """What a kind of source means for the feature sets made from it."""

    name: str
    # Its images may change under one fingerprint: its features get versions (`content_version`, retired
    # shards), and the images it could not read are listed in `<view>/_skipped.json`.
    incremental: bool
    index_meaning: str  # what a row's `index` is, for the card
    item_columns: tuple[tuple[str, str], ...]  # (name, Arrow type) of the columns its shards hold beyond index, label, features
    item_columns_note: tuple[str, ...]  # the card's lines on those columns

    def check(self, config: PipelineConfig) -> None:
        """Refuse options this kind cannot work with (raises ValueError with the fix)."""
        ...

    def title(self, spec: dict, collection: CollectionSettings | None) -> str:
        """Where a feature set's images came from, in a sentence of its card."""
        ...

    def pictures(self, storage: Storage, features: FeatureSetInfo, split: str, ids: np.ndarray, size: int) -> np.ndarray:
        """The images of a split's rows (by `index`) for the report, at `size` px where they are read anew."""
        ...

    def stored_problems(self, storage_url: str, dataset_id: str) -> dict[str, list[str]]:
        """Problems of what the kind keeps in storage besides the features (paths relative to the root)."""
        ...

    def remove_damaged(self, storage_url: str, dataset_id: str, problems: dict[str, list[str]]) -> None:
        """Delete what `stored_problems` found damaged, so the next extraction makes it again."""
        ...

    def rebuild_options(self, storage: Storage, spec: FeatureSpec, collection: CollectionSettings | None) -> dict:
        """The source options that read the same images again (`verify --repair`)."""
        ...

    def predict_size(self, spec: FeatureSpec) -> int:
        """The side new images are brought to before the backbone, as the features' images were."""
        ...


class ArchiveKind:
    name = "archive"
    incremental = False
    index_meaning = "the row position in its split"
    item_columns: tuple[tuple[str, str], ...] = ()
    item_columns_note: tuple[str, ...] = ()

    def check(self, config: PipelineConfig) -> None:
        from cifar_transfer.config import OFFICIAL_ARCHIVES

        if config.source not in OFFICIAL_ARCHIVES and config.md5 is None:
            raise ValueError(f"source {config.source!r} is not the official URL: pass its MD5 (--md5 HEX) or --md5 none to skip the check")

    def title(self, spec: dict, collection: CollectionSettings | None) -> str:
        return f"the archive `{spec['dataset_md5']}`"  # a stored spec: its fields under their stored names

    def pictures(self, storage: Storage, features: FeatureSetInfo, split: str, ids: np.ndarray, size: int) -> np.ndarray:
        from cifar_transfer import layout
        from cifar_transfer.dataset import stored_rows

        return stored_rows(storage, layout.dataset_files(storage, features.spec.dataset_id).array(split, "images"), ids)

    def stored_problems(self, storage_url: str, dataset_id: str) -> dict[str, list[str]]:
        from cifar_transfer.verify import verify_dataset

        return verify_dataset(storage_url, dataset_id)

    def remove_damaged(self, storage_url: str, dataset_id: str, problems: dict[str, list[str]]) -> None:
        from cifar_transfer.verify import remove_damaged_dataset

        remove_damaged_dataset(storage_url, dataset_id, problems)

    def rebuild_options(self, storage: Storage, spec: FeatureSpec, collection: CollectionSettings | None) -> dict:
        from cifar_transfer import layout
        from cifar_transfer.dataset import parse_dataset_id

        archive_format, label_mode, md5 = parse_dataset_id(spec.dataset_id)
        records = {path: json.loads(storage.read_bytes(path)) for path in layout.source_records(storage)}
        archives = [path for path, record in records.items() if record.get("md5") == md5]
        if not archives:
            raise FeatureSetError(
                f"the archive with MD5 {md5} is no longer in {storage.uri(storage.path('raw'))}: "
                "rerun `cifar-transfer extract` with its --source to rebuild these features"
            )
        options = {"source": storage.uri(layout.archive_of_record(archives[0])), "md5": md5}
        if archive_format != "cifar10":
            options |= {"source_format": archive_format, "label_mode": label_mode}
        return options

    def predict_size(self, spec: FeatureSpec) -> int:
        from cifar_transfer.cifar import IMAGE_SHAPE

        return IMAGE_SHAPE[0]  # the features saw 32 px images, brought to the input size inside the model


class CollectionKind:
    name = "collection"
    incremental = True
    index_meaning = "a stable id of the image within its split"
    item_columns: tuple[tuple[str, str], ...] = (("key", "string"), ("version", "string"))
    item_columns_note: tuple[str, ...] = (
        "- `key` (string), `version` (string): the image's name in the collection and the version it was read at.",
    )

    def check(self, config: PipelineConfig) -> None:
        return None  # every option of a collection is checked where it is declared

    def title(self, spec: dict, collection: CollectionSettings | None) -> str:
        return f"the collection `{redact(collection.source if collection else '?')}`"

    def pictures(self, storage: Storage, features: FeatureSetInfo, split: str, ids: np.ndarray, size: int) -> np.ndarray:
        from cifar_transfer.collection import thumbnails
        from cifar_transfer.store import read_keys

        keys = read_keys(storage, features.folder, split)
        assert features.collection is not None, "a collection's feature set records how to read it"
        return thumbnails(features.collection, [keys[int(number)] for number in ids], size)

    def stored_problems(self, storage_url: str, dataset_id: str) -> dict[str, list[str]]:
        return {}  # nothing but the features: the collection is read where it is

    def remove_damaged(self, storage_url: str, dataset_id: str, problems: dict[str, list[str]]) -> None:
        return None

    def rebuild_options(self, storage: Storage, spec: FeatureSpec, collection: CollectionSettings | None) -> dict:
        assert collection is not None, "a collection's feature set records how to read it"
        return collection.model_dump()  # read the collection again: unchanged images give the same features

    def predict_size(self, spec: FeatureSpec) -> int:
        return spec.input_size  # each image was decoded straight to the input size


SOURCE_KINDS: dict[str, SourceKind] = {kind.name: kind for kind in (ArchiveKind(), CollectionKind())}


def kind_for(source: str, source_format: str) -> SourceKind:
    """The kind of a `--source` (see `detect`: by the format given, else by the name, without I/O)."""
    from cifar_transfer.config import OFFICIAL_ARCHIVES

    return SOURCE_KINDS["archive" if detect.is_archive(source, source_format, set(OFFICIAL_ARCHIVES)) else "collection"]


def kind_of(collection: CollectionSettings | None) -> SourceKind:
    """The kind of source a feature set was made from, as its record says: the one reader of that record."""
    return SOURCE_KINDS["archive" if collection is None else "collection"]
