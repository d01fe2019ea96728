"""Check a feature set and everything made from it by content, and repair what is wrong.

Existence is not proof: every shard the manifest lists must have the listed
size and SHA-256 and carry the set's fingerprint and row range (a collection's:
the digest of the items it lists) in its footer.
Files the manifest does not list and leftover temporary files are reported
too. The decoded dataset the set was made from, and every t-SNE map and head
made from the set, must have all their files, readable. Repair deletes what is
damaged (it holds nothing worth keeping; never outside the set's folder and its
decoded dataset) and rebuilds it: the extraction recomputes exactly the missing
shards (mirrored views included) and decodes the archive again if an array is
gone; a map or head is made again from the settings recorded beside it.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath

from cifar_transfer import layout, records
from cifar_transfer.claims import held_by_live_writer
from cifar_transfer.config import FeatureSpec, HeadSettings, PipelineConfig, TsneSettings
from cifar_transfer.feature_records import feature_set_description, read_description, read_manifest
from cifar_transfer.head import finished_head, train_head
from cifar_transfer.layout import CLAIM_SUFFIX, TEMP_SUFFIX, DerivedFiles, HeadFiles, TsneFiles
from cifar_transfer.shard_files import SHARD_MISSING, recorded_shard, shard_problem
from cifar_transfer.shards import SPLITS, VIEWS
from cifar_transfer.storage import Storage
from cifar_transfer.stored import stored_source
from cifar_transfer.tsne import finished_tsne, tsne_map

log = logging.getLogger(__name__)

UNLISTED = "not listed in the manifest"


def verify_feature_set(storage_url: str, folder: str) -> dict[str, list[str]]:
    """Problems found per file (relative to the set's folder); empty when all is well."""
    storage = Storage(storage_url)
    description = read_description(storage, folder)
    if description is None:
        return {layout.FEATURE_SET_NAME: ["missing or unreadable: this folder is not a finished feature set"]}
    spec = description.feature_spec()
    problems = _derived_problems(storage, folder)
    for split in VIEWS:
        split_folder = layout.view_folder(folder, split)
        if split not in SPLITS and not storage.exists(split_folder):
            continue  # mirrored views exist only when --flip asked for them
        on_disk = (
            {posixpath.basename(path) for path in storage.fs.ls(split_folder, detail=False)} if storage.exists(split_folder) else set()
        )
        for name in sorted(on_disk):
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                problems.setdefault(f"{split}/{name}", []).append("leftover temporary file of an interrupted write")
            if name.startswith(".") and name.endswith((CLAIM_SUFFIX, CLAIM_SUFFIX + ".lock")):
                problems.setdefault(f"{split}/{name}", []).extend(["claim of a run in progress, or of a killed one", UNLISTED])
        manifest = read_manifest(storage, folder, split)
        if manifest is None:
            unreadable = storage.exists(layout.manifest(folder, split))
            problems.setdefault(f"{split}/_manifest.json", []).append(
                "unreadable or not a valid manifest" if unreadable else "missing: the split is incomplete"
            )
            continue
        if manifest.fingerprint != spec.fingerprint:
            problems.setdefault(f"{split}/_manifest.json", []).append(f"belongs to fingerprint {manifest.fingerprint}")
        for name in sorted(name for name in on_disk if name.endswith(".parquet") and not name.startswith(".")):
            if name not in {record.file for record in manifest.shards}:
                problems.setdefault(f"{split}/{name}", []).append(UNLISTED)
        for record in manifest.shards:
            path = layout.shard_file(folder, split, record.file)
            found = _shard_content_problems(storage, path, spec, record)
            if found:
                problems[f"{split}/{record.file}"] = found
    return problems


def _derived_folders(storage: Storage, folder: str) -> list[DerivedFiles]:
    """Every t-SNE map and head folder made from the set."""
    found: list[DerivedFiles] = []
    for parent, files_of in ((layout.maps_folder(folder), layout.tsne_files), (layout.heads_folder(folder), layout.head_files)):
        if storage.exists(parent):
            found += [files_of(folder, posixpath.basename(path)) for path in sorted(storage.fs.ls(parent, detail=False))]
    return found


def _derived_problems(storage: Storage, folder: str) -> dict[str, list[str]]:
    """Missing or unreadable files of the maps and heads made from the set (relative to its folder)."""
    problems: dict[str, list[str]] = {}
    for files in _derived_folders(storage, folder):
        missing = files.missing(storage)
        for path in missing:
            problems[posixpath.relpath(path, folder)] = ["missing: made again by `verify --repair` or the next run"]
        if missing:
            continue
        key = posixpath.basename(files.folder)
        readable = finished_tsne(storage, folder, key) if isinstance(files, TsneFiles) else finished_head(storage, folder, key)
        if readable is None:
            last = files.paths()[-1]
            problems[posixpath.relpath(last, folder)] = ["unreadable: made again by `verify --repair` or the next run"]
    return problems


def rebuild_derived(storage_url: str, folder: str) -> list[str]:
    """Make again every incomplete or unreadable map and head of the set from its recorded settings.

    Returns what could not be rebuilt, and why (a folder written before settings were recorded).
    """
    storage = Storage(storage_url)
    left = []
    for files in _derived_folders(storage, folder):
        key = posixpath.basename(files.folder)
        is_map = isinstance(files, TsneFiles)
        if (finished_tsne if is_map else finished_head)(storage, folder, key) is not None:
            continue
        settings = _recorded_settings(storage, files, TsneSettings if is_map else HeadSettings)
        if settings is None:
            left.append(
                f"{posixpath.relpath(files.folder, folder)}: no settings recorded beside it; delete the folder and rerun "
                "`cifar-transfer run` with the options that made it"
            )
            continue
        for path in files.paths():
            if storage.exists(path):
                storage.fs.rm(path)
        log.warning("rebuilding %s", storage.uri(files.folder))
        classes = feature_set_description(storage, folder).classes
        if is_map:
            tsne_map(storage_url, folder, key, settings, classes)
        else:
            train_head(storage_url, folder, key, settings, classes)
    return left


def _recorded_settings(storage: Storage, files: DerivedFiles, settings_type):
    """The settings a map or head was made with: its settings record, else (heads) what its metrics recorded."""
    is_map = isinstance(files, TsneFiles)
    sources = [(files.settings, records.TSNE_SETTINGS if is_map else records.HEAD_SETTINGS, lambda content: content)]
    if isinstance(files, HeadFiles):
        sources.append((files.metrics, records.HEAD_METRICS, lambda content: content["settings"]))
    for path, record, settings_of in sources:
        if storage.exists(path):
            try:
                return settings_type.model_validate(settings_of(record.read(storage.read_bytes(path), storage.uri(path), storage.root)))
            except (ValueError, KeyError, TypeError):
                continue
    return None


def _shard_content_problems(storage: Storage, path: str, spec: FeatureSpec, record) -> list[str]:
    if not storage.exists(path):
        return [SHARD_MISSING]
    payload = storage.read_bytes(path)
    found = []
    if len(payload) != record.bytes:
        found.append(f"{len(payload)} bytes, the manifest says {record.bytes}")
    if hashlib.sha256(payload).hexdigest() != record.sha256:
        found.append("SHA-256 differs from the manifest")
    problem = shard_problem(storage, path, spec, recorded_shard(storage, path, record))
    if problem is not None:
        found.append(problem)
    return found


def repair_config(storage_url: str, folder: str) -> PipelineConfig:
    """The configuration that rebuilds this feature set: its source read again (an archive from the copy kept in
    storage), with the settings that made its features."""
    storage = Storage(storage_url)
    description = feature_set_description(storage, folder)
    spec = description.feature_spec()
    flip = description.rebuild.flip or any(storage.exists(layout.view_folder(folder, view)) for view in VIEWS if view not in SPLITS)
    same_features = {
        "storage": storage_url,
        "backbone": spec.backbone,
        "weights": spec.weights,
        "seed": spec.seed,
        "shard_size": description.rebuild.shard_size,
        "flip": flip,
        "input_size": spec.input_size,
        "pooling": spec.pooling,
        "engine": spec.engine,
        "precision": spec.precision,
    }
    options = stored_source(description.rebuild.collection).rebuild_options(storage, spec, description.rebuild.collection)
    return PipelineConfig(**{**options, **same_features})


def remove_damaged(storage_url: str, folder: str, problems: dict[str, list[str]]) -> None:
    """Delete damaged listed shards, leftovers and their views' manifests, inside the set's view folders only.

    Files the manifest does not list may be someone's work: they stay, reported, for a person to remove.
    """
    storage = Storage(storage_url)
    for relative, found in problems.items():
        view, _, name = relative.partition("/")
        if view not in VIEWS or UNLISTED in found or not layout.is_plain_name(name.lstrip(".")):
            continue
        path = posixpath.join(layout.view_folder(folder, view), name)
        output = posixpath.join(
            layout.view_folder(folder, view), name.removeprefix(".").rsplit(".", 2)[0] if name.endswith(TEMP_SUFFIX) else name
        )
        if held_by_live_writer(storage, output):
            log.warning("left %s alone: a run that may still be working holds its claim", storage.uri(path))
            continue
        if name.endswith((".parquet", TEMP_SUFFIX)) and storage.exists(path):
            storage.fs.rm(path)
            log.warning("removed damaged %s", storage.uri(path))
        if storage.exists(layout.manifest(folder, view)):
            storage.fs.rm(layout.manifest(folder, view))
