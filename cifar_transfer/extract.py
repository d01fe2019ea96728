"""Shards: raw images in, backbone features out, each committed as one Parquet file, through one pipeline.

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
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack

import numpy as np
from pydantic import BaseModel

from cifar_transfer.claims import claim
from cifar_transfer.config import FeatureSpec
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.extractors import ComputedFeatures, get_extractor
from cifar_transfer.feature_records import ShardRecord, read_manifest
from cifar_transfer.hardware import usable_cores
from cifar_transfer.pause import pause_at, pausing_at
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
from cifar_transfer.shards import Shard, ShardRows
from cifar_transfer.sources.prepared import SourceDataset
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)

_recent_shard_seconds: collections.deque[float] = collections.deque(maxlen=32)  # this process's last shards
STUCK_AFTER_PEERS = 10  # a shard taking this many times its peers' median is presumed stuck
STUCK_AFTER_AT_LEAST_SECONDS = 300.0
CORES_PER_COMMIT = 4  # cores per thread committing shards (`commit_threads`)


def claim_hold_seconds() -> float | None:
    """How long a shard's claim may be held: 10x the median of this process's recent shards (at least 5 min), so a
    writer that hangs cannot keep a shard from every other run forever; None (the storage's default) before any."""
    if not _recent_shard_seconds:
        return None
    return max(STUCK_AFTER_AT_LEAST_SECONDS, STUCK_AFTER_PEERS * statistics.median(_recent_shard_seconds))


def extract_shard(storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shard: Shard, batch_size: int) -> ExtractedShard:
    """Compute and commit one shard's features, unless a valid copy is already there (see `extract_shards`)."""
    return extract_shards(storage_url, spec, dataset, [shard], batch_size)[0]


def commit_threads() -> int:
    """Threads a pipeline writes, hashes and commits its shards on: one per `CORES_PER_COMMIT` cores, at least one.
    One thread encodes a 1,000-row shard of 4,096 features in about 55 ms: 18,000 images a second, fewer than a
    GPU computes, and on 2 cores the engine's own threads leave no room for a second."""
    return max(1, usable_cores() // CORES_PER_COMMIT)


def extract_shards(
    storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shards: list[Shard], batch_size: int, commits: int | None = None
) -> list[ExtractedShard]:
    """Compute and commit each of `shards` unless a valid copy is already there; their results in order.

    A pipeline keeps the engine busy from one shard to the next: while it computes a shard, one thread claims,
    checks and reads the next one's rows (`_prepare`), and others (`commits`, default `commit_threads()`) write,
    hash and commit the ones before (`_commit`), each shard on its own; the next shard's batches are queued behind
    the current one's (`Extractor.submit`), so the engine does not drain between them. Runs sharing the storage
    compute each shard once: the writer holds the shard's claim (`claims.claim`) from before its read to its commit,
    and a run that waited for it finds it done and reuses it.
    """
    results: dict[int, ExtractedShard | Future[ExtractedShard]] = {}
    in_flight: _InFlight | None = None
    spare: list[np.ndarray] = []  # features arrays of committed shards, for the engine to fill again
    with (
        ExitStack() as claims,
        ThreadPoolExecutor(1, "shard-read") as reading,
        ThreadPoolExecutor(commits or commit_threads(), "shard-commit") as committing,
    ):
        upcoming = reading.submit(_prepare, storage_url, spec, dataset, shards[0], claims) if shards else None
        for number, shard in enumerate(shards):
            assert upcoming is not None
            prepared = upcoming.result()
            upcoming = (
                reading.submit(_prepare, storage_url, spec, dataset, shards[number + 1], claims) if number + 1 < len(shards) else None
            )
            if isinstance(prepared, ExtractedShard):
                results[number] = prepared
                continue
            if pausing_at(shard.name):  # the test hook holds this shard with every shard before it committed
                _finish(in_flight, committing, results, spare)
                in_flight = None
                wait([result for result in results.values() if isinstance(result, Future)])
                pause_at(shard.name)
            extractor = get_extractor(spec, prepared.images.shape[1:], storage_url)
            submitted = _InFlight(number, prepared, extractor.submit(prepared.images, batch_size, spare.pop() if spare else None))
            _finish(in_flight, committing, results, spare)  # the engine computes `submitted` meanwhile
            in_flight = submitted
        _finish(in_flight, committing, results, spare)
        return [result.result() if isinstance(result, Future) else result for _, result in sorted(results.items())]


class _Prepared:
    """A shard claimed and read, ready for the engine; its claim (`held`) is kept until its commit."""

    def __init__(self, storage: Storage, spec: FeatureSpec, shard: Shard, images: np.ndarray, rows: ShardRows, held: ExitStack):
        self.storage, self.spec, self.shard, self.images, self.rows, self.held = storage, spec, shard, images, rows, held
        self.path = shard_path(storage, spec, shard)
        self.claimed_at = time.perf_counter()


class _InFlight:
    """A shard whose batches are queued on the engine."""

    def __init__(self, number: int, prepared: _Prepared, features: ComputedFeatures):
        self.number, self.prepared, self.features = number, prepared, features


def _prepare(storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shard: Shard, claims: ExitStack) -> _Prepared | ExtractedShard:
    """Claim one shard and read its rows, or take its finished copy when there is one (found before or after the claim)."""
    storage = Storage(storage_url)
    path = shard_path(storage, spec, shard)
    listed = listed_record(read_manifest(storage, features_folder(storage, spec), shard.split), shard)
    if shard_problem(storage, path, spec, shard, listed) is None:
        return _reused(storage, path, shard, listed, "already done")
    held = ExitStack()
    claims.callback(held.close)  # let go when the pipeline ends, whatever happened; a commit lets go sooner
    held.enter_context(claim(storage, path, claim_hold_seconds()))
    problem = shard_problem(storage, path, spec, shard, listed)
    if problem is None:
        held.close()
        return _reused(storage, path, shard, listed, "done by another run meanwhile")
    conflict = shard_size_conflict(storage, path, spec, shard) if problem != SHARD_MISSING else None
    if conflict:
        raise FeatureSetError(conflict)
    if problem != SHARD_MISSING:
        log.warning("extract[%s]: existing file is %s; recomputing it", shard.name, problem)
    images, rows = dataset.shard_rows(storage_url, shard, spec.input_size)
    return _Prepared(storage, spec, shard, images, rows, held)


def _finish(
    shard: _InFlight | None,
    committing: ThreadPoolExecutor,
    results: dict[int, ExtractedShard | Future[ExtractedShard]],
    spare: list[np.ndarray],
) -> None:
    """Wait for the engine to finish `shard`, then hand it to the commit thread; once committed (its file written
    and nothing left that reads its features), its features array goes to `spare`."""
    if shard is not None:
        features = shard.features.result()
        committed = committing.submit(_commit, shard.prepared, features, shard.features.engine_seconds)

        def reuse(done: Future[ExtractedShard]) -> None:
            if done.exception() is None:  # a failed commit's traceback may still hold a table over the array
                spare.append(features)

        committed.add_done_callback(reuse)
        results[shard.number] = committed


def _commit(prepared: _Prepared, features: np.ndarray, seconds: float) -> ExtractedShard:
    """Write, hash and commit one computed shard, then let its claim go."""
    shard = prepared.shard
    with prepared.held:
        record = write_shard(prepared.storage, prepared.path, shard, shard_table(prepared.spec, shard, prepared.rows, features))
    _recent_shard_seconds.append(time.perf_counter() - prepared.claimed_at)
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
