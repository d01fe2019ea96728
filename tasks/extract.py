"""One shard: raw images in, backbone features out, committed as one Parquet file.

A shard that is already on storage, readable, with the right fingerprint and
row range is never recomputed: the plan (`plan_extraction`) reuses it without
a task run of its own (thousands of Cached task runs would cost the API more
than the check), and a task that finds its shard done meanwhile reuses it too.
The backbone is built only when some shard really needs computing: once per
process, then reused for every shard that process gets.
"""

from __future__ import annotations

import os
import threading
import time

from prefect import task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

from tasks.caching import committed_file_key, output_key_fn, remember_output
from tasks.cifar import DatasetInfo, Shard, shard_images
from tasks.config import FeatureSpec
from tasks.engines import get_extractor
from tasks.errors import FeatureSetError, retry_on_transient
from tasks.logs import logger
from tasks.storage import Storage
from tasks.store import (
    Manifest,
    ShardRecord,
    existing_shard_record,
    features_folder,
    read_manifest,
    shard_path,
    shard_problem,
    shard_size_conflict,
    shard_table,
    write_shard,
)

_inference_lock = threading.Lock()


class ExtractedShard(BaseModel):
    """A finished shard and how it got there: `inference_seconds` is None when it was reused."""

    record: ShardRecord
    inference_seconds: float | None
    process_id: int = Field(default_factory=os.getpid)


def extract_shard(storage_url: str, spec: FeatureSpec, dataset: DatasetInfo, shard: Shard, batch_size: int) -> ExtractedShard:
    """Compute and commit one shard's features, unless a valid copy is already there.

    Runs sharing the storage compute each shard once: the writer holds the shard's claim
    (`Storage.claim`), and a run that waited for it finds the shard done and reuses it.
    """
    log = logger()
    storage = Storage(storage_url)
    path = shard_path(storage, spec, shard)
    if shard_problem(storage, path, spec, shard) is None:
        return _reused(storage, path, shard, "already done")
    with storage.claim(path):
        problem = shard_problem(storage, path, spec, shard)
        if problem is None:
            return _reused(storage, path, shard, "done by another run meanwhile")
        conflict = shard_size_conflict(storage, path, spec, shard) if problem != "missing" else None
        if conflict:
            raise FeatureSetError(conflict)
        if problem != "missing":
            log.warning("extract[%s]: existing file is %s; recomputing it", shard.name, problem)
        images, labels = shard_images(storage_url, dataset, shard)
        extractor = get_extractor(spec, images.shape[1:])
        with _inference_lock:  # one shard at a time on the engine; the other thread reads or writes meanwhile
            started = time.perf_counter()
            features = extractor(images, batch_size)
            seconds = time.perf_counter() - started
        record = write_shard(storage, path, shard, shard_table(spec, shard, labels, features))
    log.info("extract[%s]: %d images in %.1f s (%.0f images/s)", shard.name, shard.rows, seconds, shard.rows / max(seconds, 1e-9))
    return ExtractedShard(record=record, inference_seconds=seconds)


class ExtractionPlan(BaseModel):
    reused: list[ExtractedShard]  # finished and valid: taken as they are
    to_compute: list[Shard]


def plan_extraction(storage_url: str, spec: FeatureSpec, shards: list[Shard]) -> ExtractionPlan:
    """Split `shards` into those already finished (checked as `extract_shard` checks them) and those to compute."""
    storage = Storage(storage_url)
    folder = features_folder(storage, spec)
    manifests = {split: read_manifest(storage, folder, split) for split in {shard.split for shard in shards}}
    reused, to_compute = [], []
    for shard in shards:
        path = shard_path(storage, spec, shard)
        if shard_problem(storage, path, spec, shard) is None:
            reused.append(reused_shard(storage, path, shard, manifests[shard.split]))
        else:
            to_compute.append(shard)
    logger().info("extraction plan: %d of %d shards already done (reused as they are), %d to compute",
                  len(reused), len(shards), len(to_compute))
    return ExtractionPlan(reused=reused, to_compute=to_compute)


@task(name="plan-extraction", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=retry_on_transient)
def plan_extraction_task(storage_url: str, spec: FeatureSpec, shards: list[Shard]) -> ExtractionPlan:
    return plan_extraction(storage_url, spec, shards)


def reused_shard(storage: Storage, path: str, shard: Shard, manifest: Manifest | None = None) -> ExtractedShard:
    """A finished shard taken as it is (its record from `manifest` when that lists it)."""
    return ExtractedShard(record=existing_shard_record(storage, path, shard, manifest), inference_seconds=None)


def _reused(storage: Storage, path: str, shard: Shard, why: str) -> ExtractedShard:
    logger().info("extract[%s]: %s, reusing %s", shard.name, why, storage.uri(path))
    return reused_shard(storage, path, shard)


def shard_output_key(storage_url: str, spec: FeatureSpec, shard: Shard, **_) -> str | None:
    """Cache key of a committed shard that checks out, None for a missing or damaged one."""
    storage = Storage(storage_url)
    path = shard_path(storage, spec, shard)
    if shard_problem(storage, path, spec, shard) is not None:
        return None
    return committed_file_key(storage, path)


@task(
    name="extract",
    task_run_name="extract[{shard.split}/{shard.number:05d}]",
    cache_key_fn=output_key_fn(shard_output_key, ExtractedShard),
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
)
def extract_shard_task(storage_url: str, spec: FeatureSpec, dataset: DatasetInfo, shard: Shard, batch_size: int) -> ExtractedShard:
    extracted = extract_shard(storage_url, spec, dataset, shard, batch_size)
    # What later runs find in the cache is a reused shard, not a computed one.
    remember_output(ExtractedShard(record=extracted.record, inference_seconds=None), shard_output_key(storage_url, spec, shard))
    return extracted
