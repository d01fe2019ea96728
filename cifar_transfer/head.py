"""The head stage: fit the candidate heads on stored features, choose on validation, test once.

Which heads there are, and what "auto" and "all" try, is the registry's (`cifar_transfer.heads`); each head's
training is its own module there. This stage fits the candidates a kind names (their ensemble too, when there are
several: the average of their probabilities), keeps the best on validation, and with `refit` (the default) trains
it again with what validation chose (strength and temperature, epochs; each member of an ensemble) on every train
row, the validation part included, before it predicts test. Heads read the features shard by shard (`streams`),
so their memory does not grow with the number of images; standardization statistics come from the fit part only.
With flips, heads train on both views of each image and average the two views' probabilities at validation and
test. The validation part is a seeded random fraction of the train split; the test split is predicted once, by the
chosen head. Every head is saved as one Keras model that takes the stored (flattened) features, so consumers need
only Keras.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, BeforeValidator, ConfigDict, SerializeAsAny

from cifar_transfer import layout, records
from cifar_transfer.config import HeadSettings
from cifar_transfer.evaluation import confusion_matrix, per_class_accuracy
from cifar_transfer.feature_records import Lineage
from cifar_transfer.hardware import sharing_cores
from cifar_transfer.heads import HEADS, candidate_heads
from cifar_transfer.heads.base import FittedHead, HeadData, HeadDetails, predictor
from cifar_transfer.heads.ensemble import EnsembleDetails, average_model, ensemble_head
from cifar_transfer.layout import HeadFiles
from cifar_transfer.pause import pause_at
from cifar_transfer.plots import confusion_figure, save_png
from cifar_transfer.shard_files import parquet_bytes
from cifar_transfer.storage import Storage
from cifar_transfer.streams import FeatureStream

log = logging.getLogger(__name__)


def stored_details(value) -> HeadDetails:
    """A head's details as `metrics.json` keeps them, typed by the kind they name."""
    if isinstance(value, HeadDetails):
        return value
    kinds = {"ensemble": EnsembleDetails, **{name: head.trainer.details for name, head in HEADS.items()}}
    kind = value.get("head") if isinstance(value, dict) else None
    if kind not in kinds:
        raise ValueError(f"head {kind!r} is none of {', '.join(kinds)}")
    return kinds[kind].model_validate(value)


StoredDetails = Annotated[SerializeAsAny[HeadDetails], BeforeValidator(stored_details)]


class HeadMetrics(BaseModel):
    """The content of a head's `metrics.json`: everything later stages and people need, computed once."""

    model_config = ConfigDict(extra="allow")

    test_accuracy: float
    validation_accuracy: float
    chosen: StoredDetails  # the chosen head's details (as in `candidates`, without the validation accuracy)
    candidates: list[StoredDetails]  # every head validation judged, with its validation accuracy
    per_class_accuracy: dict[str, float]
    confusion_matrix: list[list[int]]
    classes: list[str]
    sizes: dict[str, int]
    settings: HeadSettings
    features: str
    seconds: float
    made_by: Lineage | None = None  # the flow run that trained it (absent: not trained by a flow run)


class HeadResult(BaseModel):
    """A finished head: its files and its metrics."""

    files: HeadFiles
    metrics: HeadMetrics

    @property
    def kind(self) -> str:
        return self.metrics.chosen.head

    @property
    def test_accuracy(self) -> float:
        return self.metrics.test_accuracy

    @property
    def validation_accuracy(self) -> float:
        return self.metrics.validation_accuracy

    @property
    def seconds(self) -> float:
        return self.metrics.seconds


def finished_head(storage: Storage, folder: str, key: str) -> HeadResult | None:
    """The head's result if every file of it is there and its metrics (written last) are readable, else None."""
    files = layout.head_files(folder, key)
    if files.missing(storage):
        return None
    try:
        metrics = records.HEAD_METRICS.load(HeadMetrics, storage.read_bytes(files.metrics), storage.uri(files.metrics), storage.root)
    except ValueError as exc:
        log.warning("head metrics %s are unreadable (%s): training the head again", storage.uri(files.metrics), str(exc).splitlines()[0])
        return None
    return HeadResult(files=files, metrics=metrics)


def refit_head(chosen: FittedHead, data: HeadData, settings: HeadSettings) -> FittedHead:
    """`chosen` trained again on every train row with what validation chose for it (each member of an ensemble).
    Selection needed held-out rows; the final model need not leave them out. The validation accuracy stays the one
    measured before."""
    details = chosen.details.model_copy(update={"refit": True})
    if chosen.members:
        members = [refit_head(member, data, settings) for member in chosen.members]
        return FittedHead(average_model(members, data.feature_shape), chosen.validation_accuracy, details, members)
    return FittedHead(HEADS[chosen.details.head].trainer.refit(chosen, data, settings), chosen.validation_accuracy, details)


