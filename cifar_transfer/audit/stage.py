"""The audit of a feature set: its index brought up to date, every row's neighbours, out-of-fold probabilities from
the run's head family, and the three tables, under `features/<set>/audit/` (`layout.audit_files`), `audit.json` last.

The record names what the tables were made from (the fingerprint, a collection's content version, the head's key, the
settings, the method); while those are unchanged and every file is there, the audit is read back and nothing is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.audit.folds import chosen_kinds, out_of_fold
from cifar_transfer.audit.index import all_neighbours, update_index
from cifar_transfer.audit.tables import (
    Rows,
    combined_distribution,
    duplicates_table,
    label_issues_table,
    neighbour_votes,
    outliers_table,
    pixel_candidates,
    signatures,
)
from cifar_transfer.audit.vectors import SetRows
from cifar_transfer.config import AuditSettings
from cifar_transfer.feature_records import FeatureSetInfo, Lineage
from cifar_transfer.head import HeadResult
from cifar_transfer.shard_files import parquet_bytes
from cifar_transfer.storage import Storage
from cifar_transfer.stored import stored_source

log = logging.getLogger(__name__)

PICTURE_BATCH = 4096
# How the tables are made, raised when a change makes stored tables wrong: an audit made by another method is made
# again (2: as many label issues flagged as `tables.estimated_label_issues` counts; 1: every row whose data suggested
# another label, a third of a set under a head 62% accurate).
METHOD = 2
T = TypeVar("T")


class AuditSummary(BaseModel):
    rows: dict[str, int]  # rows per split
    test_with_train_duplicate: int  # test images with a near-duplicate in train
    duplicate_pairs: int  # near-duplicate pairs (score >= threshold)
    duplicate_clusters: int
    label_issues: int  # rows flagged as wrongly labelled (`issue`: as many as `tables.estimated_label_issues` counts)
    head_kinds: list[str]  # the head family the out-of-fold probabilities came from
    out_of_fold_accuracy: dict[str, float]
    index: str  # "exact" or "usearch"
    seconds: dict[str, float]  # per stage

    def line(self) -> str:
        return (
            f"{self.test_with_train_duplicate} test images have a near-duplicate in train; {self.duplicate_pairs} near-duplicate "
            f"pairs in {self.duplicate_clusters} clusters; {self.label_issues} images whose label the data doubts"
        )


class AuditRecord(BaseModel):
    """`audit.json`: what the tables were made from, and their summary."""

    fingerprint: str
    content_version: str | None = None  # a collection's (None: an archive's, left out of the record)
    head_key: str
    settings: AuditSettings
    method: int = 1  # `METHOD` when made (absent from records made before the method was recorded)
    threshold: float  # the score near-duplicates are over (`tables.duplicate_threshold`)
    summary: AuditSummary
    made_by: Lineage | None = None


class AuditResult(BaseModel):
    files: layout.AuditFiles
    record: AuditRecord

    @property
    def summary(self) -> AuditSummary:
        return self.record.summary


def finished_audit(storage: Storage, features: FeatureSetInfo, head_key: str, settings: AuditSettings) -> AuditResult | None:
    """The set's audit if it was made from exactly these inputs (features, content, head, settings) by this `METHOD`."""
    audit = read_audit(storage, features, head_key)
    return audit if audit is not None and (audit.record.settings, audit.record.method) == (settings, METHOD) else None


def read_audit(storage: Storage, features: FeatureSetInfo, head_key: str) -> AuditResult | None:
    """The set's audit if it is complete and was made from these features (this content) with the head `head_key`,
    whatever its settings; else None."""
    files = layout.audit_files(features.folder)
    if files.missing(storage):
        return None
    try:
        record = records.AUDIT.load(AuditRecord, storage.read_bytes(files.record), storage.uri(files.record))
    except ValueError as exc:
        log.warning("auditing again: %s is unreadable (%s)", storage.uri(files.record), str(exc).splitlines()[0])
        return None
    current = (record.fingerprint, record.content_version, record.head_key) == (features.fingerprint, features.content_version, head_key)
    return AuditResult(files=files, record=record) if current else None


