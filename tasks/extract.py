"""Tasks: plan the extraction (finished shards are reused without a task run each) and extract a run of shards."""

from __future__ import annotations

from prefect import task
from prefect.runtime import task_run

from cifar_transfer.config import FeatureSpec
from cifar_transfer.extract import ExtractionPlan, extract_shards, plan_extraction
from cifar_transfer.progress import ExtractedShard, ExtractedShards
from cifar_transfer.shard_files import shard_path, shard_problem
from cifar_transfer.shards import Shard
from cifar_transfer.sources.prepared import SourceDataset
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.caching import committed_files_key, output_key_fn, remember_output
from cifar_transfer.tasks.retries import transient_retries


@task(name="plan-extraction", **transient_retries(2, backoff_factor=2))
def plan_extraction_task(storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shard_size: int, flip: bool) -> ExtractionPlan:
    return plan_extraction(storage_url, spec, dataset, shard_size, flip)


def shards_output_key(storage_url: str, spec: FeatureSpec, shards: list[Shard], **_) -> str | None:
    """Cache key of shards that are all committed and check out, None while any is missing or damaged."""
    storage = Storage(storage_url)
    paths = [shard_path(storage, spec, shard) for shard in shards]
    if any(shard_problem(storage, path, spec, shard) is not None for path, shard in zip(paths, shards, strict=True)):
        return None
    return committed_files_key(storage, paths)


def shards_run_name() -> str:
    """`extract[train/00003]`, or `extract[train/00003..test/00001]` for a run of several shards."""
    shards = [Shard.model_validate(shard) for shard in task_run.parameters["shards"]]
    last = f"..{shards[-1].name}" if len(shards) > 1 else ""
    return f"extract[{shards[0].name}{last}]"


@task(
    name="extract",
    task_run_name=shards_run_name,
    cache_key_fn=output_key_fn(shards_output_key, ExtractedShards),
    **transient_retries(2, backoff_factor=2),
)
def extract_shards_task(
    storage_url: str, spec: FeatureSpec, dataset: SourceDataset, shards: list[Shard], batch_size: int
) -> ExtractedShards:
    """Several shards in one task run (`extract.extract_shards`'s pipeline): the run's cost is shared by all of them."""
    extracted = ExtractedShards(shards=extract_shards(storage_url, spec, dataset, shards, batch_size))
    # What later runs find in the cache are reused shards, not computed ones.
    reused = [ExtractedShard(record=one.record, inference_seconds=None) for one in extracted.shards]
    remember_output(ExtractedShards(shards=reused), shards_output_key(storage_url, spec, shards))
    return extracted
