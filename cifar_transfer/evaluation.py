"""Accuracy figures computed once from predictions, shared by the head stage, the report and the HTML page."""

from __future__ import annotations

import numpy as np


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs: rows are the truth."""
    truth, predicted = np.asarray(truth, np.int64), np.asarray(predicted, np.int64)
    return np.bincount(truth * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Share of each true class predicted right (0 for a class with no images)."""
    return matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)


def sample_rows(count: int, sample: int, seed: int) -> np.ndarray:
    """Sorted row positions of a seeded sample; all rows when the sample covers them."""
    if sample >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=sample, replace=False))
