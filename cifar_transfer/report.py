"""What people read of a run: the typed run summary, its metrics table and markdown, and the HTML report.

Plain functions over typed results: the Prefect layer (`cifar_transfer.tasks.report`) only publishes them.
"""

from __future__ import annotations

import logging
import posixpath

import numpy as np
from pydantic import BaseModel

from cifar_transfer import layout
from cifar_transfer.config import PipelineConfig
from cifar_transfer.evaluation import sample_rows
from cifar_transfer.explorer import write_explorer
from cifar_transfer.feature_records import FeatureSetInfo
from cifar_transfer.head import HeadResult
from cifar_transfer.html_report import AuditGalleries, AuditTile, render_html_report
from cifar_transfer.progress import ExtractionStats
from cifar_transfer.redact import redact
from cifar_transfer.storage import Storage
from cifar_transfer.stored import stored_source
from cifar_transfer.tsne import TsneResult

log = logging.getLogger(__name__)

MAP_POINTS = 3000  # points of the t-SNE map the HTML report makes interactive (thumbnails and all)
THUMBNAIL_SIZE = 32  # a collection's pictures in the report, as small as CIFAR's


class RunSummary(BaseModel):
    """A run's outcome: where everything is, how long it took, how good it is."""

    config: PipelineConfig
    features: FeatureSetInfo
    extraction: ExtractionStats | None
    tsne: TsneResult | None
    head: HeadResult
    html_report: str
    html_report_url: str

    @property
    def test_accuracy(self) -> float:
        return self.head.test_accuracy

    @property
    def head_description(self) -> str:
        """ "ridge (alpha=0.1)", "mlp (best epoch 12)": the chosen head and what validation chose for it."""
        return self.head.metrics.chosen.description()


def shown_config(config: PipelineConfig) -> dict:
    """The configuration as people and artifacts see it: every address redacted."""
    return {name: redact(value) if isinstance(value, str) else value for name, value in config.model_dump().items()}


def metrics_rows(summary: RunSummary) -> list[dict]:
    head, metrics = summary.head, summary.head.metrics
    rows = [
        {"metric": "test accuracy", "value": f"{head.test_accuracy:.4f}"},
        {"metric": "validation accuracy (chosen head)", "value": f"{head.validation_accuracy:.4f}"},
        {"metric": "chosen head", "value": summary.head_description},
    ]
    rows += [
        {"metric": f"validation accuracy: {candidate.head}", "value": f"{candidate.validation_accuracy:.4f}"}
        for candidate in metrics.candidates
    ]
    rows += [{"metric": f"test accuracy: {name}", "value": f"{value:.4f}"} for name, value in metrics.per_class_accuracy.items()]
    made = summary.features.extraction  # how the feature set was made, not what this run reused
    if made:
        rows += [
            {"metric": "extraction seconds (feature set)", "value": f"{made.seconds:.1f}"},
            {"metric": "extraction images/s (feature set)", "value": f"{made.images_per_second:.1f}"},
        ]
    if summary.extraction:
        rows.append(
            {"metric": "shards computed / total (this run)", "value": f"{summary.extraction.shards_computed}/{summary.extraction.shards}"}
        )
    if summary.tsne:
        tsne = summary.tsne
        rows += [
            {"metric": "t-SNE seconds", "value": f"{tsne.seconds:.1f}"},
            {
                "metric": "t-SNE 10-NN class accuracy: map / PCA space",
                "value": f"{tsne.map_knn_accuracy:.4f} / {tsne.feature_knn_accuracy:.4f}",
            },
        ]
    rows.append({"metric": "head seconds", "value": f"{head.seconds:.1f}"})
    return rows


