"""The records of a feature set: their schemas, and the reading of its description and manifests.

Contract of a feature set folder `features/<backbone>-<size>px-<pooling>-<fingerprint>/`:
- `<split>/part-NNNNN.parquet`: columns `index` (int64, position in the split),
  `label` (int64), `features` (fixed_size_list<float32>[D]; spatial maps
  flattened in (height, width, channels) order). Schema metadata key
  `cifar_transfer` holds JSON with the fingerprint, feature shape, shard range,
  feature spec and the library versions that wrote it (`shard_files`).
  `<split>` is `train`, `test`, or, with `--flip`, `train-flipped` / `test-flipped`:
  the same images mirrored left-right, same `index` and `label` as the originals.
- `<split>/_manifest.json`: written only when every shard of the split is done;
  lists each shard's rows, bytes and sha256. A split without it is incomplete.
- `feature_set.json`: the feature spec, fingerprint and feature shape.
Temporary files start with "." and manifests with "_", so Parquet readers and
`*.parquet` globs see only finished shards.
"""

from __future__ import annotations

import logging
import platform
from datetime import datetime, timezone
from functools import cache
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from cifar_transfer import layout, records
from cifar_transfer.config import CollectionSettings, FeatureSpec
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.shards import VIEWS
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)


class ShardRecord(BaseModel):
    """A finished shard as the manifest lists it."""

    file: str
    split: Literal[VIEWS]  # type: ignore[valid-type]  # the views are computed from SPLITS; pydantic checks them

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, file: str) -> str:
        """A manifest names files inside its own view folder, nothing else: a crafted path never reaches a reader or `repair`."""
        if not layout.is_plain_name(file):
            raise ValueError(f"shard file {file!r} is not a plain file name")
        return file

    number: int
    start: int
    stop: int
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """A complete view. A collection's view gets a new version when its images change; `retired` are the files the
    previous version listed and this one does not (kept for readers of that version, deleted by the next one)."""

    fingerprint: str
    split: str
    rows: int
    feature_shape: list[int]
    shards: list[ShardRecord]
    created_at: str
    version: int  # 1 for a view's first manifest
    retired: list[str]

    @field_validator("retired")
    @classmethod
    def _plain_file_names(cls, files: list[str]) -> list[str]:
        for file in files:
            ShardRecord._plain_file_name(file)
        return files


@cache
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("cifar-transfer", "tensorflow", "keras", "openvino", "numpy", "pyarrow", "prefect"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class Lineage(BaseModel):
    """Who made an output: the Prefect flow run (id and UI link) when one did, and the library versions."""

    flow_run_id: str | None = None
    flow_run_url: str | None = None
    versions: dict = Field(default_factory=lambda: library_versions())
    made_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class ExtractionRecord(BaseModel):
    """How the set's features were computed: by the last run that computed any (a rerun that reused them all keeps it)."""

    seconds: float
    images: int
    images_per_second: float


class FeatureSetInfo(BaseModel):
    """A feature set on storage: enough for later stages and other jobs to read it.

    `splits` holds only the complete splits (those with a manifest), with their row counts.
    """

    storage_url: str
    folder: str
    fingerprint: str
    spec: FeatureSpec
    feature_shape: list[int]
    splits: dict[str, int]
    classes: list[str]
    created_at: str
    content_version: str | None = None  # a collection's: changes with every new manifest version (None: an archive's)
    collection: CollectionSettings | None = None  # how to read the collection the set was made from
    bytes: int | None = None  # the complete views' shards on storage, as their manifests list them (None: no complete view)
    extraction: ExtractionRecord | None = None  # how its features were computed
    made_by: Lineage | None = None  # the flow run that computed them


class RebuildRecord(BaseModel):
    """What the fingerprint leaves out but a rebuild of the same features needs (`verify --repair`)."""

    weights: str
    seed: int
    shard_size: int
    flip: bool  # the mirrored views were extracted too
    collection: CollectionSettings | None  # how to read the collection the set was made from (None: an archive)


class FeatureSetDescription(BaseModel):
    """The content of `feature_set.json`."""

    fingerprint: str
    spec: dict  # FeatureSpec's fingerprinted fields, as stored
    feature_shape: list[int]
    classes: list[str]
    rebuild: RebuildRecord
    versions: dict
    extraction: ExtractionRecord | None
    made_by: Lineage | None

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(**self.spec, weights=self.rebuild.weights, seed=self.rebuild.seed)


def read_description(storage: Storage, folder: str) -> FeatureSetDescription | None:
    """The folder's feature-set description; None (with a warning) if it is missing or unreadable."""
    path = layout.feature_set_description(folder)
    if not storage.exists(path):
        return None
    try:
        return records.FEATURE_SET.load(FeatureSetDescription, storage.read_bytes(path), storage.uri(path))
    except ValueError as exc:
        log.warning("skipping %s: unreadable %s (%s)", storage.uri(folder), layout.FEATURE_SET_NAME, str(exc).splitlines()[0])
        return None


def feature_set_description(storage: Storage, folder: str) -> FeatureSetDescription:
    """The description of a finished feature set, or a FeatureSetError saying the folder is not one."""
    description = read_description(storage, folder)
    if description is None:
        raise FeatureSetError(f"{storage.uri(folder)} has no readable {layout.FEATURE_SET_NAME}: it is not a finished feature set")
    return description


def read_manifest(storage: Storage, folder: str, split: str) -> Manifest | None:
    """The view's manifest; None when it is missing, or unreadable (logged: the view then counts as incomplete)."""
    path = layout.manifest(folder, split)
    if not storage.exists(path):
        return None
    try:
        return records.MANIFEST.load(Manifest, storage.read_bytes(path), storage.uri(path))
    except ValueError as exc:
        log.warning("ignoring %s: not a valid manifest (%s)", storage.uri(path), str(exc).splitlines()[0])
        return None


def split_manifest(storage: Storage, folder: str, split: str) -> Manifest:
    """The manifest of a complete split, or a FeatureSetError saying how to complete it."""
    manifest = read_manifest(storage, folder, split)
    if manifest is None:
        raise FeatureSetError(f"split {split!r} of {folder} has no manifest, so it is incomplete: run extraction to finish it")
    return manifest
