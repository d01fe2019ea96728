"""Tasks: plan the extraction (finished shards are reused without a task run each) and extract one shard."""

from __future__ import annotations

from prefect import task

from cifar_transfer.config import FeatureSpec
from cifar_transfer.extract import ExtractionPlan, extract_shard, plan_extraction
from cifar_transfer.progress import ExtractedShard
from cifar_transfer.shard_files import shard_path, shard_problem
from cifar_transfer.shards import Shard
from cifar_transfer.sources.prepared import SourceDataset
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.caching import committed_files_key, output_key_fn, remember_output
from cifar_transfer.tasks.retries import transient_retries


@task(name="plan-extraction", **transient_retries(2, backoff_factor=2))
def plan_extraction_task(storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shard_size: int, flip: bool) -> ExtractionPlan:
    return plan_extraction(storage_url, spec, dataset, shard_size, flip)


def shard_output_key(storage_url: str, spec: FeatureSpec, shard: Shard, **_) -> str | None:
    """Cache key of a committed shard that checks out, None for a missing or damaged one."""
    storage = Storage(storage_url)
    path = shard_path(storage, spec, shard)
    if shard_problem(storage, path, spec, shard) is not None:
        return None
    return committed_files_key(storage, [path])


@task(
    name="extract",
    task_run_name="extract[{shard.split}/{shard.number:05d}]",
    cache_key_fn=output_key_fn(shard_output_key, ExtractedShard),
    **transient_retries(2, backoff_factor=2),
)
def extract_shard_task(storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shard: Shard, batch_size: int) -> ExtractedShard:
    extracted = extract_shard(storage_url, spec, dataset, shard, batch_size)
    # What later runs find in the cache is a reused shard, not a computed one.
    remember_output(ExtractedShard(record=extracted.record, inference_seconds=None), shard_output_key(storage_url, spec, shard))
    return extracted