def summary_markdown(summary: RunSummary) -> str:
    head, spec, features = summary.head, summary.features.spec, summary.features
    lines = [
        f"# Transfer learning: {spec.backbone}, {len(features.classes)} classes",
        "",
        f"**Test accuracy: {head.test_accuracy:.2%}** ({spec.backbone} at {spec.input_size}px, {spec.pooling} pooling, "
        f"weights {spec.weights_id}, {spec.engine} {spec.precision}; {summary.head_description}, chosen on validation)",
        "",
        f"- [Interactive HTML report]({summary.html_report_url}) (one file: t-SNE map with thumbnails, confusion matrix, mistakes)",
        f"- Parquet features: `{features.folder}` (fingerprint `{features.fingerprint}`, feature shape {features.feature_shape})",
    ]
    if summary.tsne:
        lines.append(f"- t-SNE map: `{summary.tsne.picture}` (points: `{summary.tsne.embedding}`)")
    lines += [
        f"- Confusion matrix: `{head.files.confusion_picture}`",
        f"- Head model: `{head.files.model}`; metrics: `{head.files.metrics}`",
    ]
    return "\n".join(lines) + "\n"


def report_url(storage: Storage, path: str) -> str:
    """Where a browser opens a stored file."""
    return "file://" + posixpath.abspath(path) if storage.is_local else storage.uri(path)


def map_name(tsne: TsneResult | None) -> str:
    """The t-SNE map a report shows is part of its name, so reports of different maps never overwrite each other."""
    return posixpath.basename(posixpath.dirname(tsne.embedding)) if tsne else "no-map"


def split_images(storage: Storage, features: FeatureSetInfo, split: str, ids: np.ndarray) -> np.ndarray:
    """The pictures of a split's rows, from wherever the feature set's source keeps them."""
    return stored_source(features.collection).pictures(storage, features, split, ids, THUMBNAIL_SIZE)


def _known(values: dict) -> dict:
    return {name: value for name, value in values.items() if value is not None}


AUDIT_GALLERY = 12  # tiles of each audit gallery in the report


