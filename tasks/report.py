"""What people see of a run: progress while shards finish, then a summary and artifacts.

Artifact keys are stable across runs, so the Prefect UI shows their history.
"""

from __future__ import annotations

import json
import posixpath
import time

import numpy as np
import pyarrow.parquet as pq
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

from tasks.cifar import dataset_folder
from tasks.config import PipelineConfig
from tasks.extract import ExtractedShard
from tasks.head import HeadResult
from tasks.html_report import render_html_report
from tasks.logs import logger
from tasks.storage import Storage
from tasks.store import FeatureSetInfo, ShardRecord
from tasks.tsne import TsneResult

PROGRESS_KEY = "cifar-transfer-extraction"
METRICS_KEY = "cifar-transfer-metrics"
SUMMARY_KEY = "cifar-transfer-summary"
FEATURES_LINK_KEY = "cifar-transfer-features"
REPORT_LINK_KEY = "cifar-transfer-report"
MAP_POINTS = 3000  # points of the t-SNE map the HTML report makes interactive (thumbnails and all)


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


def wait_for_shards(reused: list[ExtractedShard], futures: list[PrefectFuture[ExtractedShard]]) -> tuple[list[ShardRecord], ExtractionStats]:
    """Collect shard results as they finish, logging progress with rate and ETA.

    Shards reused from an earlier run (the plan's, and any a task found done
    meanwhile) count towards progress but not towards the rate.
    """
    log = logger()
    started = time.perf_counter()
    shards = len(reused) + len(futures)
    progress_id = create_progress_artifact(100.0 * len(reused) / shards, key=PROGRESS_KEY, description="feature extraction: shards finished")
    records = [extracted.record for extracted in reused]
    total_images = sum(record.rows for record in records)
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
        remaining = shards - len(records)
        remaining_images = remaining * (total_images / len(records))
        eta = _duration(remaining_images / rate) if rate and remaining else "-"
        log.info(
            "extraction: %d/%d shards, %d images (%d computed), %.0f images/s, ETA %s",
            len(records), shards, total_images, computed_images, rate, eta,
        )
        update_progress_artifact(progress_id, 100.0 * len(records) / shards)
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
        "head_selection": metrics["candidates"],
        "test_accuracy": head.test_accuracy,
        "config": config.model_dump(),
    }


