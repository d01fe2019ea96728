"""Shards in task runs sized by time, collected as they finish, with progress in the logs and as a Prefect progress
artifact."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed

from cifar_transfer.feature_records import ShardRecord
from cifar_transfer.progress import ExtractedShard, ExtractedShards, ExtractionProgress, ExtractionStats
from cifar_transfer.shards import Shard

log = logging.getLogger("cifar_transfer.extract")
PROGRESS_KEY = "cifar-transfer-extraction"
RUN_SECONDS = 20.0  # the engine's time a task run of shards is sized to: its orchestration is small against it


def extract_in_runs(
    reused: list[ExtractedShard],
    to_compute: list[Shard],
    submit: Callable[[list[Shard]], PrefectFuture[ExtractedShards]],
    runs_at_once: int,
) -> tuple[list[ShardRecord], ExtractionStats]:
    """Every shard's record (sorted) and the extraction's stats, logging rate and ETA as task runs finish.

    `runs_at_once` task runs are kept going (so one's start and end overlap another's work). The first ones get one
    shard each; later ones as many as the engine does in about `RUN_SECONDS` at the rate measured so far, so a
    task run's cost stays small against its work whatever the engine's speed, and progress still shows that often.
    """
    progress = ExtractionProgress(reused, len(reused) + len(to_compute))
    artifact = create_progress_artifact(100.0 * progress.fraction, key=PROGRESS_KEY, description="feature extraction: shards finished")
    assert isinstance(artifact, UUID), "called from synchronous code, Prefect returns the artifact's id"
    waiting, running = deque(to_compute), set[PrefectFuture[ExtractedShards]]()
    shard_images = sum(shard.rows for shard in to_compute) / max(len(to_compute), 1)
    while waiting or running:
        while waiting and len(running) < runs_at_once:
            count = shards_per_run(progress.rate, shard_images, runs_at_once, len(waiting))
            running.add(submit([waiting.popleft() for _ in range(count)]))
        finished = next(as_completed(list(running)))
        running.remove(finished)
        lines = [progress.add(extracted) for extracted in finished.result().shards]
        log.info(lines[-1])
        update_progress_artifact(artifact, 100.0 * progress.fraction)
    return progress.sorted_records(), progress.stats()


def shards_per_run(rate: float, shard_images: float, runs_at_once: int, waiting: int) -> int:
    """Shards for the next task run: about `RUN_SECONDS` of the engine at `rate` images/s shared by `runs_at_once`
    runs (one while no rate is known), never more than a fair share of what is left."""
    wanted = RUN_SECONDS * rate / runs_at_once / max(shard_images, 1.0) if rate else 1.0
    return max(1, min(round(wanted), math.ceil(waiting / runs_at_once)))
