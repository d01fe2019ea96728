"""Collecting shard futures as they finish, with progress in the logs and as a Prefect progress artifact."""

from __future__ import annotations

import logging
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed

from cifar_transfer.feature_records import ShardRecord
from cifar_transfer.progress import ExtractedShard, ExtractionProgress, ExtractionStats

log = logging.getLogger("cifar_transfer.extract")
PROGRESS_KEY = "cifar-transfer-extraction"


def wait_for_shards(
    reused: list[ExtractedShard], futures: list[PrefectFuture[ExtractedShard]]
) -> tuple[list[ShardRecord], ExtractionStats]:
    """Every shard's record (sorted) and the extraction's stats, logging rate and ETA as shards finish."""
    progress = ExtractionProgress(reused, len(reused) + len(futures))
    artifact = create_progress_artifact(100.0 * progress.fraction, key=PROGRESS_KEY, description="feature extraction: shards finished")
    assert isinstance(artifact, UUID), "called from synchronous code, Prefect returns the artifact's id"
    for future in as_completed(futures):
        log.info(progress.add(future.result()))
        update_progress_artifact(artifact, 100.0 * progress.fraction)
    return progress.sorted_records(), progress.stats()
