"""The catalogue: every feature set under a storage root, described from its records; the one to read found by fingerprint."""

from __future__ import annotations

from cifar_transfer.config import stable_hash
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.feature_records import FeatureSetDescription, FeatureSetInfo, Manifest, read_description, read_manifest
from cifar_transfer.layout import features_root
from cifar_transfer.shards import VIEWS
from cifar_transfer.sources.kinds import kind_of
from cifar_transfer.storage import Storage


def describe_feature_set(storage: Storage, folder: str) -> FeatureSetInfo | None:
    """The feature set in `folder` with its complete splits, or None if there is none."""
    found = read_feature_set(storage, folder)
    return found[0] if found else None


def read_feature_set(storage: Storage, folder: str) -> tuple[FeatureSetInfo, dict[str, Manifest]] | None:
    """The feature set in `folder` and the manifests it was described from (one reading of each, so a caller that
    checks them checks what the description says, even while another run commits), or None if there is none."""
    description = read_description(storage, folder)
    if description is None:
        return None
    manifests = {split: manifest for split in VIEWS if (manifest := read_manifest(storage, folder, split)) is not None}
    info = FeatureSetInfo(
        storage_url=storage.url,
        folder=folder,
        fingerprint=description.fingerprint,
        spec=description.feature_spec(),
        feature_shape=description.feature_shape,
        splits={split: manifest.rows for split, manifest in manifests.items()},
        classes=description.classes,
        created_at=max((manifest.created_at for manifest in manifests.values()), default=""),
        content_version=content_version(description, manifests),
        collection=description.rebuild.collection,
        bytes=sum(record.bytes for manifest in manifests.values() for record in manifest.shards) if manifests else None,
        extraction=description.extraction,
        made_by=description.made_by,
    )
    return info, manifests


def content_version(description: FeatureSetDescription, manifests: dict[str, Manifest]) -> str | None:
    """Names this version of the features, for the keys of maps and heads made from them; None where the features
    never change under one fingerprint (an archive's: the keys stay what they always were)."""
    if not kind_of(description.rebuild.collection).incremental:
        return None
    return stable_hash({view: [record.sha256 for record in manifest.shards] for view, manifest in manifests.items()}, 16)


def list_feature_sets(storage_url: str) -> list[FeatureSetInfo]:
    """Every feature set under the storage root, newest first; `splits` says which are complete."""
    storage = Storage(storage_url)
    root = features_root(storage)
    if not storage.exists(root):
        return []
    found = [describe_feature_set(storage, folder) for folder in storage.fs.ls(root, detail=False)]
    return sorted((info for info in found if info is not None), key=lambda info: info.created_at, reverse=True)


def find_feature_set(storage_url: str, fingerprint: str | None = None, splits: tuple[str, ...] = ("train", "test")) -> FeatureSetInfo:
    """The set with this fingerprint, or the newest one, whose `splits` are all complete."""
    for info in list_feature_sets(storage_url):
        if (fingerprint is None or info.fingerprint == fingerprint) and all(split in info.splits for split in splits):
            return info
    wanted = f"fingerprint {fingerprint}" if fingerprint else "any configuration"
    raise FeatureSetError(f"no complete {'+'.join(splits)} features for {wanted} under {storage_url}: run `cifar-transfer extract` first")
