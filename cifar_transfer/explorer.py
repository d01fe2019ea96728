"""The map explorer's data: every point of a t-SNE map with its key, label and prediction, each point's nearest
neighbours among the map's points, the set's audit scores when an audit exists, and the thumbnails a tile at a time.

The explorer shows the map's points: the t-SNE sample of train (`tsne_sample`, all of train when it is at least the
split's size) and, with `tsne_test`, the test images placed into the map, so a map of the whole collection gives an
explorer of the whole collection.

Each point's nearest neighbours (`cifar_transfer.neighbours`) come with the map: the t-SNE stage searched them on the
features it held. A map made before it kept them has them searched here, from the stored features read a shard at a
time (`point_vectors`), the projection fitted on about `PCA_SAMPLE` rows from shards spread over the set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cifar_transfer.audit.vectors import SetRows, normalized
from cifar_transfer.explorer_html import TILE, ExplorerAudit, render_explorer
from cifar_transfer.feature_records import FeatureSetInfo
from cifar_transfer.head import HeadResult
from cifar_transfer.neighbours import NEIGHBOURS, PROJECTION, PointVectors, fitted_pca, map_neighbours
from cifar_transfer.storage import Storage
from cifar_transfer.stored import stored_source
from cifar_transfer.tsne import NEIGHBOURS_COLUMN, SIMILARITIES_COLUMN, TsneResult

if TYPE_CHECKING:
    from cifar_transfer.audit.stage import AuditResult

log = logging.getLogger(__name__)

EXPLORER_FORMAT = 1  # raise when the page or what it shows changes: pages made before are made again
INPUTS_META = "cifar-transfer-explorer-inputs"  # the page's <meta> naming what it was made of (`explorer_inputs`)
PCA_SAMPLE = 10_000  # rows the projection is fitted on
DUPLICATE_PARTNERS = 5  # near-duplicate partners listed for a point
THUMBNAIL_SIZE = 32


def _spread_shards(rows: SetRows, wanted: int) -> dict[str, list[int]]:
    """Shards spread evenly over the set, about `wanted` rows in all: the projection's sample."""
    shards = [(split, number) for split, manifest in rows.manifests.items() for number in range(len(manifest.shards))]
    per_shard = max(1.0, rows.rows / max(1, len(shards)))
    step = max(1, len(shards) // max(1, math.ceil(wanted / per_shard)))
    chosen: dict[str, list[int]] = {}
    for split, number in shards[::step]:
        chosen.setdefault(split, []).append(number)
    return chosen


def point_vectors(storage: Storage, folder: str, splits: np.ndarray, index: np.ndarray, seed: int = 0) -> PointVectors:
    """The points' pooled, normalized features (rows named by `splits`, `index`) and their projection
    onto the set's first PROJECTION principal components, normalized again; read a shard at a time."""
    rows = SetRows.open(storage, folder)
    named = set(splits.tolist())
    missing = sorted(named - set(rows.splits))
    if missing:
        raise ValueError(f"the map names rows of {missing}, which the feature set has no complete split of: make the map again")
    position = {(split, int(number)): place for place, (split, number) in enumerate(zip(splits, index, strict=True))}
    project = None
    if rows.width > PROJECTION:
        sample = np.concatenate(
            [block.vectors for split, numbers in _spread_shards(rows, PCA_SAMPLE).items() for block in rows.shard_blocks(split, numbers)]
        )
        project = fitted_pca(sample, seed, n_components=min(PROJECTION, len(sample)), svd_solver="randomized")
        del sample
    projected = np.zeros((len(splits), project.n_components_ if project is not None else rows.width), np.float32)
    full = np.zeros((len(splits), rows.width), np.float32)
    seen = np.zeros(len(splits), bool)
    for block in rows.blocks([split for split in rows.splits if split in named]):  # a map of train reads no test
        places = np.array([position.get((block.split, int(number)), -1) for number in block.index], np.int64)
        keep = places >= 0
        if not keep.any():
            continue
        vectors = block.vectors[keep]
        projected[places[keep]] = project.transform(vectors) if project is not None else vectors
        full[places[keep]] = vectors
        seen[places[keep]] = True
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} of the map's points are not in the feature set any more: make the map again")
    return PointVectors(normalized(projected), full)