def audit_galleries(storage: Storage, features: FeatureSetInfo, head: HeadResult) -> AuditGalleries | None:
    """The galleries of the set's audit made with this head (`cifar-transfer audit`, or the deployment a finished head
    starts), when there is one: the report a later run renders shows it."""
    from cifar_transfer.audit.stage import read_audit

    audit = read_audit(storage, features, posixpath.basename(head.files.folder))
    if audit is None:
        return None
    duplicates = storage.read_frame(audit.files.duplicates).head(AUDIT_GALLERY)
    issues = storage.read_frame(audit.files.label_issues).head(AUDIT_GALLERY)
    outliers = storage.read_frame(audit.files.outliers).head(AUDIT_GALLERY)

    def pictures(splits, ids) -> list[np.ndarray]:
        """The rows' pictures, in order, read a split at a time."""
        splits, ids = np.asarray(splits, dtype=object), np.asarray(ids, np.int64)
        found: list[np.ndarray] = [np.zeros((THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.uint8)] * len(ids)
        for split in dict.fromkeys(splits.tolist()):
            rows = np.flatnonzero(splits == split)
            for row, picture in zip(rows, split_images(storage, features, split, ids[rows]), strict=True):
                found[row] = picture
        return found

    pairs = zip(pictures(duplicates["split_a"], duplicates["index_a"]), pictures(duplicates["split_b"], duplicates["index_b"]), strict=True)
    return AuditGalleries(
        summary=audit.summary.line(),
        duplicates=[
            AuditTile(
                [left, right], [f"score {row.score:.3f}" + (" (near-duplicate)" if row.near_duplicate else "")], [row.key_a, row.key_b]
            )
            for (left, right), row in zip(pairs, duplicates.itertuples(), strict=True)
        ],
        label_issues=[
            AuditTile([picture], [f"given: {row.given}", f"suggested: {row.suggested}", f"score {row.score:.3f}"], [row.key])
            for picture, row in zip(pictures(issues["split"], issues["index"]), issues.itertuples(), strict=True)
        ],
        outliers=[
            AuditTile([picture], [row.label, f"score {row.score:.3f}"], [row.key])
            for picture, row in zip(pictures(outliers["split"], outliers["index"]), outliers.itertuples(), strict=True)
        ],
    )


def write_html_report(config: PipelineConfig, features: FeatureSetInfo, tsne: TsneResult | None, head: HeadResult) -> str:
    """Render the run's self-contained HTML report next to the head's outputs; returns its path."""
    storage = Storage(config.storage)
    predictions = storage.read_frame(head.files.predictions)
    test = predictions[predictions["split"] == "test"].sort_values("index")
    train = predictions[predictions["split"] == "train"].set_index("index")
    map_points = map_truth = map_predicted = map_images = None
    if tsne is not None:
        embedding = storage.read_frame(tsne.embedding).query("split == 'train'").reset_index(drop=True)
        embedding = embedding.iloc[sample_rows(len(embedding), MAP_POINTS, config.seed)]
        map_points = embedding[["x", "y"]].to_numpy()
        map_truth = embedding["label"].to_numpy()
        map_predicted = train.loc[embedding["index"], "predicted"].to_numpy()
        map_images = split_images(storage, features, "train", embedding["index"].to_numpy())
    path = layout.report(head.files.folder, map_name(tsne))
    explorer_path = None
    if tsne is not None:
        try:
            explorer_path = write_explorer(
                storage, features, tsne, head, layout.explorer(head.files.folder, map_name(tsne)), report_href=posixpath.basename(path)
            ).path
        except ValueError as exc:  # the map no longer matches the set's rows: the report is written without it
            log.warning("no map explorer for this report: %s", exc)
    spec = features.spec
    chosen = head.metrics.chosen.description()
    html = render_html_report(
        title=f"cifar-transfer: {spec.backbone} {spec.input_size}px {spec.pooling}, {chosen}",
        config=shown_config(config) | {"engine (resolved)": spec.engine, "precision (resolved)": spec.precision},
        fingerprint=features.fingerprint,
        classes=features.classes,
        test_truth=test["label"].to_numpy(),
        test_predicted=test["predicted"].to_numpy(),
        test_confidence=test["confidence"].to_numpy(),
        test_images=split_images(storage, features, "test", test["index"].to_numpy()),
        map_points=map_points,
        map_truth=map_truth,
        map_predicted=map_predicted,
        map_images=map_images,
        metrics=_known(
            {
                "test accuracy": head.test_accuracy,
                "validation accuracy (chosen head)": head.validation_accuracy,
                "chosen head": chosen,
                **{f"validation accuracy: {candidate.head}": candidate.validation_accuracy for candidate in head.metrics.candidates},
                "t-SNE 10-NN class accuracy (map)": tsne.map_knn_accuracy if tsne else None,
                "t-SNE 10-NN class accuracy (PCA space)": tsne.feature_knn_accuracy if tsne else None,
                "extraction images/s (feature set)": features.extraction.images_per_second if features.extraction else None,
                "made by flow run": features.made_by.flow_run_url if features.made_by else None,
            }
        ),
        timings=_known(
            {
                "extraction (feature set)": features.extraction.seconds if features.extraction else None,
                "t-SNE": tsne.seconds if tsne else None,
                "head": head.seconds,
            }
        ),
        max_map_points=MAP_POINTS,
        audit=audit_galleries(storage, features, head),
        explorer_href=posixpath.basename(explorer_path) if explorer_path else None,
    )
    storage.write_if_changed(path, html.encode())
    log.info("HTML report: %s", report_url(storage, path))
    return path


def summarize(
    config: PipelineConfig, features: FeatureSetInfo, extraction: ExtractionStats | None, tsne: TsneResult | None, head: HeadResult
) -> RunSummary:
    """Write the HTML report and gather the run's outcome."""
    path = write_html_report(config, features, tsne, head)
    return RunSummary(
        config=config,
        features=features,
        extraction=extraction,
        tsne=tsne,
        head=head,
        html_report=path,
        html_report_url=report_url(Storage(config.storage), path),
    )
