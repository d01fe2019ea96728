"""Evicting feature sets (`cifar-transfer rm`, `cifar-transfer gc`): whole folders, heads and maps included.

Nothing on storage records a reader, so "in use" is judged from what writers leave:
- a live claim: a writer that may still be working holds the claim of one of the set's shards (each shard its
  manifests list, and each `.claim` file found in the folder); such a set is always kept, `force` or not;
- fresh files: the set's newest file (any file, hidden ones included) is younger than the grace period. A flow run
  shows itself only by what it writes (a map, a head, a report, a commit), so a set written to within the grace
  period is kept unless `force`. A run that reads the set without writing for longer than the grace period (a
  long head fit) is invisible: choose the grace period to cover the longest such stage.
Plans are dry runs; `evict` checks each set again right before deleting it, so a writer that started since the
plan still keeps its set. Between that check and the deletion there is no lock: a writer starting in those
milliseconds loses its set, and its rerun recomputes it. A set is deleted manifests first, so if the deletion
stops half-way, readers see incomplete views (and `extract` recomputes them), never a view missing shards.
"""

from __future__ import annotations

import os
import posixpath
import time

from pydantic import BaseModel

from cifar_transfer import layout
from cifar_transfer.catalogue import list_feature_sets
from cifar_transfer.claims import held_by_live_writer
from cifar_transfer.errors import ConfigError
from cifar_transfer.feature_records import FeatureSetInfo, read_manifest
from cifar_transfer.shards import VIEWS
from cifar_transfer.storage import Storage, modified_time

GRACE_SECONDS = 600.0


class SetEviction(BaseModel):
    """One feature set as an eviction judged it: it goes when `kept_because` is None."""

    folder: str
    fingerprint: str
    created_at: str
    bytes: int  # every file in its folder, as storage lists them: what deleting it frees
    kept_because: str | None = None


class EvictionPlan(BaseModel):
    """What an eviction deletes (`evict`), what it keeps and why (`keep`), and the names that matched no set."""

    storage_url: str
    grace_seconds: float
    force: bool
    evict: list[SetEviction] = []
    keep: list[SetEviction] = []
    unknown: list[str] = []

    @property
    def bytes_freed(self) -> int:
        return sum(entry.bytes for entry in self.evict)


def plan_removal(storage_url: str, names: list[str], grace_seconds: float = GRACE_SECONDS, force: bool = False) -> EvictionPlan:
    """The sets named by fingerprint (or folder name) that may go now; nothing is deleted."""
    found = list_feature_sets(storage_url)
    chosen = [info for info in found if {info.fingerprint, posixpath.basename(info.folder)} & set(names)]
    unknown = [name for name in names if not any(name in (info.fingerprint, posixpath.basename(info.folder)) for info in found)]
    return _plan(storage_url, chosen, [], grace_seconds, force, unknown)


def plan_gc(storage_url: str, keep: int, grace_seconds: float = GRACE_SECONDS, force: bool = False) -> EvictionPlan:
    """Keep the `keep` newest sets (by `created_at`); the others go unless in use. Nothing is deleted."""
    if keep < 0:
        raise ConfigError(f"--keep must be 0 or more, not {keep}")
    found = list_feature_sets(storage_url)  # newest first
    return _plan(storage_url, found[keep:], found[:keep], grace_seconds, force, [])


def evict(plan: EvictionPlan) -> EvictionPlan:
    """Delete the plan's sets that are still not in use, each checked again first; returns what was done
    (a set that is gone meanwhile is left out)."""
    storage = Storage(plan.storage_url)
    current = {info.folder: info for info in list_feature_sets(plan.storage_url)}
    done = plan.model_copy(update={"evict": [], "keep": list(plan.keep)})
    for entry in plan.evict:
        if entry.folder not in current:
            continue
        now = judge(storage, current[entry.folder], plan.grace_seconds, plan.force)
        if now.kept_because is None:
            _delete(storage, now.folder)
        (done.evict if now.kept_because is None else done.keep).append(now)
    return done


