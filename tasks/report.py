"""Task: the report. Writes the HTML page and publishes the run as Prefect artifacts (stable keys, so the UI
shows each artifact's history across runs)."""

from __future__ import annotations

import logging

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from cifar_transfer.config import PipelineConfig
from cifar_transfer.feature_records import FeatureSetInfo
from cifar_transfer.head import HeadResult
from cifar_transfer.progress import ExtractionStats
from cifar_transfer.redact import redact
from cifar_transfer.report import RunSummary, metrics_rows, summarize, summary_markdown
from cifar_transfer.storage import Storage
from cifar_transfer.tsne import TsneResult

log = logging.getLogger("cifar_transfer.report")

METRICS_KEY = "cifar-transfer-metrics"
SUMMARY_KEY = "cifar-transfer-summary"
FEATURES_LINK_KEY = "cifar-transfer-features"
REPORT_LINK_KEY = "cifar-transfer-report"


def publish_report(summary: RunSummary) -> None:
    """Log the outcome and publish it as Prefect artifacts: a metrics table, a markdown summary, links."""
    create_table_artifact(metrics_rows(summary), key=METRICS_KEY, description="transfer learning: accuracy and timings")
    create_markdown_artifact(summary_markdown(summary), key=SUMMARY_KEY, description="transfer learning: run summary")
    create_link_artifact(
        summary.html_report_url,
        link_text="HTML report",
        key=REPORT_LINK_KEY,
        description="self-contained report of this run: open it in a browser, offline",
    )
    storage = Storage(summary.config.storage)
    if not storage.is_local:
        create_link_artifact(
            redact(storage.uri(summary.features.folder)),
            link_text="Parquet features",
            key=FEATURES_LINK_KEY,
            description="where this run's feature shards are",
        )
    log.info("test accuracy %.2f%%; features in %s", 100 * summary.test_accuracy, summary.features.folder)


@task(name="report")
def publish_report_task(
    config: PipelineConfig, features: FeatureSetInfo, extraction: ExtractionStats | None, tsne: TsneResult | None, head: HeadResult
) -> RunSummary:
    summary = summarize(config, features, extraction, tsne, head)
    publish_report(summary)
    return summary
