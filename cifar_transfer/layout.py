"""Every path under a storage root, in one place.

```
<root>/raw/<archive name>                      the fetched archive, verified
<root>/raw/<archive name>.source.json          where it came from (redacted) and its MD5
<root>/datasets/cifar10-<md5>/                 decoded images and labels (.npy), `_SUCCESS.json` last
<root>/engine-choices/<key>.json               a measured engine/precision verdict
<root>/watch/<collection id>.json               the listing digest a collection watch saw last
<root>/predictions/<head key>/<source>.parquet  a batch prediction run's table (the `predict-images` flow)
<root>/features/<backbone>-<size>px-<pooling>-<fingerprint>/
    feature_set.json                           spec, fingerprint, shape, classes, rebuild record, lineage
    README.md                                  the dataset card: `datasets.load_dataset(folder)` gives train/test
    <view>/part-NNNNN.parquet                  one shard (views: train, test, train-flipped, test-flipped)
    <view>/_manifest.json                      the view is complete: every shard with size and SHA-256 (versioned)
    <view>/_skipped.json                       a collection's images that could not be decoded, with the reason
    extractor/<key>.openvino.zip               the backbone converted to OpenVINO (a zip of its IR): reruns skip TensorFlow
    tsne/<key>/settings.json (first), tsne.png, embedding.parquet (last): a t-SNE map of these features
    heads/<key>/settings.json (first), model.keras, predictions.parquet, confusion.png, metrics.json (last),
        report-<map>.html (rendered by every run that shows this head)
    audit/index/index.json (last), vectors.usearch   the nearest-neighbour index of these features (`audit.index`)
    audit/duplicates.parquet, label_issues.parquet, outliers.parquet, audit.json (last): what the set says of its data
```
Hidden siblings are never read as data: `.<name>.<id>.tmp` (a write in progress) and `.<name>.claim`
(the right to produce `<name>`). Each stage's `*Files` lists every output it commits, so "done" means all
of them are there, and anything deleted is rebuilt.
"""

from __future__ import annotations

import posixpath
import re
import uuid
from typing import Any, Protocol

from pydantic import BaseModel


class Root(Protocol):
    """What the layout asks of a storage root (`storage.Storage` is one): paths under it, and whether they exist.
    Named here, not imported: `storage` imports this module for the hidden names below."""

    @property
    def fs(self) -> Any: ...

    def path(self, *parts: str) -> str: ...

    def exists(self, path: str) -> bool: ...


RAW = "raw"
DATASETS = "datasets"
FEATURES = "features"
ENGINE_CHOICES = "engine-choices"
WATCH = "watch"
SOURCE_RECORD_SUFFIX = ".source.json"
DATASET_MARKER = "_SUCCESS.json"
FEATURE_SET_NAME = "feature_set.json"
CARD_NAME = "README.md"
MANIFEST_NAME = "_manifest.json"
SETTINGS_NAME = "settings.json"
SKIPPED_NAME = "_skipped.json"
SHARD_PATTERN = "part-{number:05d}.parquet"
TEMP_SUFFIX = ".tmp"
CLAIM_SUFFIX = ".claim"


class OutputFiles(BaseModel):
    """A stage's committed outputs; the last field is written last and marks the stage done."""

    def paths(self) -> list[str]:
        return [value for name, value in self.model_dump().items() if name != "folder"]

    def missing(self, storage: Root) -> list[str]:
        return [path for path in self.paths() if not storage.exists(path)]


class DatasetFiles(OutputFiles):
    folder: str
    train_images: str
    train_labels: str
    test_images: str
    test_labels: str
    marker: str

    def array(self, split: str, kind: str) -> str:
        """`kind` is "images" or "labels"."""
        return getattr(self, f"{split}_{kind}")


class DerivedFiles(OutputFiles):
    """Outputs made from a feature set with settings of their own (a map, a head), in a folder named by their key."""

    folder: str

    @property
    def settings(self) -> str:
        """The settings they were made with, written first: what `verify --repair` rebuilds them from."""
        return posixpath.join(self.folder, SETTINGS_NAME)


