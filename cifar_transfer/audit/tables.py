"""The audit's tables, from every row's nearest neighbours, its out-of-fold probabilities and cheap pixel statistics.

- Duplicates: each row and its nearest neighbours as pairs. A pair's score is the cosine similarity of their features,
  averaged with the correlation of their pixel signatures (`signatures`: 8x8 grey thumbnails with mean and contrast
  taken out, so colour and brightness changes leave them alike, small shifts and crops nearly so) where the pictures
  are at hand. A pair is a near-duplicate when its distance (1 - score) is under `DUPLICATE_RATIO` times the set's
  median distance from a row to its nearest neighbour: the threshold follows the features (a backbone whose
  neighbours are all close gets a higher one). Near-duplicates are grouped into clusters (connected pairs).
- Label issues: the out-of-fold probabilities averaged with the labels of the row's neighbours (weighted by
  similarity); the score is that average's probability of the given class over the class's own threshold (lower =
  more likely wrong); the suggested label is the class most above its threshold (`label_issues_table`). The rows
  flagged as issues are as many as the set's estimated count of wrong labels (`estimated_label_issues`), lowest score
  first.
- Outliers: a row's mean similarity to its neighbours (lower = more alone), with its similarity to its class's mean
  and how ambiguous its combined class distribution is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

DUPLICATE_RATIO = 0.3  # a near-duplicate is this much closer than the median nearest neighbour
PAIR_NEIGHBOURS = 2  # each row's nearest neighbours considered as its duplicate pairs
PIXEL_FLOOR = 0.6  # pairs whose features are less alike than this get no pixel comparison
SIGNATURE_SIZE = 8
FLIPPED_SHARE = 0.1  # the share of wrongly labelled rows expected below the score the label issues are counted under


@dataclass(frozen=True)
class Rows:
    """What names every row, by position."""

    split: np.ndarray  # object (str)
    index: np.ndarray
    key: np.ndarray  # object (str)
    label: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.index)


def signatures(pictures: np.ndarray) -> np.ndarray:
    """Pixel signatures of uint8 pictures (rows, height, width, 3): grey, averaged down to 8x8, mean removed, unit
    length (a flat picture: all zeros)."""
    grey = pictures.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    rows, height, width = grey.shape
    cells_y, cells_x = np.array_split(np.arange(height), SIGNATURE_SIZE), np.array_split(np.arange(width), SIGNATURE_SIZE)
    small = np.stack([np.stack([grey[:, ys][:, :, xs].mean(axis=(1, 2)) for xs in cells_x], axis=1) for ys in cells_y], axis=1)
    flat = small.reshape(rows, -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)


def candidate_pairs(positions: np.ndarray, similarities: np.ndarray, neighbours: int = PAIR_NEIGHBOURS) -> tuple[np.ndarray, ...]:
    """(a, b, feature similarity) of each row and its nearest neighbours, each pair once (a < b)."""
    taken = min(neighbours, positions.shape[1])
    a = np.repeat(np.arange(len(positions)), taken)
    b = positions[:, :taken].ravel()
    similarity = similarities[:, :taken].ravel()
    valid = (b >= 0) & np.isfinite(similarity)
    a, b, similarity = a[valid], b[valid], similarity[valid]
    low, high = np.minimum(a, b), np.maximum(a, b)
    _, first = np.unique(low * (len(positions) + 1) + high, return_index=True)
    return low[first], high[first], similarity[first]


def clusters(a: np.ndarray, b: np.ndarray, rows: int) -> np.ndarray:
    """Each row's cluster of connected pairs, named by its smallest position (rows in no pair: themselves)."""
    parent = np.arange(rows)

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for left, right in zip(a.tolist(), b.tolist(), strict=True):
        first, second = root(left), root(right)
        if first != second:
            parent[max(first, second)] = min(first, second)
    return np.array([root(node) for node in range(rows)], np.int64)


def duplicate_threshold(a: np.ndarray, b: np.ndarray, score: np.ndarray, rows: int, ratio: float = DUPLICATE_RATIO) -> float:
    """The score above which a pair is a near-duplicate: `ratio` of the median distance to a row's nearest neighbour."""
    best = np.full(rows, -np.inf)
    np.maximum.at(best, a, score)
    np.maximum.at(best, b, score)
    distances = 1.0 - best[np.isfinite(best)]
    return float(1.0 - ratio * np.median(distances)) if len(distances) else 1.0


