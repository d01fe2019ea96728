"""Out-of-fold class probabilities for every row, train and test, from the head family a run chose.

The train split is cut into `folds` seeded folds. For each fold, the head kind the run chose (its `metrics.json`:
the chosen head, or each member of a chosen ensemble) is fitted on the other folds exactly as the head stage fits it
(its strength or epochs chosen on a validation part of them, then refit on all of them when the run refit), and
scores the held-out fold. Test rows are scored by the average of the fold heads, none of which saw them. So no row is
scored by a head that saw it. The heads read the shards through `streams`, so memory does not grow with the set.
"""

from __future__ import annotations

import logging

import numpy as np

from cifar_transfer.config import HeadSettings
from cifar_transfer.head import HeadMetrics, refit_head
from cifar_transfer.heads import HEADS
from cifar_transfer.heads.base import FittedHead, HeadData, predictor
from cifar_transfer.heads.ensemble import EnsembleDetails, ensemble_head
from cifar_transfer.storage import Storage
from cifar_transfer.streams import FeatureStream, validation_mask

log = logging.getLogger(__name__)


def chosen_kinds(metrics: HeadMetrics) -> list[str]:
    """The head kinds the run chose: the chosen head's, or its ensemble's members'."""
    chosen = metrics.chosen
    if isinstance(chosen, EnsembleDetails):
        return list(chosen.of)
    return [chosen.head]


def fold_of(rows: int, folds: int, seed: int) -> np.ndarray:
    """Each train row's fold, seeded and balanced."""
    order = np.random.default_rng(seed + 1).permutation(rows)
    assigned = np.empty(rows, np.int64)
    assigned[order] = np.arange(rows) % folds
    return assigned


def fold_data(train: FeatureStream, test: FeatureStream, held_out: np.ndarray, settings: HeadSettings, classes: int) -> HeadData:
    """The head stage's data for one fold: its train rows are the other folds (with their own validation part); `test`
    are the held-out rows."""
    kept = np.flatnonzero(~held_out)
    validation = np.zeros(train.rows, bool)
    validation[kept[validation_mask(len(kept), settings.validation_split, settings.seed)]] = True
    return HeadData(
        train.select(~held_out), train.select(~held_out & ~validation), train.select(validation), train.select(held_out), classes
    )


def fit_fold(kinds: list[str], data: HeadData, settings: HeadSettings) -> FittedHead:
    members = [HEADS[kind].trainer.fit(data, settings) for kind in kinds]
    fitted = members[0] if len(members) == 1 else ensemble_head(members, data)
    return refit_head(fitted, data, settings) if settings.refit else fitted


def out_of_fold(storage: Storage, folder: str, metrics: HeadMetrics, folds: int, classes: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(train fold of each train row, {split: rows x classes probabilities in the split's manifest order})."""
    settings = metrics.settings
    train = FeatureStream.open(storage, folder, "train", settings.flip)
    test = FeatureStream.open(storage, folder, "test", settings.flip)
    kinds = chosen_kinds(metrics)
    assigned = fold_of(train.rows, folds, settings.seed)
    probabilities = {"train": np.zeros((train.rows, classes), np.float32), "test": np.zeros((test.rows, classes), np.float32)}
    for fold in range(folds):
        held_out = assigned == fold
        fitted = fit_fold(kinds, fold_data(train, test, held_out, settings, classes), settings)
        predict = predictor(fitted.model)
        for batch in train.select(held_out).batches():
            probabilities["train"][batch.positions] = batch.probabilities(predict)
        for batch in test.batches():
            probabilities["test"][batch.positions] += batch.probabilities(predict) / folds
        log.info("audit: fold %d of %d (%s) scored %d train rows", fold + 1, folds, " + ".join(kinds), int(held_out.sum()))
    return assigned, probabilities