def map_audit(storage: Storage, features: FeatureSetInfo, audit: AuditResult, splits: np.ndarray, index: np.ndarray) -> ExplorerAudit:
    """The audit's scores of the map's points, and their near-duplicate partners."""
    position = {(split, int(number)): place for place, (split, number) in enumerate(zip(splits, index, strict=True))}

    def places(frame, split: str = "split", number: str = "index") -> np.ndarray:
        return np.array([position.get((s, int(i)), -1) for s, i in zip(frame[split], frame[number], strict=True)], np.int64)

    count = len(splits)
    label_score = np.full(count, np.nan, np.float32)
    suggested = np.full(count, -1, np.int64)
    outlier_score = np.full(count, np.nan, np.float32)
    issues = storage.read_frame(audit.files.label_issues)
    at = places(issues)
    classes = {name: number for number, name in enumerate(features.classes)}
    label_score[at[at >= 0]] = issues["score"].to_numpy()[at >= 0]
    suggested[at[at >= 0]] = [classes.get(name, -1) for name in issues["suggested"][at >= 0]]
    outliers = storage.read_frame(audit.files.outliers)
    at = places(outliers)
    outlier_score[at[at >= 0]] = outliers["score"].to_numpy()[at >= 0]
    duplicates = storage.read_frame(audit.files.duplicates)
    duplicates = duplicates[duplicates["near_duplicate"]]
    left, right = places(duplicates, "split_a", "index_a"), places(duplicates, "split_b", "index_b")
    partners: dict[int, list[tuple[str, int, float]]] = {}
    for row, a, b in zip(duplicates.itertuples(), left, right, strict=True):  # sorted by score: the most alike first
        for point, key, other in ((a, row.key_b, b), (b, row.key_a, a)):
            if point >= 0 and len(partners.setdefault(int(point), [])) < DUPLICATE_PARTNERS:
                partners[int(point)].append((str(key), int(other), float(row.score)))
    return ExplorerAudit(label_score, suggested, outlier_score, partners, audit.summary.line())


