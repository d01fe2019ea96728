"""Train small classifier heads on stored features; choose on validation, test once.

Heads read the features shard by shard (`streams`), so their memory does not
grow with the number of images:
- "ridge" (the default): least squares onto one-hot classes from streamed
  moments, its strength and softmax temperature chosen on validation (`ridge`);
- "logistic": standardize, dense softmax, trained with Adam, the best epoch on validation;
- "mlp": standardize, dropout, Dense(MLP_UNITS, relu), dropout, softmax, early
  stopping on validation;
- "conv": the 2017 post's head on spatial maps: Conv2D(100, 2), dropout 0.4,
  global average pooling, dropout 0.3, softmax, trained with RMSprop;
- "auto": ridge on vectors; conv and ridge on pooled maps for spatial
  features, and their ensemble (the average of their probabilities); the best on
  validation wins;
- "all": every head that fits the features and their ensemble (minutes, not seconds).
Standardization statistics come from the fit part only. With flips, heads
train on both views of each image and average the two views' probabilities at
validation and test. The validation part is a seeded random fraction of the
train split; the test split is predicted once, by the chosen head. With
`refit` (the default), the chosen head is then trained again with what
validation chose (strength and temperature, epochs; each member of an
ensemble) on every train row, the validation part included, before it predicts
test; for ridge that is one more solve. Every head is saved as one Keras model
that takes the stored (flattened) features, so consumers need only Keras.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from cifar_transfer import layout, records, ridge
from cifar_transfer.config import HeadSettings
from cifar_transfer.evaluation import confusion_matrix, per_class_accuracy
from cifar_transfer.feature_records import Lineage
from cifar_transfer.layout import HeadFiles
from cifar_transfer.native import load_keras, load_tensorflow
from cifar_transfer.plots import confusion_figure, save_png
from cifar_transfer.shard_files import parquet_bytes
from cifar_transfer.storage import Storage
from cifar_transfer.streams import FeatureStream, Moments, validation_mask

log = logging.getLogger(__name__)

MLP_UNITS = 512  # measured here: as accurate as 1024 (MobileNetV2 validation 78.4% vs 78.0%) at 0.6x the time
PREDICT_BATCH = 1024


class CandidateScore(BaseModel):
    """One candidate head as validation judged it, with what was chosen for it (strength, epochs, members)."""

    model_config = ConfigDict(extra="allow")

    head: str
    validation_accuracy: float
    strength: float | None = None  # ridge's alpha
    C: float | None = None  # heads trained before ridge replaced the logistic path
    best_epoch: int | None = None
    of: list[str] | None = None

    def description(self) -> str:
        """ "ridge (alpha=0.1)", "mlp (best epoch 12)" or "ensemble (conv + ridge)"."""
        if self.strength is not None:
            detail = f"alpha={self.strength:g}"
        elif self.C is not None:
            detail = f"C={self.C:g}"
        elif self.of is not None:
            detail = " + ".join(self.of)
        else:
            detail = f"best epoch {self.best_epoch}"
        return f"{self.head} ({detail})"


class HeadMetrics(BaseModel):
    """The content of a head's `metrics.json`: everything later stages and people need, computed once."""

    model_config = ConfigDict(extra="allow")

    test_accuracy: float
    validation_accuracy: float
    chosen: dict  # the chosen head's details (as in `candidates`, plus curves and histories)
    candidates: list[CandidateScore]
    per_class_accuracy: dict[str, float]
    confusion_matrix: list[list[int]]
    classes: list[str]
    sizes: dict[str, int]
    settings: HeadSettings
    features: str
    seconds: float
    made_by: Lineage | None = None  # the flow run that trained it (absent: not trained by a flow run)

    @property
    def chosen_candidate(self) -> CandidateScore:
        return next(candidate for candidate in self.candidates if candidate.head == self.chosen["head"])


class HeadResult(BaseModel):
    """A finished head: its files and its metrics."""

    files: HeadFiles
    metrics: HeadMetrics

    @property
    def kind(self) -> str:
        return self.metrics.chosen["head"]

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
        metrics = records.HEAD_METRICS.load(HeadMetrics, storage.read_bytes(files.metrics), storage.uri(files.metrics))
    except ValueError as exc:
        log.warning("head metrics %s are unreadable (%s): training the head again", storage.uri(files.metrics), str(exc).splitlines()[0])
        return None
    return HeadResult(files=files, metrics=metrics)


