"""Task: choose the engine and precision of a run (a reduced precision must pass its calibration)."""

from __future__ import annotations

from prefect import task

from cifar_transfer.config import ExtractionSettings
from cifar_transfer.engines import EngineChoice, choose_engine_for_dataset
from cifar_transfer.sources.prepared import SourceDataset


@task(name="choose-engine")
def choose_engine_task(settings: ExtractionSettings, storage_url: str, dataset: SourceDataset) -> EngineChoice:
    return choose_engine_for_dataset(settings, storage_url, dataset)