def judge(storage: Storage, info: FeatureSetInfo, grace_seconds: float, force: bool) -> SetEviction:
    """Whether the set may be deleted now, with the bytes deleting it frees (links count for nothing: deleting a link
    frees nothing of its target)."""
    if outside := _outside_root(storage, info.folder):
        return SetEviction(folder=info.folder, fingerprint=info.fingerprint, created_at=info.created_at, bytes=0, kept_because=outside)
    files = storage.fs.find(info.folder, detail=True)
    reason = _live_writer(storage, info.folder, list(files)) or (None if force else _fresh(files, grace_seconds))
    return SetEviction(
        folder=info.folder,
        fingerprint=info.fingerprint,
        created_at=info.created_at,
        bytes=sum(entry.get("size") or 0 for entry in files.values() if not entry.get("islink")),
        kept_because=reason,
    )


def _outside_root(storage: Storage, folder: str) -> str | None:
    """Why a local set is never deleted through its path: it is a link, or resolves out of the storage root."""
    if not storage.is_local:
        return None
    root = os.path.realpath(storage.root)
    if os.path.islink(folder) or os.path.commonpath([root, os.path.realpath(folder)]) != root:
        return (
            f"{posixpath.basename(folder)} is a link out of the storage root, never followed: delete the link itself if the set is unwanted"
        )
    return None


def _plan(
    storage_url: str, candidates: list[FeatureSetInfo], newest: list[FeatureSetInfo], grace_seconds: float, force: bool, unknown: list[str]
) -> EvictionPlan:
    storage = Storage(storage_url)
    plan = EvictionPlan(storage_url=storage_url, grace_seconds=grace_seconds, force=force, unknown=unknown)
    for info in newest:
        entry = judge(storage, info, grace_seconds, force)
        plan.keep.append(entry.model_copy(update={"kept_because": f"one of the {len(newest)} newest"}))
    for info in candidates:
        entry = judge(storage, info, grace_seconds, force)
        (plan.evict if entry.kept_because is None else plan.keep).append(entry)
    return plan


def _live_writer(storage: Storage, folder: str, files: list[str]) -> str | None:
    """Why a writer may be working in the set (a live claim on one of its shards), or None."""
    shards = [
        layout.shard_file(folder, view, record.file)
        for view in VIEWS
        if (manifest := read_manifest(storage, folder, view)) is not None
        for record in manifest.shards
    ]
    claimed = [layout.claimed_file(path) for path in files if path.endswith(layout.CLAIM_SUFFIX)]
    for path in dict.fromkeys(shards + claimed):
        if held_by_live_writer(storage, path):
            return f"in use: a live writer holds the claim on {posixpath.relpath(path, folder)}"
    return None


def _fresh(files: dict[str, dict], grace_seconds: float) -> str | None:
    """Why the set counts as in use by its age (its newest file is within the grace period), or None."""
    times = [modified_time(entry) for entry in files.values()]
    known = [seconds for seconds in times if seconds is not None]
    if len(known) < len(times):
        return "in use? its storage gives no modification times (pass --force to delete anyway)"
    age = time.time() - max(known, default=0.0)
    if age < grace_seconds:
        return f"written to {age / 60:.0f} min ago, within the {grace_seconds / 60:g} min grace period (a flow run may be using it)"
    return None


def _delete(storage: Storage, folder: str) -> None:
    """Manifests first (their views turn incomplete for readers), then the description (the set leaves listings),
    then the rest."""
    for view in VIEWS:
        if storage.exists(layout.manifest(folder, view)):
            storage.fs.rm(layout.manifest(folder, view))
    if storage.exists(layout.feature_set_description(folder)):
        storage.fs.rm(layout.feature_set_description(folder))
    storage.fs.rm(folder, recursive=True)