def candidate_heads(kind: str, feature_shape: list[int]) -> list[str]:
    """The heads a kind fits: itself; "auto" the fast ones; "all" every head that fits the features."""
    spatial = len(feature_shape) > 1
    if kind == "auto":
        return ["conv", "ridge"] if spatial else ["ridge"]
    if kind == "all":
        return ["conv", "ridge", "logistic", "mlp"] if spatial else ["ridge", "logistic", "mlp"]
    return [kind]


def spatial_mean(features: np.ndarray, feature_shape: list[int]) -> np.ndarray:
    """Average a flattened spatial map over height and width (identity for vectors)."""
    if len(feature_shape) == 1:
        return features
    return features.reshape(len(features), -1, feature_shape[-1]).mean(axis=1)


@dataclass(frozen=True)
class HeadData:
    """What every head reads: the train split's fit and validation parts, the whole train split, the test split."""

    train: FeatureStream
    fit: FeatureStream
    validation: FeatureStream
    test: FeatureStream
    classes: int

    @classmethod
    def open(cls, storage: Storage, folder: str, settings: HeadSettings, classes: int) -> HeadData:
        train = FeatureStream.open(storage, folder, "train", settings.flip)
        held_out = validation_mask(train.rows, settings.validation_split, settings.seed)
        return cls(
            train, train.select(~held_out), train.select(held_out), FeatureStream.open(storage, folder, "test", settings.flip), classes
        )

    @property
    def feature_shape(self) -> list[int]:
        return list(self.train.feature_shape)


@dataclass
class FittedHead:
    model: object  # a keras.Model taking the stored, flattened features
    validation_accuracy: float
    details: dict  # what was chosen on validation (strength, epochs) and the curve behind it
    members: list[FittedHead] = field(default_factory=list)  # an ensemble's heads
    moments: tuple[Moments, Moments] | None = None  # a ridge head's fit and validation moments, for its refit


def stream_moments(stream: FeatureStream, classes: int, feature_shape: list[int], with_gram: bool) -> Moments:
    """The moments of a stream's training rows (both views when it has two), pooled for spatial maps."""
    moments = Moments(classes, with_gram)
    for batch in stream.batches():
        features, labels = batch.training_rows()
        moments.add(spatial_mean(features, feature_shape), labels)
    return moments


def predictor(model):
    """A fast batch prediction function of a Keras head (no `predict` loop per call)."""
    tf = load_tensorflow()
    forward = tf.function(lambda rows: model(rows, training=False), reduce_retracing=True, autograph=False)

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


def fit_ridge(data: HeadData, settings: HeadSettings) -> FittedHead:
    """Ridge along `RIDGE_STRENGTHS`: one pass for the fit moments, one solve, one validation pass judging all strengths."""
    shape = data.feature_shape
    fit_moments = stream_moments(data.fit, data.classes, shape, with_gram=True)
    validation_moments = Moments(data.classes, with_gram=True)
    scores = ridge.solve(fit_moments, ridge.RIDGE_STRENGTHS)
    tally = ridge.ValidationTally.empty(len(ridge.RIDGE_STRENGTHS))
    for batch in data.validation.batches():
        tally.add([scores(spatial_mean(view, shape)) for view in batch.views], batch.labels)
        features, labels = batch.training_rows()
        validation_moments.add(spatial_mean(features, shape), labels)
    strength, temperature = tally.best()
    accuracies, _ = tally.curve()
    curve = [
        {"strength": value, "validation_accuracy": float(accuracy)}
        for value, accuracy in zip(ridge.RIDGE_STRENGTHS, accuracies, strict=True)
    ]
    chosen = scores.strength(strength)
    details = {
        "head": "ridge",
        "strength": ridge.RIDGE_STRENGTHS[strength],
        "temperature": float(ridge.TEMPERATURES[temperature]),
        "strengths": curve,
    }
    model = ridge.ridge_model(chosen, ridge.TEMPERATURES[temperature], shape)
    return FittedHead(model, tally.accuracy(strength, temperature), details, moments=(fit_moments, validation_moments))


