"""Progress of the extraction as shards finish: counts, rate and ETA, independent of who runs the shards."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, Field

from cifar_transfer.feature_records import ShardRecord


class ExtractedShard(BaseModel):
    """A finished shard and how it got there: `inference_seconds` is None when it was reused."""

    record: ShardRecord
    inference_seconds: float | None
    process_id: int = Field(default_factory=os.getpid)


class ExtractedShards(BaseModel):
    """The shards one task run extracted, in order."""

    shards: list[ExtractedShard]


class ExtractionStats(BaseModel):
    shards: int
    shards_computed: int
    images: int
    images_computed: int
    seconds: float
    processes: list[int]  # the processes that computed shards (one per Dask worker that got work)

    @property
    def images_per_second(self) -> float:
        return self.images_computed / self.seconds if self.seconds > 0 else 0.0


class ExtractedFeatures(BaseModel):
    """Every shard of the next version of the features, how the extraction went, and the files that version retires."""

    records: list[ShardRecord]
    stats: ExtractionStats
    retired: dict[str, list[str]] = {}


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ExtractionProgress:
    """Shards finished so far. Shards reused from an earlier run (the plan's, and any a task found done
    meanwhile) count towards progress but not towards the rate."""

    def __init__(self, reused: list[ExtractedShard], shards: int):
        self.started = time.perf_counter()
        self.shards = shards
        self.records: list[ShardRecord] = [extracted.record for extracted in reused]
        self.images = sum(record.rows for record in self.records)
        self.shards_computed = self.images_computed = 0
        self.processes: set[int] = set()

    @property
    def fraction(self) -> float:
        return len(self.records) / self.shards if self.shards else 1.0

    @property
    def rate(self) -> float:
        """Images computed per second since the extraction started (0 before any)."""
        return self.images_computed / (time.perf_counter() - self.started) if self.images_computed else 0.0

    def add(self, extracted: ExtractedShard) -> str:
        """Count one finished shard; returns the progress line to log (counts, images/s, ETA)."""
        self.records.append(extracted.record)
        self.images += extracted.record.rows
        if extracted.inference_seconds is not None:
            self.processes.add(extracted.process_id)
            self.shards_computed += 1
            self.images_computed += extracted.record.rows
        rate = self.rate
        remaining_images = (self.shards - len(self.records)) * (self.images / len(self.records))
        eta = duration(remaining_images / rate) if rate and remaining_images else "-"
        return (
            f"extraction: {len(self.records)}/{self.shards} shards, {self.images} images ({self.images_computed} computed), "
            f"{rate:.0f} images/s, ETA {eta}"
        )

    def stats(self) -> ExtractionStats:
        return ExtractionStats(
            shards=len(self.records),
            shards_computed=self.shards_computed,
            images=self.images,
            images_computed=self.images_computed,
            seconds=time.perf_counter() - self.started,
            processes=sorted(self.processes),
        )

    def sorted_records(self) -> list[ShardRecord]:
        return sorted(self.records, key=lambda record: (record.split, record.number))