def _timed(seconds: dict[str, float], name: str, work: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = work()
    seconds[name] = round(time.perf_counter() - started, 3)
    return result


def class_similarity(rows: SetRows, labels: np.ndarray, classes: int) -> np.ndarray:
    """Each row's cosine similarity to the mean of its class's normalized vectors (two passes over the shards)."""
    sums = np.zeros((classes, rows.width))
    for block in rows.blocks():
        np.add.at(sums, block.labels, block.vectors)
    means = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    similarity = np.empty(rows.rows, np.float32)
    for block in rows.blocks():
        similarity[block.start : block.stop] = np.einsum("ij,ij->i", block.vectors, means[block.labels])
    return similarity


def pixel_signatures(storage: Storage, features: FeatureSetInfo, names: Rows, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """Signatures of the wanted rows' pictures (by position), read a batch at a time from what the set keeps; none
    (the scores then come from the features alone, said in the log) when its pictures are no longer kept."""
    source = stored_source(features.collection)
    if not source.pictures_kept(storage, features):
        log.warning("audit: the decoded images of %s are gone, so duplicates are scored on features alone", features.folder)
        return {}
    found: dict[int, np.ndarray] = {}
    for split in dict.fromkeys(names.split[wanted].tolist()):
        chosen = wanted[names.split[wanted] == split]
        for start in range(0, len(chosen), PICTURE_BATCH):
            batch = chosen[start : start + PICTURE_BATCH]
            pictures = source.pictures(storage, features, split, names.index[batch], 32)
            found.update(zip(batch.tolist(), signatures(pictures), strict=True))
    return found


def audit_feature_set(
    storage_url: str, features: FeatureSetInfo, head: HeadResult, settings: AuditSettings, lineage: Lineage | None = None
) -> AuditResult:
    """Audit the set (reused when done with the same inputs): index, neighbours, out-of-fold probabilities, tables."""
    storage = Storage(storage_url)
    head_key = head.files.folder.rsplit("/", 1)[-1]
    done = finished_audit(storage, features, head_key, settings)
    if done is not None:
        return done
    files = layout.audit_files(features.folder)
    seconds: dict[str, float] = {}
    index = _timed(seconds, "index", lambda: update_index(storage, features.folder, features.fingerprint, settings.exact_limit))
    positions, similarities = _timed(
        seconds, "neighbours", lambda: all_neighbours(storage, features.folder, index.record, settings.neighbours)
    )
    set_rows = SetRows.open(storage, features.folder)
    split, number, label = set_rows.names()
    keys = stored_source(features.collection).row_keys(storage, features.folder, split, number)
    names = Rows(split, number, keys, label, features.classes)
    pixels = _timed(seconds, "pixels", lambda: pixel_signatures(storage, features, names, pixel_candidates(positions, similarities)))
    duplicates, threshold = _timed(seconds, "duplicates", lambda: duplicates_table(names, positions, similarities, pixels))
    fold, probabilities = _timed(
        seconds, "out_of_fold", lambda: out_of_fold(storage, features.folder, head.metrics, settings.folds, len(features.classes))
    )
    offsets = set_rows.offsets()
    every = np.zeros((len(names), len(features.classes)), np.float32)
    folds = np.full(len(names), -1, np.int64)
    for name, values in probabilities.items():
        every[offsets[name] : offsets[name] + len(values)] = values
    folds[offsets["train"] : offsets["train"] + len(fold)] = fold
    votes = neighbour_votes(names, positions, similarities)
    issues = _timed(seconds, "label_issues", lambda: label_issues_table(names, every, votes, folds))
    alike = _timed(seconds, "class_similarity", lambda: class_similarity(set_rows, label, len(features.classes)))
    outliers = outliers_table(names, similarities, alike, combined_distribution(every, votes))
    near = duplicates.filter(duplicates.column("near_duplicate"))
    crossing = {
        key_a if split_a == "test" else key_b
        for split_a, key_a, split_b, key_b in zip(
            *(near.column(column).to_pylist() for column in ("split_a", "key_a", "split_b", "key_b")), strict=True
        )
        if {split_a, split_b} == {"train", "test"}
    }
    summary = AuditSummary(
        rows={name: manifest.rows for name, manifest in set_rows.manifests.items()},
        test_with_train_duplicate=len(crossing),
        duplicate_pairs=near.num_rows,
        duplicate_clusters=len(set(near.column("cluster").to_pylist())),
        label_issues=int(np.sum(issues.column("issue").to_numpy())),
        head_kinds=chosen_kinds(head.metrics),
        out_of_fold_accuracy={
            name: float(np.mean(values.argmax(axis=1) == label[offsets[name] : offsets[name] + len(values)]))
            for name, values in probabilities.items()
        },
        index=index.record.kind,
        seconds=seconds,
    )
    record = AuditRecord(
        fingerprint=features.fingerprint,
        content_version=features.content_version,
        head_key=head_key,
        settings=settings,
        method=METHOD,
        threshold=threshold,
        summary=summary,
        made_by=lineage,
    )
    storage.write_atomic(files.duplicates, parquet_bytes(duplicates))
    storage.write_atomic(files.label_issues, parquet_bytes(issues))
    storage.write_atomic(files.outliers, parquet_bytes(outliers))
    storage.write_atomic(files.record, records.AUDIT.dump(record, exclude_none=True))
    log.info("audit of %s: %s", features.folder.rsplit("/", 1)[-1], summary.line())
    return AuditResult(files=files, record=record)