def duplicates_table(
    rows: Rows, positions: np.ndarray, similarities: np.ndarray, pixels: dict[int, np.ndarray] | None, ratio: float = DUPLICATE_RATIO
) -> tuple[pa.Table, float]:
    """Candidate pairs, best first: split_a, index_a, key_a, split_b, index_b, key_b, score (higher = more alike), the
    feature and pixel similarities, whether it is a near-duplicate, and its cluster (-1 when it is not); and the
    threshold the near-duplicates are over."""
    a, b, feature = candidate_pairs(positions, similarities)
    pixel = np.full(len(a), np.nan, np.float32)
    if pixels:
        for number, (left, right) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
            if left in pixels and right in pixels:
                pixel[number] = float(pixels[left] @ pixels[right])
    score = np.where(np.isnan(pixel), feature, (feature + np.clip(pixel, 0, 1)) / 2).astype(np.float32)
    threshold = duplicate_threshold(a, b, score, len(rows), ratio)
    near = score >= threshold
    cluster = np.full(len(a), -1, np.int64)
    if near.any():
        named = clusters(a[near], b[near], len(rows))
        cluster[near] = named[a[near]]
    order = np.argsort(-score, kind="stable")
    a, b = a[order], b[order]
    table = pa.table(
        {
            "split_a": pa.array(rows.split[a].tolist(), pa.string()),
            "index_a": rows.index[a],
            "key_a": pa.array(rows.key[a].tolist(), pa.string()),
            "split_b": pa.array(rows.split[b].tolist(), pa.string()),
            "index_b": rows.index[b],
            "key_b": pa.array(rows.key[b].tolist(), pa.string()),
            "score": score[order],
            "feature_similarity": feature[order].astype(np.float32),
            "pixel_similarity": pixel[order],
            "near_duplicate": near[order],
            "cluster": cluster[order],
        }
    )
    return table, threshold


def pixel_candidates(positions: np.ndarray, similarities: np.ndarray) -> np.ndarray:
    """The rows whose pictures the duplicate scores compare: those in a pair alike enough to be one."""
    a, b, feature = candidate_pairs(positions, similarities)
    close = feature >= PIXEL_FLOOR
    return np.unique(np.concatenate([a[close], b[close]]))


def neighbour_votes(rows: Rows, positions: np.ndarray, similarities: np.ndarray) -> np.ndarray:
    """rows x classes: the similarity-weighted share of each class among a row's neighbours' given labels."""
    classes = len(rows.classes)
    weights = np.where((positions >= 0) & np.isfinite(similarities), np.maximum(similarities, 0.0), 0.0).astype(np.float64)
    votes = np.zeros((len(rows), classes))
    neighbour_labels = rows.label[np.maximum(positions, 0)]
    for column in range(positions.shape[1]):
        np.add.at(votes, (np.arange(len(rows)), neighbour_labels[:, column]), weights[:, column])
    total = votes.sum(axis=1, keepdims=True)
    return np.where(total > 0, votes / np.maximum(total, 1e-12), 1.0 / classes)


def combined_distribution(probabilities: np.ndarray, votes: np.ndarray) -> np.ndarray:
    return (probabilities + votes) / 2


