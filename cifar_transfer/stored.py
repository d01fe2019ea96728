"""What each kind of source keeps in storage besides its features, and how a rebuild reads it again.

The other half of `sources.kinds`: these read decoded arrays, a collection's images and a set's keys, so they sit
above the feature store, and the report, the explorer, the audit, `similar`, `verify` and its repair ask
`stored_source(...)` instead of asking which kind of source a feature set was made from.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cifar_transfer import layout
from cifar_transfer.collection import thumbnails
from cifar_transfer.config import CollectionSettings, FeatureSpec
from cifar_transfer.dataset import decoded_problems, parse_dataset_id, remove_damaged_decoded, stored_rows
from cifar_transfer.download import read_source_record
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.feature_records import FeatureSetInfo
from cifar_transfer.sources.kinds import kind_of
from cifar_transfer.storage import Storage
from cifar_transfer.store import read_keys


class StoredSource(Protocol):
    def pictures(self, storage: Storage, features: FeatureSetInfo, split: str, ids: np.ndarray, size: int) -> np.ndarray:
        """The images of a split's rows (by `index`) for the report, at `size` px where they are read anew."""
        ...

    def pictures_kept(self, storage: Storage, features: FeatureSetInfo) -> bool:
        """Whether `pictures` can still read the set's images (an archive's decoded arrays may have been evicted)."""
        ...

    def row_keys(self, storage: Storage, folder: str, split_of: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Every row's name (by split and `index`): a collection's image name, an archive's `<split>/<index>`."""
        ...

    def row_named(self, storage: Storage, folder: str, splits: list[str], name: str) -> tuple[str, int] | None:
        """The split and `index` of the row named `name` (as `row_keys` names it), if a row of `splits` is."""
        ...

    def problems(self, storage_url: str, dataset_id: str) -> dict[str, list[str]]:
        """Problems of what the kind keeps in storage besides the features (paths relative to the root)."""
        ...

    def remove_damaged(self, storage_url: str, dataset_id: str, problems: dict[str, list[str]]) -> None:
        """Delete what `problems` found damaged, so the next extraction makes it again."""
        ...

    def rebuild_options(self, storage: Storage, spec: FeatureSpec, collection: CollectionSettings | None) -> dict:
        """The source options that read the same images again (`verify --repair`)."""
        ...


class StoredArchive:
    """A decoded archive: its arrays under `datasets/`, its copy under `raw/`."""

    def pictures(self, storage: Storage, features: FeatureSetInfo, split: str, ids: np.ndarray, size: int) -> np.ndarray:
        return stored_rows(storage, layout.dataset_files(storage, features.spec.dataset_id).array(split, "images"), ids)

    def pictures_kept(self, storage: Storage, features: FeatureSetInfo) -> bool:
        return storage.exists(layout.dataset_files(storage, features.spec.dataset_id).marker)

    def row_keys(self, storage: Storage, folder: str, split_of: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.array([f"{split}/{number}" for split, number in zip(split_of, index, strict=True)], dtype=object)

    def row_named(self, storage: Storage, folder: str, splits: list[str], name: str) -> tuple[str, int] | None:
        return None  # `<split>/<index>` is a row's position, which a query names as such (`similar.ROW`)

    def problems(self, storage_url: str, dataset_id: str) -> dict[str, list[str]]:
        return decoded_problems(storage_url, dataset_id)

    def remove_damaged(self, storage_url: str, dataset_id: str, problems: dict[str, list[str]]) -> None:
        remove_damaged_decoded(storage_url, dataset_id, problems)

    def rebuild_options(self, storage: Storage, spec: FeatureSpec, collection: CollectionSettings | None) -> dict:
        archive_format, label_mode, md5 = parse_dataset_id(spec.dataset_id)
        archives = [path for path in layout.source_records(storage) if read_source_record(storage, path).get("md5") == md5]
        if not archives:
            raise FeatureSetError(
                f"the archive with MD5 {md5} is no longer in {storage.uri(storage.path('raw'))}: "
                "rerun `cifar-transfer extract` with its --source to rebuild these features"
            )
        options = {"source": storage.uri(layout.archive_of_record(archives[0])), "md5": md5}
        if archive_format != "cifar10":
            options |= {"source_format": archive_format, "label_mode": label_mode}
        return options


class StoredCollection:
    """A collection: nothing but the features; its images are read where they are."""

    def pictures(self, storage: Storage, features: FeatureSetInfo, split: str, ids: np.ndarray, size: int) -> np.ndarray:
        assert features.collection is not None, "a collection's feature set records how to read it"
        keys = read_keys(storage, features.folder, split)
        return thumbnails(features.collection, [keys[int(number)] for number in ids], size)

    def pictures_kept(self, storage: Storage, features: FeatureSetInfo) -> bool:
        return True  # read where they are (one that is gone since is a row's reason, not a missing set)

    def row_keys(self, storage: Storage, folder: str, split_of: np.ndarray, index: np.ndarray) -> np.ndarray:
        names = {split: read_keys(storage, folder, split) for split in dict.fromkeys(split_of.tolist())}
        return np.array([names[split][int(number)] for split, number in zip(split_of, index, strict=True)], dtype=object)

    def row_named(self, storage: Storage, folder: str, splits: list[str], name: str) -> tuple[str, int] | None:
        for split in splits:
            found = next((number for number, key in read_keys(storage, folder, split).items() if key == name), None)
            if found is not None:
                return split, found
        return None

    def problems(self, storage_url: str, dataset_id: str) -> dict[str, list[str]]:
        return {}

    def remove_damaged(self, storage_url: str, dataset_id: str, problems: dict[str, list[str]]) -> None:
        return None

    def rebuild_options(self, storage: Storage, spec: FeatureSpec, collection: CollectionSettings | None) -> dict:
        assert collection is not None, "a collection's feature set records how to read it"
        return collection.model_dump()  # read the collection again: unchanged images give the same features


STORED_SOURCES: dict[str, StoredSource] = {"archive": StoredArchive(), "collection": StoredCollection()}


def stored_source(collection: CollectionSettings | None) -> StoredSource:
    """What the source of a feature set (as its record says: `collection`, None for an archive) keeps in storage, and
    what names its rows."""
    return STORED_SOURCES[kind_of(collection).name]