def predictions_table(split: str, index: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "split": pa.array([split] * len(index)),
            "index": index,
            "label": labels,
            "predicted": probabilities.argmax(axis=1),
            "confidence": probabilities.max(axis=1).astype(np.float32),
        }
    )


@dataclass
class SplitPredictions:
    """A split's predictions by the chosen head, streamed into one table."""

    table: pa.Table
    labels: np.ndarray
    predicted: np.ndarray


def predict_split(stream: FeatureStream, model) -> SplitPredictions:
    predict, tables = predictor(model), []
    for batch in stream.batches():
        tables.append(predictions_table(stream.split, batch.index, batch.labels, batch.probabilities(predict)))
    table = pa.concat_tables(tables)
    return SplitPredictions(table, table.column("label").to_numpy(), table.column("predicted").to_numpy())


def train_head(
    storage_url: str, folder: str, key: str, settings: HeadSettings, classes: list[str], lineage: Lineage | None = None
) -> HeadResult:
    """Fit every candidate head, choose on validation, predict test once; save model, predictions, metrics, picture."""
    storage = Storage(storage_url)
    done = finished_head(storage, folder, key)
    if done is not None:
        return done
    with sharing_cores():
        return _new_head(storage, folder, key, settings, classes, lineage)


def _new_head(storage: Storage, folder: str, key: str, settings: HeadSettings, classes: list[str], lineage: Lineage | None) -> HeadResult:
    started = time.perf_counter()
    files = layout.head_files(folder, key)
    storage.write_atomic(files.settings, records.HEAD_SETTINGS.dump(settings))
    pause_at("head")  # a test hook, inert unless CIFAR_TRANSFER_PAUSE_AT names it
    data = HeadData.open(storage, folder, settings, len(classes))
    candidates = []
    for head in candidate_heads(settings.head, data.feature_shape):
        fitted = head.trainer.fit(data, settings)
        log.info("%s head: validation %.2f%% (%s)", head.name, 100 * fitted.validation_accuracy, fitted.details.choice())
        candidates.append(fitted)
    if len(candidates) > 1:
        candidates.append(ensemble_head(candidates, data))
        log.info("ensemble head: validation %.2f%%", 100 * candidates[-1].validation_accuracy)
    chosen = max(candidates, key=lambda fitted: fitted.validation_accuracy)
    if settings.refit:
        refit_started = time.perf_counter()
        chosen = refit_head(chosen, data, settings)
        log.info(
            "refit the %s head on all %d train rows in %.1f s", chosen.details.head, data.train.rows, time.perf_counter() - refit_started
        )
    train, test = predict_split(data.train, chosen.model), predict_split(data.test, chosen.model)
    matrix = confusion_matrix(test.labels, test.predicted, len(classes))
    metrics = HeadMetrics(
        test_accuracy=float((test.predicted == test.labels).mean()),
        validation_accuracy=chosen.validation_accuracy,
        chosen=chosen.details,
        candidates=[fitted.details.model_copy(update={"validation_accuracy": fitted.validation_accuracy}) for fitted in candidates],
        per_class_accuracy={name: float(value) for name, value in zip(classes, per_class_accuracy(matrix), strict=True)},
        confusion_matrix=matrix.tolist(),
        classes=classes,
        sizes={"train": data.fit.count, "validation": data.validation.count, "test": data.test.rows},
        settings=settings,
        features=folder,
        seconds=time.perf_counter() - started,
        made_by=lineage,
    )
    with tempfile.TemporaryDirectory() as scratch:
        local_model = os.path.join(scratch, "model.keras")
        chosen.model.save(local_model)
        with open(local_model, "rb") as stream:
            storage.write_atomic(files.model, stream.read())
    storage.write_atomic(files.predictions, parquet_bytes(pa.concat_tables([train.table, test.table])))
    title = f"{chosen.details.head} head: test accuracy {metrics.test_accuracy:.2%}"
    storage.write_atomic(files.confusion_picture, save_png(confusion_figure(matrix, classes, title)))
    storage.write_atomic(files.metrics, records.HEAD_METRICS.dump(metrics, root=storage.root, exclude_none=True))
    log.info(
        "chose the %s head on validation (%.2f%%): test %.2f%% (%.0f s)",
        chosen.details.head,
        100 * chosen.validation_accuracy,
        100 * metrics.test_accuracy,
        metrics.seconds,
    )
    return HeadResult(files=files, metrics=metrics)