def thumbnail_tiles(storage: Storage, features: FeatureSetInfo, splits: np.ndarray, index: np.ndarray) -> Iterator[np.ndarray]:
    """The points' pictures in order, TILE at a time, read a split at a time within each tile."""
    source = stored_source(features.collection)
    for start in range(0, len(splits), TILE):
        chunk_splits, chunk_index = splits[start : start + TILE], index[start : start + TILE]
        tile = np.zeros((len(chunk_index), THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.uint8)
        for split in dict.fromkeys(chunk_splits.tolist()):
            rows = np.flatnonzero(chunk_splits == split)
            tile[rows] = source.pictures(storage, features, split, chunk_index[rows], THUMBNAIL_SIZE)
        yield tile


@dataclass(frozen=True)
class ExplorerBuild:
    path: str
    points: int
    bytes: int
    seconds: dict[str, float]  # "neighbours" (projection and search), "page" (thumbnails and the rest), "total"
    reused: bool = False  # the page there was made of the same inputs: nothing was computed


def explorer_inputs(
    features: FeatureSetInfo, tsne: TsneResult, head: HeadResult | None, audit: AuditResult | None, report_href: str | None
) -> str:
    """What an explorer page is made of, as a digest kept in the page: its map, its head's answers, the audit it shows
    (any new audit is another record), the rows' content and the page's format."""
    made_of = {
        "format": EXPLORER_FORMAT,
        "features": [features.fingerprint, features.content_version],
        "map": tsne.embedding.rsplit("/", 2)[-2:],
        "head": posixpath.basename(head.files.folder) if head is not None else None,
        "audit": audit.record.model_dump(mode="json") if audit is not None else None,
        "report": report_href,
    }
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


def current_explorer(storage: Storage, path: str, inputs: str) -> bool:
    """Whether `path` is an explorer page made of `inputs` (its head names them, in its first few kilobytes)."""
    if not storage.exists(path):
        return False
    with storage.fs.open(path, "rb") as page:
        return f'<meta name="{INPUTS_META}" content="{inputs}">'.encode() in page.read(4096)


def map_point_neighbours(
    storage: Storage, features: FeatureSetInfo, embedding, splits: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each map point's `NEIGHBOURS` nearest (positions, similarities): as the t-SNE stage kept them in the map, or
    searched here from the stored features for a map made before it did."""
    if NEIGHBOURS_COLUMN in embedding.columns and len(embedding) and len(embedding[NEIGHBOURS_COLUMN].iloc[0]) >= NEIGHBOURS:
        positions = np.stack(embedding[NEIGHBOURS_COLUMN].to_numpy())[:, :NEIGHBOURS].astype(np.int64)
        return positions, np.stack(embedding[SIMILARITIES_COLUMN].to_numpy())[:, :NEIGHBOURS].astype(np.float32)
    return map_neighbours(point_vectors(storage, features.folder, splits, index), NEIGHBOURS)


def write_explorer(
    storage: Storage, features: FeatureSetInfo, tsne: TsneResult, head: HeadResult | None, path: str, report_href: str | None
) -> ExplorerBuild:
    """Render the explorer of `tsne`'s map to `path`, unless the page there was made of the same inputs: its neighbour
    search costs minutes on a large map, and a rerun that reuses the map and the head should not pay it again."""
    from cifar_transfer.audit.stage import read_audit

    started = time.perf_counter()
    audit = read_audit(storage, features, posixpath.basename(head.files.folder)) if head is not None else None
    inputs = explorer_inputs(features, tsne, head, audit, report_href)
    if current_explorer(storage, path, inputs):
        points = tsne.points + tsne.test_points
        log.info("map explorer of %d points is current: %s", points, storage.uri(path))
        return ExplorerBuild(path, points, storage.fs.size(path), {"total": round(time.perf_counter() - started, 2)}, reused=True)
    embedding = storage.read_frame(tsne.embedding)
    splits = embedding["split"].to_numpy(dtype=object)
    index = embedding["index"].to_numpy(np.int64)
    keys = stored_source(features.collection).row_keys(storage, features.folder, splits, index)
    neighbours, similarities = map_point_neighbours(storage, features, embedding, splits, index)
    searched = time.perf_counter()
    predicted = None
    if head is not None:
        predictions = storage.read_frame(head.files.predictions).set_index(["split", "index"])["predicted"]
        predicted = predictions.reindex(list(zip(splits, index, strict=True))).fillna(-1).to_numpy(np.int64)
    placed = int((splits == "test").sum())
    note = (
        f"{len(splits):,} points: the t-SNE map's {len(splits) - placed:,} train images"
        + (f" and {placed:,} test images placed into it" if placed else "")
        + "; neighbours by cosine similarity of the features, among these points."
    )
    page = render_explorer(
        title=f"Map explorer: {features.spec.backbone} {features.spec.input_size}px {features.spec.pooling} ({features.fingerprint})",
        note=note,
        classes=features.classes,
        points=embedding[["x", "y"]].to_numpy(),
        labels=embedding["label"].to_numpy(),
        keys=[str(key) for key in keys],
        tiles=thumbnail_tiles(storage, features, splits, index),
        neighbours=neighbours,
        similarities=similarities,
        predicted=predicted,
        audit=map_audit(storage, features, audit, splits, index) if audit is not None else None,
        report_href=report_href,
        meta={INPUTS_META: inputs},
    )
    data = page.encode()
    storage.write_if_changed(path, data)
    done = time.perf_counter()
    seconds = {"neighbours": round(searched - started, 2), "page": round(done - searched, 2), "total": round(done - started, 2)}
    log.info("map explorer of %d points in %.1f s (%.1f MB): %s", len(splits), seconds["total"], len(data) / 1e6, storage.uri(path))
    return ExplorerBuild(path, len(splits), len(data), seconds)
