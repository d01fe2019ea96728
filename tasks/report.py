"""What people see of a run: progress while shards finish, then a summary and artifacts.

Artifact keys are stable across runs, so the Prefect UI shows their history.
"""

from __future__ import annotations

import json
import time

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture, as_completed
from pydantic import BaseModel

from tasks.config import PipelineConfig
from tasks.extract import ExtractedShard
from tasks.head import HeadResult
from tasks.logs import logger
from tasks.storage import Storage
from tasks.store import FeatureSetInfo, ShardRecord
from tasks.tsne import TsneResult

PROGRESS_KEY = "cifar-transfer-extraction"
METRICS_KEY = "cifar-transfer-metrics"
SUMMARY_KEY = "cifar-transfer-summary"
FEATURES_LINK_KEY = "cifar-transfer-features"


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


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def wait_for_shards(futures: list[PrefectFuture[ExtractedShard]]) -> tuple[list[ShardRecord], ExtractionStats]:
    """Collect shard results as they finish, logging progress with rate and ETA.

    Shards reused from an earlier run (Prefect shows them Cached) count
    towards progress but not towards the rate.
    """
    log = logger()
    started = time.perf_counter()
    progress_id = create_progress_artifact(0.0, key=PROGRESS_KEY, description="feature extraction: shards finished")
    records: list[ShardRecord] = []
    total_images = 0
    computed_shards = computed_images = 0
    processes: set[int] = set()
    for future in as_completed(futures):
        extracted: ExtractedShard = future.result()
        record = extracted.record
        records.append(record)
        total_images += record.rows
        if extracted.inference_seconds is not None:
            processes.add(extracted.process_id)
            computed_shards += 1
            computed_images += record.rows
        elapsed = time.perf_counter() - started
        rate = computed_images / elapsed if computed_images else 0.0
        remaining = len(futures) - len(records)
        remaining_images = remaining * (total_images / len(records))
        eta = _duration(remaining_images / rate) if rate and remaining else "-"
        log.info(
            "extraction: %d/%d shards, %d images (%d computed), %.0f images/s, ETA %s",
            len(records), len(futures), total_images, computed_images, rate, eta,
        )
        update_progress_artifact(progress_id, 100.0 * len(records) / len(futures))
    stats = ExtractionStats(
        shards=len(records), shards_computed=computed_shards, images=total_images,
        images_computed=computed_images, seconds=time.perf_counter() - started, processes=sorted(processes),
    )
    return sorted(records, key=lambda record: (record.split, record.number)), stats


def summarize(config: PipelineConfig, features: FeatureSetInfo, extraction: ExtractionStats | None,
              tsne: TsneResult | None, head: HeadResult) -> dict:
    """The run's outcome as one JSON-able dict: where things are, how long, how good."""
    metrics = json.loads(Storage(config.storage).read_bytes(head.metrics))
    return {
        "features": features.folder,
        "fingerprint": features.fingerprint,
        "feature_shape": features.feature_shape,
        "feature_spec": features.spec,
        "images": features.splits,
        "extraction": extraction.model_dump() | {"images_per_second": extraction.images_per_second} if extraction else None,
        "tsne": tsne.model_dump() if tsne else None,
        "head": head.model_dump(),
        "per_class_accuracy": metrics["per_class_accuracy"],
        "test_accuracy": head.test_accuracy,
        "config": config.model_dump(),
    }


def metrics_rows(summary: dict) -> list[dict]:
    head = summary["head"]
    rows = [
        {"metric": "test accuracy", "value": f"{head['test_accuracy']:.4f}"},
        {"metric": "validation accuracy (best epoch)", "value": f"{head['validation_accuracy']:.4f}"},
        {"metric": "best epoch", "value": str(head["best_epoch"])},
    ]
    rows += [{"metric": f"test accuracy: {name}", "value": f"{value:.4f}"} for name, value in summary["per_class_accuracy"].items()]
    if summary["extraction"]:
        extraction = summary["extraction"]
        rows += [
            {"metric": "extraction seconds", "value": f"{extraction['seconds']:.1f}"},
            {"metric": "extraction images/s", "value": f"{extraction['images_per_second']:.1f}"},
            {"metric": "shards computed / total", "value": f"{extraction['shards_computed']}/{extraction['shards']}"},
        ]
    if summary["tsne"]:
        rows.append({"metric": "t-SNE seconds", "value": f"{summary['tsne']['seconds']:.1f}"})
    rows.append({"metric": "head seconds", "value": f"{head['seconds']:.1f}"})
    return rows


def summary_markdown(summary: dict) -> str:
    head, spec = summary["head"], summary["feature_spec"]
    lines = [
        "# CIFAR-10 transfer learning",
        "",
        f"**Test accuracy: {head['test_accuracy']:.2%}** ({spec['backbone']} at {spec['input_size']}px, {spec['pooling']} pooling, "
        f"weights {spec['weights_id']}; best epoch {head['best_epoch']} on validation)",
        "",
        f"- Parquet features: `{summary['features']}` (fingerprint `{summary['fingerprint']}`, feature shape {summary['feature_shape']})",
    ]
    if summary["tsne"]:
        lines.append(f"- t-SNE map: `{summary['tsne']['picture']}` (points: `{summary['tsne']['embedding']}`)")
    lines += [
        f"- Confusion matrix: `{head['confusion_picture']}`",
        f"- Head model: `{head['model']}`; metrics: `{head['metrics']}`",
    ]
    return "\n".join(lines) + "\n"


def publish_report(summary: dict) -> None:
    """Log the outcome and publish it as Prefect artifacts: a metrics table and a markdown summary."""
    create_table_artifact(metrics_rows(summary), key=METRICS_KEY, description="CIFAR-10 transfer learning: accuracy and timings")
    create_markdown_artifact(summary_markdown(summary), key=SUMMARY_KEY, description="CIFAR-10 transfer learning: run summary")
    storage = Storage(summary["config"]["storage"])
    if not storage.is_local:
        create_link_artifact(storage.uri(summary["features"]), link_text="Parquet features", key=FEATURES_LINK_KEY,
                             description="where this run's feature shards are")
    logger().info("test accuracy %.2f%%; features in %s", 100 * summary["test_accuracy"], summary["features"])


@task(name="report")
def publish_report_task(config: PipelineConfig, features: FeatureSetInfo, extraction: ExtractionStats | None,
                        tsne: TsneResult | None, head: HeadResult) -> dict:
    summary = summarize(config, features, extraction, tsne, head)
    publish_report(summary)
    return summary