class TsneFiles(DerivedFiles):
    picture: str
    embedding: str


class HeadFiles(DerivedFiles):
    model: str
    predictions: str
    confusion_picture: str
    metrics: str


class AuditFiles(OutputFiles):
    """The audit of a feature set (`cifar_transfer.audit`): its tables, and its record (written last)."""

    folder: str
    duplicates: str
    label_issues: str
    outliers: str
    record: str


class IndexFiles(OutputFiles):
    """A feature set's nearest-neighbour index: the approximate index's file (absent for an exact one) and its record."""

    folder: str
    vectors: str
    record: str


def raw_archive(storage: Root, name: str) -> str:
    return storage.path(RAW, name)


def source_record(archive_path: str) -> str:
    return archive_path + SOURCE_RECORD_SUFFIX


def source_records(storage: Root) -> list[str]:
    return storage.fs.glob(storage.path(RAW, "*" + SOURCE_RECORD_SUFFIX))


def archive_of_record(record_path: str) -> str:
    return record_path.removesuffix(SOURCE_RECORD_SUFFIX)


def dataset_files(storage: Root, dataset_id: str) -> DatasetFiles:
    """The decoded archive a feature set names in `FeatureSpec.dataset_id`: a CIFAR-10 archive's MD5 (its folder is
    `cifar10-<md5>`, as it always was), or the folder name itself for other archives (`cifar100-fine-<md5>`)."""
    is_md5 = len(dataset_id) == 32 and all(char in "0123456789abcdef" for char in dataset_id)
    return dataset_files_in(storage.path(DATASETS, f"cifar10-{dataset_id}" if is_md5 else dataset_id))


def dataset_files_in(folder: str) -> DatasetFiles:
    arrays = {
        f"{split}_{kind}": posixpath.join(folder, f"{split}_{kind}.npy") for split in ("train", "test") for kind in ("images", "labels")
    }
    return DatasetFiles(folder=folder, marker=posixpath.join(folder, DATASET_MARKER), **arrays)


def watch_record(storage: Root, collection_id: str) -> str:
    """The last listing a watch saw of a collection (its digest), to tell when the collection changed."""
    return storage.path(WATCH, f"{collection_id}.json")


def batch_predictions(storage: Root, head_key: str, source_name: str) -> str:
    """Where a batch prediction run writes its table: by head, then by a name for the source."""
    return storage.path("predictions", head_key, f"{source_name}.parquet")


def engine_choice(storage: Root, key: str) -> str:
    return storage.path(ENGINE_CHOICES, f"{key}.json")


def features_root(storage: Root) -> str:
    return storage.path(FEATURES)


def feature_set_name(backbone: str, input_size: int, pooling: str, fingerprint: str) -> str:
    """A feature set's folder name, `<backbone>-<size>px-<pooling>-<fingerprint>`, readable and safe as one path part.

    A plain name is lowercased ("inceptionv3"); a family's "<prefix>:<model>" that holds a path or a handle keeps the
    prefix and the last named part ("hub:/presets/dinov2_small" and "hub:kaggle://keras/dinov2/keras/dinov2_small/2"
    -> "hub-dinov2_small"): no ':' or '/' ever enters a storage path (the fingerprint keeps names apart).
    """
    prefix, colon, model = backbone.partition(":")
    readable = f"{prefix}-{last_named_part(model)}" if colon else backbone
    readable = re.sub(r"[^a-z0-9._-]+", "-", readable.lower()).strip("-.") or "backbone"
    return f"{readable}-{input_size}px-{pooling}-{fingerprint}"


def last_named_part(location: str) -> str:
    """The last part of a path or handle that is not a version number ("kaggle://keras/dinov2/keras/dinov2_small/2"
    -> "dinov2_small")."""
    parts = [part for part in re.split(r"[/\\:]+", location) if part and not part.isdigit()]
    return parts[-1] if parts else location


def feature_set_folder(storage: Root, folder_name: str) -> str:
    return storage.path(FEATURES, folder_name)


def feature_set_description(folder: str) -> str:
    return posixpath.join(folder, FEATURE_SET_NAME)


