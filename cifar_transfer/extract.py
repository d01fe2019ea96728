"""One shard: raw images in, backbone features out, committed as one Parquet file.

The plan and each shard's images come from the source (`sources.kinds.SourceDataset`), whatever its kind.
A shard that is already on storage, readable, with the right fingerprint and rows (or items) is never
recomputed: the plan (`plan_extraction`) reuses it without a task run of its own (thousands of Cached task
runs would cost the API more than the check), and a task that finds its shard done meanwhile reuses it too.
The backbone is built only when some shard really needs computing: once per
process, then reused for every shard that process gets.
"""

from __future__ import annotations

import collections
import logging
import statistics
import threading
import time

from pydantic import BaseModel

from cifar_transfer.claims import claim
from cifar_transfer.config import FeatureSpec
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.extractors import get_extractor
from cifar_transfer.feature_records import ShardRecord, read_manifest
from cifar_transfer.pause import pause_at
from cifar_transfer.progress import ExtractedShard
from cifar_transfer.shard_files import (
    SHARD_MISSING,
    existing_shard_record,
    features_folder,
    listed_record,
    shard_path,
    shard_problem,
    shard_size_conflict,
    shard_table,
    write_shard,
)
from cifar_transfer.shards import Shard
from cifar_transfer.sources.prepared import SourceDataset
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)

_inference_lock = threading.Lock()
_recent_shard_seconds: collections.deque[float] = collections.deque(maxlen=32)  # this process's last shards
STUCK_AFTER_PEERS = 10  # a shard taking this many times its peers' median is presumed stuck
STUCK_AFTER_AT_LEAST_SECONDS = 300.0


def claim_hold_seconds() -> float | None:
    """How long a shard's claim may be held: 10x the median of this process's recent shards (at least 5 min), so a
    writer that hangs cannot keep a shard from every other run forever; None (the storage's default) before any."""
    if not _recent_shard_seconds:
        return None
    return max(STUCK_AFTER_AT_LEAST_SECONDS, STUCK_AFTER_PEERS * statistics.median(_recent_shard_seconds))


def extract_shard(storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shard: Shard, batch_size: int) -> ExtractedShard:
    """Compute and commit one shard's features, unless a valid copy is already there.

    Runs sharing the storage compute each shard once: the writer holds the shard's claim
    (`claims.claim`), and a run that waited for it finds the shard done and reuses it.
    """
    storage = Storage(storage_url)
    path = shard_path(storage, spec, shard)
    listed = listed_record(read_manifest(storage, features_folder(storage, spec), shard.split), shard)
    if shard_problem(storage, path, spec, shard, listed) is None:
        return _reused(storage, path, shard, listed, "already done")
    with claim(storage, path, claim_hold_seconds()):
        claimed_at = time.perf_counter()
        problem = shard_problem(storage, path, spec, shard, listed)
        if problem is None:
            return _reused(storage, path, shard, listed, "done by another run meanwhile")
        conflict = shard_size_conflict(storage, path, spec, shard) if problem != SHARD_MISSING and shard.items is None else None
        if conflict:
            raise FeatureSetError(conflict)
        if problem != SHARD_MISSING:
            log.warning("extract[%s]: existing file is %s; recomputing it", shard.name, problem)
        images, rows = dataset.shard_rows(storage_url, shard, spec.input_size)
        extractor = get_extractor(spec, images.shape[1:], storage_url)
        with _inference_lock:  # one shard at a time on the engine; the other thread reads or writes meanwhile
            pause_at(shard.name)  # a test hook, inert unless CIFAR_TRANSFER_PAUSE_AT names this shard
            started = time.perf_counter()
            features = extractor(images, batch_size)
            seconds = time.perf_counter() - started
        record = write_shard(storage, path, shard, shard_table(spec, shard, rows, features))
    _recent_shard_seconds.append(time.perf_counter() - claimed_at)
    log.info("extract[%s]: %d images in %.1f s (%.0f images/s)", shard.name, record.rows, seconds, record.rows / max(seconds, 1e-9))
    return ExtractedShard(record=record, inference_seconds=seconds)


class ExtractionPlan(BaseModel):
    reused: list[ExtractedShard]  # finished and valid: taken as they are
    to_compute: list[Shard]
    retired: dict[str, list[str]] = {}  # a collection's shard files the next manifest version no longer lists


def plan_extraction(storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shard_size: int, flip: bool) -> ExtractionPlan:
    """Every shard of the features (an archive's fixed row ranges, or a collection's incremental plan), split into
    those already finished (checked as `extract_shard` checks them) and those to compute."""
    storage = Storage(storage_url)
    folder = features_folder(storage, spec)
    shards, retired = dataset.plan_shards(storage, folder, shard_size, flip)
    manifests = {split: read_manifest(storage, folder, split) for split in {shard.split for shard in shards}}
    reused, to_compute = [], []
    for shard in shards:
        path = shard_path(storage, spec, shard)
        listed = listed_record(manifests[shard.split], shard)
        if shard_problem(storage, path, spec, shard, listed) is None:
            reused.append(reused_shard(storage, path, shard, listed))
        else:
            to_compute.append(shard)
    log.info(
        "extraction plan: %d of %d shards already done (reused as they are), %d to compute, %d replaced",
        len(reused),
        len(shards),
        len(to_compute),
        sum(len(files) for files in retired.values()),
    )
    return ExtractionPlan(reused=reused, to_compute=to_compute, retired=retired)


def reused_shard(storage: Storage, path: str, shard: Shard, listed: ShardRecord | None = None) -> ExtractedShard:
    """A finished shard taken as it is (with the manifest's record of it, when there is one)."""
    return ExtractedShard(record=existing_shard_record(storage, path, shard, listed), inference_seconds=None)


def _reused(storage: Storage, path: str, shard: Shard, listed: ShardRecord | None, why: str) -> ExtractedShard:
    log.info("extract[%s]: %s, reusing %s", shard.name, why, storage.uri(path))
    return reused_shard(storage, path, shard, listed)
