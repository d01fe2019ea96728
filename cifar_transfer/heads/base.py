"""What every head is made of: the data it reads, what fitting it gives, what validation chose, how it is trained.

A head reads `HeadData` (streams of the fit, validation, train and test rows, shard by shard) and gives a
`FittedHead`: one Keras model taking the stored (flattened) features, its validation accuracy and its
`HeadDetails`. Its `Trainer` (registered in `cifar_transfer.heads`) says how it is fitted and refit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from cifar_transfer.config import HeadSettings
from cifar_transfer.native import compiled_forward
from cifar_transfer.storage import Storage
from cifar_transfer.streams import FeatureStream, Moments, validation_mask

PREDICT_BATCH = 1024
MOMENT_BLOCK_BYTES = 1 << 26  # rows added to moments at once (64 MiB: 5,958 rows of 2,816 features)


class HeadDetails(BaseModel):
    """What validation chose for one head and what it saw doing so, as `metrics.json` keeps it; each kind adds its
    own fields. Fields this code no longer writes stay readable (and are kept): records outlive the code."""

    model_config = ConfigDict(extra="allow")

    head: str
    validation_accuracy: float | None = None  # set on the candidates `metrics.json` lists
    refit: bool | None = None  # True once trained again on every train row with what validation chose

    def choice(self) -> str:
        """What validation chose, in a few words: "alpha=0.1", "best epoch 12"."""
        raise NotImplementedError

    def description(self) -> str:
        """ "ridge (alpha=0.1)", "mlp (best epoch 12)" or "ensemble (conv + ridge)"."""
        return f"{self.head} ({self.choice()})"


@dataclass(frozen=True)
class HeadData:
    """What every head reads: the train split's fit and validation parts, the whole train split, the test split.
    The train split is held in memory when it fits in `streams.HELD_BYTES` (its parts then too, as views of it);
    the test split, read once, streams."""

    train: FeatureStream
    fit: FeatureStream
    validation: FeatureStream
    test: FeatureStream
    classes: int

    @classmethod
    def open(cls, storage: Storage, folder: str, settings: HeadSettings, classes: int) -> HeadData:
        train = FeatureStream.open(storage, folder, "train", settings.flip)
        held_out = validation_mask(train.rows, settings.validation_split, settings.seed)
        # Every head passes over the train split several times: held, its fit rows first, so both parts are views.
        train = train.held(order=np.concatenate([np.flatnonzero(~held_out), np.flatnonzero(held_out)]))
        return cls(
            train, train.select(~held_out), train.select(held_out), FeatureStream.open(storage, folder, "test", settings.flip), classes
        )

    @property
    def feature_shape(self) -> list[int]:
        return list(self.train.feature_shape)


@dataclass
class FittedHead:
    model: Any  # a keras.Model taking the stored, flattened features (Keras has no type hints)
    validation_accuracy: float
    details: HeadDetails  # what was chosen on validation (strength, epochs) and the curve behind it
    members: list[FittedHead] = field(default_factory=list)  # an ensemble's heads
    # A ridge head's fit moments and its validation rows' moments (without their Gram matrix), for its refit.
    moments: tuple[Moments, Moments] | None = None


@dataclass(frozen=True)
class Trainer:
    """How one kind of head is trained: `fit` chooses on the validation rows; `refit` trains the model again on every
    train row with what `fit` chose (it returns the model; the stage keeps the validation accuracy and details)."""

    details: type[HeadDetails]
    fit: Callable[[HeadData, HeadSettings], FittedHead]
    refit: Callable[[FittedHead, HeadData, HeadSettings], object]


def spatial_mean(features: np.ndarray, feature_shape: list[int]) -> np.ndarray:
    """Average a flattened spatial map over height and width (identity for vectors)."""
    if len(feature_shape) == 1:
        return features
    return features.reshape(len(features), -1, feature_shape[-1]).mean(axis=1)


@dataclass
class BlockedMoments:
    """`Moments` fed in blocks of about `MOMENT_BLOCK_BYTES`: each addition adds a width² float32 product into the
    float64 Gram matrix, which at 2,816 features took as long as the products when added a shard (or a validation
    part's hundred rows) at a time. Smaller batches are gathered in one buffer, reused (fresh memory is slow)."""

    moments: Moments
    buffer: tuple[np.ndarray, np.ndarray] | None = None  # (rows, labels) gathered so far, at the front
    filled: int = 0

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        if not self.filled and features.nbytes >= MOMENT_BLOCK_BYTES:
            self.moments.add(features, labels)  # a block already
            return
        if self.buffer is not None and self.filled + len(features) > len(self.buffer[0]):
            self._flush()
        if self.buffer is None or len(features) > len(self.buffer[0]):
            rows = max(len(features), MOMENT_BLOCK_BYTES // max(1, features[:1].nbytes))
            self.buffer = (np.empty((rows, features.shape[1]), features.dtype), np.empty(rows, np.int64))
        self.buffer[0][self.filled : self.filled + len(features)] = features
        self.buffer[1][self.filled : self.filled + len(features)] = labels
        self.filled += len(features)
        if self.buffer[0][: self.filled].nbytes >= MOMENT_BLOCK_BYTES:
            self._flush()

    def done(self) -> Moments:
        self._flush()
        return self.moments

    def _flush(self) -> None:
        if self.buffer is not None and self.filled:
            self.moments.add(self.buffer[0][: self.filled], self.buffer[1][: self.filled])
        self.filled = 0


def stream_moments(stream: FeatureStream, classes: int, feature_shape: list[int], with_gram: bool) -> Moments:
    """The moments of a stream's training rows (both views when it has two), pooled for spatial maps."""
    moments = BlockedMoments(Moments(classes, with_gram))
    for batch in stream.blocks(MOMENT_BLOCK_BYTES):
        features, labels = batch.training_rows()
        moments.add(spatial_mean(features, feature_shape), labels)
    return moments.done()


def predictor(model):
    """A fast batch prediction function of a Keras head (no `predict` loop per call)."""
    forward = compiled_forward(model)

    def predict(rows: np.ndarray) -> np.ndarray:
        return (
            np.concatenate([forward(rows[start : start + PREDICT_BATCH]).numpy() for start in range(0, len(rows), PREDICT_BATCH)])
            if len(rows)
            else np.zeros((0, model.output.shape[-1]), np.float32)
        )

    return predict


def stream_accuracy(stream: FeatureStream, model) -> float:
    """Accuracy of `model` on a stream, both views' probabilities averaged when it has two."""
    predict, correct = predictor(model), 0
    for batch in stream.batches():
        correct += int(np.sum(batch.probabilities(predict).argmax(axis=1) == batch.labels))
    return correct / stream.count