def feature_batches(stream: FeatureStream, batch_size: int, seed: int | None = None, both_views: bool = True):
    """(tf.data pipeline, batches per pass): (features, labels) batches read from the shards, endlessly; with `seed`
    shuffled in a new order each pass. Every pass yields the same number of batches (rows carried over between
    windows of shards), so Keras counts epochs exactly. `both_views`: a mirrored view's rows are more rows."""
    tf = load_tensorflow()
    passes = iter(range(1 << 30))
    views = 2 if stream.mirrored and both_views else 1

    def batches():
        carried_features, carried_labels = np.zeros((0, stream.width), np.float32), np.zeros(0, np.int64)
        for window in stream.batches(seed=None if seed is None else seed * 100_003 + next(passes)):
            features, labels = window.training_rows() if views == 2 else (window.features, window.labels)
            features, labels = np.concatenate([carried_features, features]), np.concatenate([carried_labels, labels])
            whole = len(labels) - len(labels) % batch_size
            for start in range(0, whole, batch_size):
                yield features[start : start + batch_size], labels[start : start + batch_size]
            carried_features, carried_labels = features[whole:], labels[whole:]
        if len(carried_labels):
            yield carried_features, carried_labels

    signature = (tf.TensorSpec((None, stream.width), tf.float32), tf.TensorSpec((None,), tf.int64))
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature).repeat().prefetch(2)
    return dataset, -(-views * stream.count // batch_size)


def build_network_head(kind: str, feature_shape: list[int], classes: int, moments: Moments | None, learning_rate: float):
    """A compiled trainable head ("logistic", "mlp" or "conv") for features of `feature_shape` (stored flattened);
    vector heads standardize with the fit rows' `moments`."""
    keras = load_keras()

    inputs = keras.Input((int(np.prod(feature_shape)),), name="features")
    if kind == "conv":
        height, width = feature_shape[0], feature_shape[1]
        x = keras.layers.Reshape(tuple(feature_shape))(inputs)
        x = keras.layers.Conv2D(100, kernel_size=min(2, height, width))(x)
        x = keras.layers.Dropout(0.4)(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dropout(0.3)(x)
        optimizer = keras.optimizers.RMSprop(learning_rate)
    else:
        x = inputs
        if len(feature_shape) > 1:
            x = keras.layers.Reshape((-1, feature_shape[-1]))(x)
            x = keras.layers.GlobalAveragePooling1D()(x)
        x = keras.layers.Normalization(mean=moments.mean, variance=moments.variance)(x)
        if kind == "mlp":
            x = keras.layers.Dropout(0.2)(x)
            x = keras.layers.Dense(MLP_UNITS, activation="relu")(x)
            x = keras.layers.Dropout(0.5)(x)
        optimizer = keras.optimizers.Adam(learning_rate)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name=f"{kind}_head")
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit_network(
    kind: str, fit: FeatureStream, validation: FeatureStream | None, feature_shape: list[int], classes: int, settings: HeadSettings
) -> FittedHead:
    """Train from the shards with early stopping on validation accuracy, keeping the best epoch's weights
    (all epochs without validation)."""
    keras = load_keras()

    keras.utils.set_random_seed(settings.seed)
    moments = None if kind == "conv" else stream_moments(fit, classes, feature_shape, with_gram=False)
    model = build_network_head(kind, feature_shape, classes, moments, settings.learning_rate)
    batches, steps = feature_batches(fit, settings.batch_size, settings.seed)
    if validation is None:  # the batches come shuffled
        history = model.fit(batches, epochs=settings.epochs, steps_per_epoch=steps, shuffle=False, verbose=0).history
        return FittedHead(model, float("nan"), {"head": kind, "epochs_run": len(history["loss"])})
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=settings.patience, restore_best_weights=True)
    held_out, validation_steps = feature_batches(validation, PREDICT_BATCH, both_views=False)
    history = model.fit(
        batches,
        validation_data=held_out,
        epochs=settings.epochs,
        steps_per_epoch=steps,
        validation_steps=validation_steps,
        callbacks=[stop],
        shuffle=False,
        verbose=0,
    ).history
    best_epoch = int(np.argmax(history["val_accuracy"]))
    details = {
        "head": kind,
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history["val_accuracy"]),
        "history": {name: [float(value) for value in values] for name, values in history.items()},
    }
    accuracy = float(history["val_accuracy"][best_epoch]) if not validation.mirrored else stream_accuracy(validation, model)
    return FittedHead(model, accuracy, details)