def metrics_rows(summary: dict) -> list[dict]:
    head = summary["head"]
    rows = [
        {"metric": "test accuracy", "value": f"{head['test_accuracy']:.4f}"},
        {"metric": "validation accuracy (chosen head)", "value": f"{head['validation_accuracy']:.4f}"},
        {"metric": "chosen head", "value": _head_description(summary)},
    ]
    rows += [
        {"metric": f"validation accuracy: {candidate['head']}", "value": f"{candidate['validation_accuracy']:.4f}"}
        for candidate in summary["head_selection"]
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
        tsne = summary["tsne"]
        rows += [
            {"metric": "t-SNE seconds", "value": f"{tsne['seconds']:.1f}"},
            {"metric": "t-SNE 10-NN class accuracy: map / PCA space", "value": f"{tsne['map_knn_accuracy']:.4f} / {tsne['feature_knn_accuracy']:.4f}"},
        ]
    rows.append({"metric": "head seconds", "value": f"{head['seconds']:.1f}"})
    return rows


def _head_description(summary: dict) -> str:
    """"logistic (C=0.01)" or "mlp (best epoch 12)": the chosen head and what validation chose for it."""
    chosen = next(candidate for candidate in summary["head_selection"] if candidate["head"] == summary["head"]["kind"])
    if "C" in chosen:
        detail = f"C={chosen['C']:g}"
    elif "of" in chosen:
        detail = " + ".join(chosen["of"])
    else:
        detail = f"best epoch {chosen['best_epoch']}"
    return f"{chosen['head']} ({detail})"


def summary_markdown(summary: dict) -> str:
    head, spec = summary["head"], summary["feature_spec"]
    lines = [
        "# CIFAR-10 transfer learning",
        "",
        f"**Test accuracy: {head['test_accuracy']:.2%}** ({spec['backbone']} at {spec['input_size']}px, {spec['pooling']} pooling, "
        f"weights {spec['weights_id']}, {spec['engine']} {spec['precision']}; {_head_description(summary)}, chosen on validation)",
        "",
        f"- [Interactive HTML report]({summary['html_report_url']}) (one file: t-SNE map with thumbnails, confusion matrix, mistakes)",
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
    create_link_artifact(summary["html_report_url"], link_text="HTML report", key=REPORT_LINK_KEY,
                         description="self-contained report of this run: open it in a browser, offline")
    storage = Storage(summary["config"]["storage"])
    if not storage.is_local:
        create_link_artifact(storage.uri(summary["features"]), link_text="Parquet features", key=FEATURES_LINK_KEY,
                             description="where this run's feature shards are")
    logger().info("test accuracy %.2f%%; features in %s", 100 * summary["test_accuracy"], summary["features"])


@task(name="report")
def publish_report_task(config: PipelineConfig, features: FeatureSetInfo, extraction: ExtractionStats | None,
                        tsne: TsneResult | None, head: HeadResult) -> dict:
    summary = summarize(config, features, extraction, tsne, head)
    summary["html_report"] = write_html_report(config, features, tsne, head, summary)
    summary["html_report_url"] = _url(Storage(config.storage), summary["html_report"])
    publish_report(summary)
    return summary


def _url(storage: Storage, path: str) -> str:
    return "file://" + posixpath.abspath(path) if storage.is_local else storage.uri(path)


def _stored_rows(storage: Storage, path: str, rows: np.ndarray) -> np.ndarray:
    """Rows of a stored .npy array: memory-mapped on local disk (only those rows are read), whole elsewhere."""
    if storage.is_local:
        return np.load(path, mmap_mode="r", allow_pickle=False)[rows]
    with storage.fs.open(path, "rb") as stream:
        return np.load(stream, allow_pickle=False)[rows]


def _stored_frame(storage: Storage, path: str):
    with storage.fs.open(path, "rb") as stream:
        return pq.read_table(stream).to_pandas()


def _known(values: dict) -> dict:
    return {name: value for name, value in values.items() if value is not None}


def write_html_report(config: PipelineConfig, features: FeatureSetInfo, tsne: TsneResult | None, head: HeadResult, summary: dict) -> str:
    """Render the run's self-contained HTML report next to the head's outputs; returns its path."""
    storage = Storage(config.storage)
    images = dataset_folder(storage, features.spec["dataset_md5"])
    predictions = _stored_frame(storage, head.predictions)
    test = predictions[predictions["split"] == "test"].sort_values("index")
    train = predictions[predictions["split"] == "train"].set_index("index")
    map_points = map_truth = map_predicted = map_images = None
    if tsne is not None:
        embedding = _stored_frame(storage, tsne.embedding).query("split == 'train'")
        if len(embedding) > MAP_POINTS:
            embedding = embedding.sample(MAP_POINTS, random_state=config.seed).sort_values("index")
        map_points = embedding[["x", "y"]].to_numpy()
        map_truth = embedding["label"].to_numpy()
        map_predicted = train.loc[embedding["index"], "predicted"].to_numpy()
        map_images = _stored_rows(storage, posixpath.join(images, "train_images.npy"), embedding["index"].to_numpy())
    spec = features.spec
    extraction = summary["extraction"]
    html = render_html_report(
        title=f"cifar-transfer: {spec['backbone']} {spec['input_size']}px {spec['pooling']}, {_head_description(summary)}",
        config=summary["config"] | {"engine (resolved)": spec["engine"], "precision (resolved)": spec["precision"]},
        fingerprint=features.fingerprint,
        classes=features.classes,
        test_truth=test["label"].to_numpy(),
        test_predicted=test["predicted"].to_numpy(),
        test_confidence=test["confidence"].to_numpy(),
        test_images=_stored_rows(storage, posixpath.join(images, "test_images.npy"), test["index"].to_numpy()),
        map_points=map_points,
        map_truth=map_truth,
        map_predicted=map_predicted,
        map_images=map_images,
        metrics=_known({
            "test accuracy": head.test_accuracy,
            "validation accuracy (chosen head)": head.validation_accuracy,
            "chosen head": _head_description(summary),
            **{f"validation accuracy: {candidate['head']}": candidate["validation_accuracy"] for candidate in summary["head_selection"]},
            "t-SNE 10-NN class accuracy (map)": tsne.map_knn_accuracy if tsne else None,
            "t-SNE 10-NN class accuracy (PCA space)": tsne.feature_knn_accuracy if tsne else None,
            "extraction images/s": extraction["images_per_second"] if extraction else None,
        }),
        timings=_known({
            "extraction": extraction["seconds"] if extraction else None,
            "t-SNE": tsne.seconds if tsne else None,
            "head": head.seconds,
        }),
        max_map_points=MAP_POINTS,
    )
    path = posixpath.join(head.folder, f"report-{tsne_name(tsne)}.html")
    storage.write_atomic(path, html.encode())
    logger().info("HTML report: %s", _url(storage, path))
    return path


def tsne_name(tsne: TsneResult | None) -> str:
    """The t-SNE map a report shows is part of its name, so reports of different maps never overwrite each other."""
    return posixpath.basename(posixpath.dirname(tsne.embedding)) if tsne else "no-map"