def card(folder: str) -> str:
    """A feature set's dataset card: `README.md` at the top of its folder, where Hugging Face `datasets` looks for it."""
    return posixpath.join(folder, CARD_NAME)


def view_folder(folder: str, view: str) -> str:
    return posixpath.join(folder, view)


def shard_file_name(number: int) -> str:
    return SHARD_PATTERN.format(number=number)


def shard_file(folder: str, view: str, file_name: str) -> str:
    """A shard's path; `file_name` comes from a plan or a manifest and must be a plain name (see `is_plain_name`)."""
    if not is_plain_name(file_name):
        raise ValueError(f"{file_name!r} is not a plain file name")
    return posixpath.join(folder, view, file_name)


def manifest(folder: str, view: str) -> str:
    return posixpath.join(folder, view, MANIFEST_NAME)


def converted_extractor(folder: str, key: str) -> str:
    """The set's backbone converted to OpenVINO, as a zip of its IR (`extractors.openvino_model`); deleted with the set."""
    return posixpath.join(folder, "extractor", f"{key}.openvino.zip")


def skipped_record(folder: str, view: str) -> str:
    """A collection view's images that could not be read or decoded, with the reason (beside its manifest)."""
    return posixpath.join(folder, view, SKIPPED_NAME)


def is_plain_name(name: str) -> bool:
    """A file name with no folder part, no parent reference and nothing hidden: safe to join under a folder."""
    return bool(name) and name == posixpath.basename(name) and "\\" not in name and not name.startswith(".") and "\x00" not in name


def tsne_files(folder: str, key: str) -> TsneFiles:
    out = posixpath.join(maps_folder(folder), key)
    return TsneFiles(folder=out, picture=posixpath.join(out, "tsne.png"), embedding=posixpath.join(out, "embedding.parquet"))


def head_files(folder: str, key: str) -> HeadFiles:
    out = posixpath.join(heads_folder(folder), key)
    return HeadFiles(
        folder=out,
        model=posixpath.join(out, "model.keras"),
        predictions=posixpath.join(out, "predictions.parquet"),
        confusion_picture=posixpath.join(out, "confusion.png"),
        metrics=posixpath.join(out, "metrics.json"),
    )


def audit_files(folder: str) -> AuditFiles:
    out = posixpath.join(folder, "audit")
    return AuditFiles(
        folder=out,
        duplicates=posixpath.join(out, "duplicates.parquet"),
        label_issues=posixpath.join(out, "label_issues.parquet"),
        outliers=posixpath.join(out, "outliers.parquet"),
        record=posixpath.join(out, "audit.json"),
    )


def index_files(folder: str) -> IndexFiles:
    out = posixpath.join(folder, "audit", "index")
    return IndexFiles(folder=out, vectors=posixpath.join(out, "vectors.usearch"), record=posixpath.join(out, "index.json"))


def heads_folder(folder: str) -> str:
    return posixpath.join(folder, "heads")


def maps_folder(folder: str) -> str:
    return posixpath.join(folder, "tsne")


def report(head_folder: str, map_name: str) -> str:
    """The HTML report of a head, named by the t-SNE map it shows, so reports of different maps never overwrite each other."""
    return posixpath.join(head_folder, f"report-{map_name}.html")


def explorer(head_folder: str, map_name: str) -> str:
    """The map explorer of a report (`explorer.write_explorer`), next to it and named by the same map."""
    return posixpath.join(head_folder, f"explorer-{map_name}.html")


def temp_file(path: str) -> str:
    """A hidden sibling for a write in progress: ignored by Parquet readers and globs, unique per writer."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def is_temp_file_of(candidate: str, path: str) -> bool:
    return posixpath.basename(candidate).startswith(f".{posixpath.basename(path)}.") and candidate.endswith(TEMP_SUFFIX)


def claim_file(path: str) -> str:
    """The hidden sibling whose holder is the one writer of `path`."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}{CLAIM_SUFFIX}")


def claimed_file(claim_path: str) -> str:
    """The output a claim file is for."""
    folder, name = posixpath.split(claim_path)
    return posixpath.join(folder, name.removeprefix(".").removesuffix(CLAIM_SUFFIX))