def class_thresholds(combined: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each class's mean combined probability of its own label among the rows given it (confident learning's per-class
    threshold): a class the model is unsure of everywhere is not taken for a class of wrong labels."""
    given = combined[np.arange(len(labels)), labels]
    counts = np.bincount(labels, minlength=combined.shape[1])
    totals = np.bincount(labels, weights=given, minlength=combined.shape[1])
    return np.where(counts > 0, totals / np.maximum(counts, 1), 1.0).clip(1e-6)


def estimated_label_issues(relative: np.ndarray, labels: np.ndarray, share: float = FLIPPED_SHARE) -> int:
    """How many rows are likely wrongly labelled, from `relative` (rows x classes: each class's combined probability
    over its threshold; a row's score is its given label's column).

    A row given a wrong class scores as rows score in the classes they were not given: those columns, every row's
    every other class, are what wrong labels look like. Take the score under which `share` of them fall; the rows
    whose own score is under it are about `share` of the wrong labels, and few correct ones, so they over `share`
    estimate the count. Why not confident learning's estimate (the calibrated confident joint's off-diagonal mass, as
    cleanlab's `prune_by_noise_rate` prunes): it counts every row the head confidently takes for another class, and
    on the benchmark (a head 62% accurate, 1% of the labels flipped) it estimated 27% of the rows; this, 1.75%. A
    wrong label between look-alike classes scores higher than a random one, so such errors are counted short."""
    rows = np.arange(len(labels))
    other = np.ones(relative.shape, bool)
    other[rows, labels] = False
    as_wrong = relative[other]
    if not len(as_wrong):
        return 0
    cut = np.quantile(as_wrong, share)
    under = np.mean(as_wrong <= cut)  # `share`, or more where many rows' other classes score alike (all 0, say)
    return min(int(round(np.sum(relative[rows, labels] <= cut) / under)), len(labels))


def label_issues_table(rows: Rows, probabilities: np.ndarray, votes: np.ndarray, fold: np.ndarray) -> pa.Table:
    """Every row, most doubtful first: split, index, key, given, suggested, score (lower = more likely wrong), whether
    it is an issue, the out-of-fold probability of the given label, its neighbours' agreement with it, the row's fold
    (-1: test), and its out-of-fold probabilities (the `pred_probs` other label-error tools take).

    The score is the combined probability of the given label over its class's threshold (`class_thresholds`); the
    suggested label is the class whose combined probability is highest over its own threshold. On the benchmark this
    ranks injected flips ahead of the out-of-fold probability alone, of the margin over the best other class, and of
    cleanlab's self-confidence on the same probabilities. The issues are the rows with the lowest scores whose
    suggested label is not the given one, as many as `estimated_label_issues` counts: not every row the data would
    label otherwise, which with a head 62% accurate flagged a third of the set."""
    combined = combined_distribution(probabilities, votes)
    every = np.arange(len(rows))
    relative = combined / class_thresholds(combined, rows.label)[None, :]
    score = relative[every, rows.label].astype(np.float32)
    suggested = relative.argmax(axis=1)
    names = np.array(rows.classes, dtype=object)
    order = np.argsort(score, kind="stable")
    doubted = suggested[order] != rows.label[order]
    issue = doubted & (np.cumsum(doubted) <= estimated_label_issues(relative, rows.label))
    return pa.table(
        {
            "split": pa.array(rows.split[order].tolist(), pa.string()),
            "index": rows.index[order],
            "key": pa.array(rows.key[order].tolist(), pa.string()),
            "given": pa.array(names[rows.label[order]].tolist(), pa.string()),
            "suggested": pa.array(names[suggested[order]].tolist(), pa.string()),
            "score": score[order],
            "issue": issue,
            "out_of_fold_probability": probabilities[every, rows.label][order].astype(np.float32),
            "neighbour_agreement": votes[every, rows.label][order].astype(np.float32),
            "fold": fold[order],
            "probabilities": pa.FixedSizeListArray.from_arrays(
                pa.array(probabilities[order].astype(np.float32).ravel()), probabilities.shape[1]
            ),
        }
    )


def outliers_table(rows: Rows, similarities: np.ndarray, class_similarity: np.ndarray, combined: np.ndarray) -> pa.Table:
    """Every row, most alone first: split, index, key, label, score (mean similarity to its neighbours: lower = more
    of an outlier), its similarity to its class's mean, and its ambiguity (1 - the margin of its two likeliest classes)."""
    finite = np.where(np.isfinite(similarities), similarities, np.nan)
    score = np.nan_to_num(np.nanmean(finite, axis=1), nan=-1.0).astype(np.float32) if finite.shape[1] else np.zeros(len(rows), np.float32)
    ranked = np.sort(combined, axis=1)
    ambiguity = (1.0 - (ranked[:, -1] - ranked[:, -2])).astype(np.float32) if combined.shape[1] > 1 else np.zeros(len(rows), np.float32)
    order = np.argsort(score, kind="stable")
    names = np.array(rows.classes, dtype=object)
    return pa.table(
        {
            "split": pa.array(rows.split[order].tolist(), pa.string()),
            "index": rows.index[order],
            "key": pa.array(rows.key[order].tolist(), pa.string()),
            "label": pa.array(names[rows.label[order]].tolist(), pa.string()),
            "score": score[order],
            "class_similarity": class_similarity[order].astype(np.float32),
            "ambiguity": ambiguity[order],
        }
    )
