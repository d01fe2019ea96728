"""Tasks: find the head an audit reads, and audit its feature set (the library reuses an audit whose inputs are
unchanged); the summary and the top rows go out as Prefect artifacts."""

from __future__ import annotations

import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cifar_transfer.audit.stage import AuditResult, audit_feature_set
from cifar_transfer.config import AuditSettings
from cifar_transfer.head import HeadResult
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.lineage import current_lineage
from cifar_transfer.trained import TrainedHead, find_head

SUMMARY_KEY = "cifar-transfer-audit"
DUPLICATES_KEY = "cifar-transfer-audit-duplicates"
LABEL_ISSUES_KEY = "cifar-transfer-audit-label-issues"
TOP_ROWS = 20


@task(name="find-head")
def find_head_task(storage_url: str, fingerprint: str | None, head_key: str | None) -> TrainedHead:
    return find_head(storage_url, fingerprint, head_key)


def top_rows(storage: Storage, path: str, columns: list[str]) -> list[dict]:
    with storage.fs.open(path, "rb") as stream:
        table = pq.read_table(stream, columns=columns)
    return table.slice(0, TOP_ROWS).to_pylist()


def publish_audit(storage_url: str, result: AuditResult) -> None:
    storage, summary = Storage(storage_url), result.summary
    lines = [
        f"**{summary.line()}**",
        "",
        f"- rows: {', '.join(f'{split} {rows}' for split, rows in summary.rows.items())}; index: {summary.index}",
        f"- out-of-fold probabilities from {' + '.join(summary.head_kinds)} heads: accuracy "
        + ", ".join(f"{split} {accuracy:.2%}" for split, accuracy in summary.out_of_fold_accuracy.items()),
        f"- seconds: {', '.join(f'{stage} {seconds:.1f}' for stage, seconds in summary.seconds.items())}",
        f"- tables: `{result.files.duplicates}`, `{result.files.label_issues}`, `{result.files.outliers}`",
    ]
    create_markdown_artifact("\n".join(lines), key=SUMMARY_KEY, description="audit: duplicates, leakage, label issues")
    columns = ["split_a", "index_a", "key_a", "split_b", "index_b", "key_b", "score", "near_duplicate"]
    create_table_artifact(top_rows(storage, result.files.duplicates, columns), key=DUPLICATES_KEY, description="audit: top duplicate pairs")
    columns = ["split", "index", "key", "given", "suggested", "score"]
    create_table_artifact(
        top_rows(storage, result.files.label_issues, columns), key=LABEL_ISSUES_KEY, description="audit: top label issues"
    )


@task(name="audit")
def audit_task(storage_url: str, head: TrainedHead, settings: AuditSettings) -> AuditResult:
    result = audit_feature_set(storage_url, head.features, HeadResult(files=head.files, metrics=head.metrics), settings, current_lineage())
    publish_audit(storage_url, result)
    return result
