"""Check a feature set by content, and repair what is wrong.

Existence is not proof: every shard the manifest lists must have the listed
size and SHA-256 and carry the set's fingerprint and row range in its footer.
Files the manifest does not list and leftover temporary files are reported
too. Repair deletes what is damaged (it holds nothing worth keeping) and
reruns the extraction, which recomputes exactly the missing shards.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from tasks.cifar import SPLITS, VIEWS, Shard
from tasks.config import FeatureSpec, PipelineConfig
from tasks.errors import FeatureSetError
from tasks.logs import logger
from tasks.storage import CLAIM_SUFFIX, TEMP_SUFFIX, Storage
from tasks.store import FEATURE_SET_NAME, manifest_path, read_description, read_manifest, shard_problem

UNLISTED = "not listed in the manifest"


def verify_feature_set(storage_url: str, folder: str) -> dict[str, list[str]]:
    """Problems found per file (relative to the set's folder); empty when all is well."""
    storage = Storage(storage_url)
    description = read_description(storage, folder)
    if description is None:
        return {FEATURE_SET_NAME: ["missing or unreadable: this folder is not a finished feature set"]}
    spec = FeatureSpec(**description.spec, weights=description.rebuild["weights"], seed=description.rebuild["seed"])
    problems: dict[str, list[str]] = {}
    for split in VIEWS:
        split_folder = posixpath.join(folder, split)
        if split not in SPLITS and not storage.exists(split_folder):
            continue  # mirrored views exist only when --flip asked for them
        on_disk = {posixpath.basename(path) for path in storage.fs.ls(split_folder, detail=False)} if storage.exists(split_folder) else set()
        for name in sorted(on_disk):
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                problems.setdefault(f"{split}/{name}", []).append("leftover temporary file of an interrupted write")
            if name.startswith(".") and name.endswith(CLAIM_SUFFIX):
                problems.setdefault(f"{split}/{name}", []).extend(["claim of a run in progress, or of a killed one", UNLISTED])
        try:
            manifest = read_manifest(storage, folder, split)
        except ValueError as exc:
            problems.setdefault(f"{split}/_manifest.json", []).append(f"unreadable ({exc.__class__.__name__})")
            continue
        if manifest is None:
            problems.setdefault(f"{split}/_manifest.json", []).append("missing: the split is incomplete")
            continue
        if manifest.fingerprint != spec.fingerprint:
            problems.setdefault(f"{split}/_manifest.json", []).append(f"belongs to fingerprint {manifest.fingerprint}")
        for name in sorted(name for name in on_disk if name.endswith(".parquet") and not name.startswith(".")):
            if name not in {record.file for record in manifest.shards}:
                problems.setdefault(f"{split}/{name}", []).append(UNLISTED)
        for record in manifest.shards:
            path = posixpath.join(split_folder, record.file)
            found = _shard_content_problems(storage, path, spec, record)
            if found:
                problems[f"{split}/{record.file}"] = found
    return problems


def _shard_content_problems(storage: Storage, path: str, spec: FeatureSpec, record) -> list[str]:
    if not storage.exists(path):
        return ["missing"]
    payload = storage.read_bytes(path)
    found = []
    if len(payload) != record.bytes:
        found.append(f"{len(payload)} bytes, the manifest says {record.bytes}")
    if hashlib.sha256(payload).hexdigest() != record.sha256:
        found.append("SHA-256 differs from the manifest")
    shard = Shard(split=record.split, number=record.number, start=record.start, stop=record.stop)
    problem = shard_problem(storage, path, spec, shard)
    if problem is not None:
        found.append(problem)
    return found


def repair_config(storage_url: str, folder: str) -> PipelineConfig:
    """The configuration that rebuilds this feature set from the archive kept in storage."""
    storage = Storage(storage_url)
    description = read_description(storage, folder)
    spec = description.spec
    archives = [path for path in storage.fs.glob(storage.path("raw", "*.source.json"))
                if json.loads(storage.read_bytes(path)).get("md5") == spec["dataset_md5"]]
    if not archives:
        raise FeatureSetError(
            f"the archive with MD5 {spec['dataset_md5']} is no longer in {storage.uri(storage.path('raw'))}: "
            "rerun `cifar-transfer extract` with its --source to rebuild these features"
        )
    return PipelineConfig(
        source=storage.uri(archives[0].removesuffix(".source.json")),
        md5=spec["dataset_md5"],
        storage=storage_url,
        backbone=spec["backbone"],
        weights=description.rebuild["weights"],
        seed=description.rebuild["seed"],
        shard_size=description.rebuild["shard_size"],
        input_size=spec["input_size"],
        pooling=spec["pooling"],
        engine=spec["engine"],
        precision=spec["precision"],
    )



def remove_damaged(storage_url: str, folder: str, problems: dict[str, list[str]]) -> None:
    """Delete damaged listed shards, leftovers and their splits' manifests.

    Files the manifest does not list may be someone's work: they stay, reported, for a person to remove.
    """
    storage = Storage(storage_url)
    for relative, found in problems.items():
        path = posixpath.join(folder, relative)
        if UNLISTED in found:
            continue
        if relative.endswith((".parquet", TEMP_SUFFIX)) and storage.exists(path):
            storage.fs.rm(path)
            logger().warning("removed damaged %s", storage.uri(path))
        split = relative.split("/", 1)[0]
        if split in VIEWS and storage.exists(manifest_path(folder, split)):
            storage.fs.rm(manifest_path(folder, split))