def fit_head(kind: str, data: HeadData, settings: HeadSettings) -> FittedHead:
    if kind == "ridge":
        return fit_ridge(data, settings)
    return fit_network(kind, data.fit, data.validation, data.feature_shape, data.classes, settings)


def average_model(members: list[FittedHead], feature_shape: list[int]):
    """One Keras model giving the average of the members' probabilities."""
    keras = load_keras()

    inputs = keras.Input((int(np.prod(feature_shape)),), name="features")
    outputs = keras.layers.Average()([member.model(inputs) for member in members])
    return keras.Model(inputs, outputs, name="ensemble_head")


def ensemble_head(members: list[FittedHead], data: HeadData) -> FittedHead:
    """The average of the members' probabilities: one more candidate, chosen only if validation prefers it."""
    model = average_model(members, data.feature_shape)
    details = {"head": "ensemble", "of": [member.details["head"] for member in members]}
    return FittedHead(model, stream_accuracy(data.validation, model), details, list(members))


def refit_head(chosen: FittedHead, data: HeadData, settings: HeadSettings) -> FittedHead:
    """`chosen` trained again on every train row with what validation chose for it: ridge's strength and temperature
    (the fit and validation moments summed, one solve), or a network's best epoch count. Selection needed held-out
    rows; the final model need not leave them out. The validation accuracy stays the one measured before."""
    if chosen.members:
        members = [refit_head(member, data, settings) for member in chosen.members]
        return FittedHead(
            average_model(members, data.feature_shape), chosen.validation_accuracy, {**chosen.details, "refit": True}, members
        )
    kind = chosen.details["head"]
    if kind == "ridge":
        fit_moments, validation_moments = chosen.moments
        scores = ridge.solve(fit_moments + validation_moments, (chosen.details["strength"],))
        model = ridge.ridge_model(scores, chosen.details["temperature"], data.feature_shape)
    else:
        epochs = settings.model_copy(update={"epochs": chosen.details["best_epoch"]})
        model = fit_network(kind, data.train, None, data.feature_shape, data.classes, epochs).model
    return FittedHead(model, chosen.validation_accuracy, {**chosen.details, "refit": True})


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
    started = time.perf_counter()
    files = layout.head_files(folder, key)
    storage.write_atomic(files.settings, records.HEAD_SETTINGS.dump(settings))
    data = HeadData.open(storage, folder, settings, len(classes))
    candidates = []
    for kind in candidate_heads(settings.head, data.feature_shape):
        fitted = fit_head(kind, data, settings)
        log.info(
            "%s head: validation %.2f%% (%s)",
            kind,
            100 * fitted.validation_accuracy,
            ", ".join(f"{name} {value:g}" for name, value in fitted.details.items() if name in ("strength", "temperature", "best_epoch")),
        )
        candidates.append(fitted)
    if len(candidates) > 1:
        candidates.append(ensemble_head(candidates, data))
        log.info("ensemble head: validation %.2f%%", 100 * candidates[-1].validation_accuracy)
    chosen = max(candidates, key=lambda fitted: fitted.validation_accuracy)
    if settings.refit:
        refit_started = time.perf_counter()
        chosen = refit_head(chosen, data, settings)
        log.info(
            "refit the %s head on all %d train rows in %.1f s", chosen.details["head"], data.train.rows, time.perf_counter() - refit_started
        )
    train, test = predict_split(data.train, chosen.model), predict_split(data.test, chosen.model)
    matrix = confusion_matrix(test.labels, test.predicted, len(classes))
    metrics = HeadMetrics(
        test_accuracy=float((test.predicted == test.labels).mean()),
        validation_accuracy=chosen.validation_accuracy,
        chosen=chosen.details,
        candidates=[CandidateScore(validation_accuracy=fitted.validation_accuracy, **fitted.details) for fitted in candidates],
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
    title = f"{chosen.details['head']} head: test accuracy {metrics.test_accuracy:.2%}"
    storage.write_atomic(files.confusion_picture, save_png(confusion_figure(matrix, classes, title)))
    storage.write_atomic(files.metrics, records.HEAD_METRICS.dump(metrics, exclude_none=True))
    log.info(
        "chose the %s head on validation (%.2f%%): test %.2f%% (%.0f s)",
        chosen.details["head"],
        100 * chosen.validation_accuracy,
        100 * metrics.test_accuracy,
        metrics.seconds,
    )
    return HeadResult(files=files, metrics=metrics)
