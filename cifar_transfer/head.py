"""Train small classifier heads on stored features; choose on validation, test once.

Heads:
- "logistic": standardized features, L2-regularized softmax regression; its
  strength C is chosen on validation along `LOGISTIC_STRENGTHS` (scikit-learn);
- "mlp": standardize, dropout, Dense(MLP_UNITS, relu), dropout, softmax, early
  stopping on validation (pooled vectors);
- "conv": the 2017 post's head on spatial maps: Conv2D(100, 2), dropout 0.4,
  global average pooling, dropout 0.3, softmax, trained with RMSprop;
- "auto": every head that fits the features (logistic and mlp on vectors;
  conv and logistic on pooled maps for spatial features) and their ensemble
  (the average of their probabilities); the best on validation wins.
Standardization statistics come from the training part only. With flips, heads
train on both views of each image and average the two views' probabilities at
validation and test. The validation
part is a seeded random fraction of the train split; the test split is
predicted once, by the chosen head. With `refit`, the chosen head is then
trained again with what validation chose (strength, epochs; each member of an
ensemble) on every train row, the validation part included, before it
predicts test. Every head is saved as one Keras model
that takes the stored (flattened) features, so consumers need only Keras.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from cifar_transfer import layout
from cifar_transfer.config import HeadSettings
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.evaluation import confusion_matrix, per_class_accuracy
from cifar_transfer.layout import HeadFiles
from cifar_transfer.native import load_keras
from cifar_transfer.plots import confusion_figure, save_png
from cifar_transfer.shards import FLIPPED
from cifar_transfer.storage import Storage
from cifar_transfer.store import Lineage, parquet_bytes, read_manifest, read_split

log = logging.getLogger(__name__)

LOGISTIC_STRENGTHS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # strong to weak regularization
STRENGTH_PATIENCE = 2
LOGISTIC_MAX_ITERATIONS = 50  # each fit starts from the previous strength's solution
ABSENT_CLASS_INTERCEPT = -1e4  # a logistic head's logit for a class its fit rows lacked
MLP_UNITS = 512  # measured here: as accurate as 1024 (MobileNetV2 validation 78.4% vs 78.0%) at 0.6x the time


class CandidateScore(BaseModel):
    """One candidate head as validation judged it, with what was chosen for it (strength, epochs, members)."""

    model_config = ConfigDict(extra="allow")

    head: str
    validation_accuracy: float
    C: float | None = None
    best_epoch: int | None = None
    of: list[str] | None = None

    def description(self) -> str:
        """"logistic (C=0.01)", "mlp (best epoch 12)" or "ensemble (logistic + mlp)"."""
        if self.C is not None:
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
    made_by: Lineage | None = None  # the flow run that trained it (absent in heads trained before it was recorded)

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
        metrics = HeadMetrics.model_validate_json(storage.read_bytes(files.metrics))
    except ValueError as exc:
        log.warning("head metrics %s are unreadable (%s): training the head again", storage.uri(files.metrics), str(exc).splitlines()[0])
        return None
    return HeadResult(files=files, metrics=metrics)


def candidate_heads(kind: str, feature_shape: list[int]) -> list[str]:
    if kind != "auto":
        return [kind]
    return ["conv", "logistic"] if len(feature_shape) > 1 else ["logistic", "mlp"]


@dataclass
class Split:
    """Features (flattened as stored) and labels of one part of the data, with its mirrored view when asked for."""

    features: np.ndarray
    labels: np.ndarray
    mirrored: np.ndarray | None = None

    def rows(self, positions: np.ndarray) -> Split:
        return Split(self.features[positions], self.labels[positions], None if self.mirrored is None else self.mirrored[positions])

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """What a head fits on: both views as separate examples (augmentation) when there are two."""
        if self.mirrored is None:
            return self.features, self.labels
        return np.concatenate([self.features, self.mirrored]), np.concatenate([self.labels, self.labels])

    def probabilities(self, predict) -> np.ndarray:
        """`predict` on the features, averaged with the mirrored view's when there is one (test-time augmentation)."""
        if self.mirrored is None:
            return predict(self.features)
        return (predict(self.features) + predict(self.mirrored)) / 2

    def accuracy(self, predict) -> float:
        return float(np.mean(self.probabilities(predict).argmax(axis=1) == self.labels))


@dataclass
class FittedHead:
    model: object  # a keras.Model taking the stored, flattened features
    validation_accuracy: float
    details: dict  # what was chosen on validation (strength, epochs) and the curve behind it
    members: list[FittedHead] = field(default_factory=list)  # an ensemble's heads


def spatial_mean(features: np.ndarray, feature_shape: list[int]) -> np.ndarray:
    """Average a flattened spatial map over height and width (identity for vectors)."""
    if len(feature_shape) == 1:
        return features
    return features.reshape(len(features), -1, feature_shape[-1]).mean(axis=1)


def fit_logistic(
    fit: Split, validation: Split | None, feature_shape: list[int], classes: int, settings: HeadSettings, strengths=LOGISTIC_STRENGTHS
) -> FittedHead:
    """L2 softmax regression along `strengths`; keep the best strength on validation (the last one without).

    scikit-learn does the fitting (a convex problem: no epochs to tune). The
    path runs from strong to weak regularization, each fit starting from the
    previous solution, and stops once validation accuracy has fallen for
    `STRENGTH_PATIENCE` strengths in a row (it rises, then falls, along C).
    The winner becomes a Keras model (mean-pooling, standardization, dense
    softmax) so every head is stored and used the same way.
    """
    keras = load_keras()
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features, labels = fit.training_data()
    scaler = StandardScaler().fit(spatial_mean(features, feature_shape))
    train_x = scaler.transform(spatial_mean(features, feature_shape)).astype(np.float32)
    del features
    model = LogisticRegression(max_iter=LOGISTIC_MAX_ITERATIONS, warm_start=True, random_state=settings.seed)
    curve, best, worse_in_a_row = [], None, 0
    for strength in strengths:
        with warnings.catch_warnings():  # capped iterations are the design (warm starts, judged on validation), not a fault
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.set_params(C=strength).fit(train_x, labels)
        accuracy = float("nan")
        if validation is not None:
            accuracy = validation.accuracy(lambda rows: model.predict_proba(scaler.transform(spatial_mean(rows, feature_shape))))
        curve.append({"C": strength, "validation_accuracy": accuracy, "iterations": int(model.n_iter_[0])})
        if validation is None or best is None or accuracy > best[0]:
            best, worse_in_a_row = (accuracy, strength, *class_weights(model, classes)), 0
        else:
            worse_in_a_row += 1
            if worse_in_a_row == STRENGTH_PATIENCE:
                break
    accuracy, strength, coefficients, intercepts = best

    inputs = keras.Input((int(np.prod(feature_shape)),), name="features")
    x = inputs
    if len(feature_shape) > 1:
        x = keras.layers.Reshape((-1, feature_shape[-1]))(x)
        x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Normalization(mean=scaler.mean_, variance=scaler.var_)(x)
    dense = keras.layers.Dense(classes, activation="softmax")
    outputs = dense(x)
    dense.set_weights([coefficients.T.astype(np.float32), intercepts.astype(np.float32)])
    head = keras.Model(inputs, outputs, name="logistic_head")
    return FittedHead(head, accuracy, {"head": "logistic", "C": strength, "strengths": curve})


def class_weights(model, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients, intercepts) with a row per class: a class absent from the fitted rows gets a
    probability of zero instead of shifting every later class's column."""
    coefficients = np.zeros((classes, model.coef_.shape[1]), np.float64)
    intercepts = np.full(classes, ABSENT_CLASS_INTERCEPT)
    coefficients[model.classes_], intercepts[model.classes_] = model.coef_, model.intercept_
    return coefficients, intercepts


def build_network_head(kind: str, feature_shape: list[int], classes: int, train_features: np.ndarray, learning_rate: float):
    """A compiled trainable head ("mlp" or "conv") for features of `feature_shape` (stored flattened)."""
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
        normalize = keras.layers.Normalization()
        normalize.adapt(train_features)
        x = normalize(inputs)
        x = keras.layers.Dropout(0.2)(x)
        x = keras.layers.Dense(MLP_UNITS, activation="relu")(x)
        x = keras.layers.Dropout(0.5)(x)
        optimizer = keras.optimizers.Adam(learning_rate)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name=f"{kind}_head")
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit_network(kind: str, fit: Split, validation: Split | None, feature_shape: list[int], classes: int, settings: HeadSettings) -> FittedHead:
    """Train with early stopping on validation accuracy, keeping the best epoch's weights (all epochs without validation)."""
    keras = load_keras()

    keras.utils.set_random_seed(settings.seed)
    features, labels = fit.training_data()
    model = build_network_head(kind, feature_shape, classes, features, settings.learning_rate)
    if validation is None:
        history = model.fit(features, labels, epochs=settings.epochs, batch_size=settings.batch_size, verbose=0).history
        return FittedHead(model, float("nan"), {"head": kind, "epochs_run": len(history["loss"])})
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=settings.patience, restore_best_weights=True)
    history = model.fit(
        features, labels, validation_data=(validation.features, validation.labels),
        epochs=settings.epochs, batch_size=settings.batch_size, callbacks=[stop], verbose=0,
    ).history
    best_epoch = int(np.argmax(history["val_accuracy"]))
    details = {
        "head": kind,
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history["val_accuracy"]),
        "history": {name: [float(value) for value in values] for name, values in history.items()},
    }
    if validation.mirrored is None:
        return FittedHead(model, float(history["val_accuracy"][best_epoch]), details)
    return FittedHead(model, validation.accuracy(lambda rows: model.predict(rows, batch_size=1024, verbose=0)), details)


def fit_head(kind: str, fit: Split, validation: Split, feature_shape: list[int], classes: int, settings: HeadSettings) -> FittedHead:
    if kind == "logistic":
        return fit_logistic(fit, validation, feature_shape, classes, settings)
    return fit_network(kind, fit, validation, feature_shape, classes, settings)


def average_model(members: list[FittedHead], feature_shape: list[int]):
    """One Keras model giving the average of the members' probabilities."""
    keras = load_keras()

    inputs = keras.Input((int(np.prod(feature_shape)),), name="features")
    outputs = keras.layers.Average()([member.model(inputs) for member in members])
    return keras.Model(inputs, outputs, name="ensemble_head")


def ensemble_head(members: list[FittedHead], feature_shape: list[int], validation: Split) -> FittedHead:
    """The average of the members' probabilities: one more candidate, chosen only if validation prefers it."""
    model = average_model(members, feature_shape)
    accuracy = validation.accuracy(lambda rows: model.predict(rows, batch_size=1024, verbose=0))
    return FittedHead(model, accuracy, {"head": "ensemble", "of": [member.details["head"] for member in members]}, list(members))


def refit_head(chosen: FittedHead, train: Split, feature_shape: list[int], classes: int, settings: HeadSettings) -> FittedHead:
    """`chosen` trained again on every train row with what validation chose for it: the strength path up to its C,
    or its best epoch count. Selection needed held-out rows; the final model need not leave them out.
    The validation accuracy stays the one measured before (the refit head has no held-out rows)."""
    if chosen.members:
        members = [refit_head(member, train, feature_shape, classes, settings) for member in chosen.members]
        return FittedHead(average_model(members, feature_shape), chosen.validation_accuracy, {**chosen.details, "refit": True}, members)
    kind = chosen.details["head"]
    if kind == "logistic":
        path = [strength for strength in LOGISTIC_STRENGTHS if strength <= chosen.details["C"]]
        refit = fit_logistic(train, None, feature_shape, classes, settings, strengths=path)
    else:
        refit = fit_network(kind, train, None, feature_shape, classes, settings.model_copy(update={"epochs": chosen.details["best_epoch"]}))
    return FittedHead(refit.model, chosen.validation_accuracy, {**chosen.details, "refit": True})


def split_validation(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train rows, validation rows) of the train split."""
    order = np.random.default_rng(seed).permutation(count)
    held_out = max(1, int(round(count * fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def read_view(storage: Storage, folder: str, split: str, settings: HeadSettings) -> tuple[np.ndarray, Split]:
    """(index, Split) of a complete split, with its mirrored view when the settings ask for flips."""
    index, labels, features = read_split(storage, folder, split)
    if not settings.flip:
        return index, Split(features, labels)
    mirrored_view = f"{split}{FLIPPED}"
    if read_manifest(storage, folder, mirrored_view) is None:
        raise FeatureSetError(
            f"features {posixpath.basename(folder)} have no complete {mirrored_view} view: run extraction with --flip first"
        )
    mirrored_index, _, mirrored = read_split(storage, folder, mirrored_view)
    if not np.array_equal(mirrored_index, index):
        raise FeatureSetError(f"{mirrored_view} of {posixpath.basename(folder)} does not match {split} row for row: run verify --repair")
    return index, Split(features, labels, mirrored)


def predictions_table(split: str, index: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> pa.Table:
    return pa.table({
        "split": pa.array([split] * len(index)),
        "index": index,
        "label": labels,
        "predicted": probabilities.argmax(axis=1),
        "confidence": probabilities.max(axis=1).astype(np.float32),
    })


def train_head(storage_url: str, folder: str, key: str, settings: HeadSettings, classes: list[str],
               lineage: Lineage | None = None) -> HeadResult:
    """Fit every candidate head, choose on validation, predict test once; save model, predictions, metrics, picture."""
    storage = Storage(storage_url)
    done = finished_head(storage, folder, key)
    if done is not None:
        return done
    started = time.perf_counter()
    files = layout.head_files(folder, key)
    storage.write_atomic(files.settings, settings.model_dump_json(indent=2).encode())
    feature_shape = read_manifest(storage, folder, "train").feature_shape
    train_index, train = read_view(storage, folder, "train", settings)
    fit_rows, validation_rows = split_validation(len(train.labels), settings.validation_split, settings.seed)
    fit, validation = train.rows(fit_rows), train.rows(validation_rows)
    del train  # read again for the final predictions: fitting is the memory peak, so keep one copy then
    candidates = []
    for kind in candidate_heads(settings.head, feature_shape):
        fitted = fit_head(kind, fit, validation, feature_shape, len(classes), settings)
        log.info("%s head: validation %.2f%% (%s)", kind, 100 * fitted.validation_accuracy,
                 ", ".join(f"{name} {value}" for name, value in fitted.details.items() if name in ("C", "best_epoch")))
        candidates.append(fitted)
    if len(candidates) > 1:
        candidates.append(ensemble_head(candidates, feature_shape, validation))
        log.info("ensemble head: validation %.2f%%", 100 * candidates[-1].validation_accuracy)
    chosen = max(candidates, key=lambda fitted: fitted.validation_accuracy)
    del fit, validation
    _, train = read_view(storage, folder, "train", settings)
    if settings.refit:
        refit_started = time.perf_counter()
        chosen = refit_head(chosen, train, feature_shape, len(classes), settings)
        log.info("refit the %s head on all %d train rows in %.0f s", chosen.details["head"], len(train.labels), time.perf_counter() - refit_started)

    def predict(rows: np.ndarray) -> np.ndarray:
        return chosen.model.predict(rows, batch_size=1024, verbose=0)

    train_probabilities = train.probabilities(predict)
    labels = train.labels
    del train
    test_index, test = read_view(storage, folder, "test", settings)
    test_probabilities = test.probabilities(predict)
    test_labels = test.labels
    predicted = test_probabilities.argmax(axis=1)
    matrix = confusion_matrix(test_labels, predicted, len(classes))
    metrics = HeadMetrics(
        test_accuracy=float((predicted == test_labels).mean()),
        validation_accuracy=chosen.validation_accuracy,
        chosen=chosen.details,
        candidates=[CandidateScore(validation_accuracy=fitted.validation_accuracy, **fitted.details) for fitted in candidates],
        per_class_accuracy={name: float(value) for name, value in zip(classes, per_class_accuracy(matrix), strict=True)},
        confusion_matrix=matrix.tolist(),
        classes=classes,
        sizes={"train": len(fit_rows), "validation": len(validation_rows), "test": len(test_labels)},
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
    table = pa.concat_tables([
        predictions_table("train", train_index, labels, train_probabilities),
        predictions_table("test", test_index, test_labels, test_probabilities),
    ])
    storage.write_atomic(files.predictions, parquet_bytes(table))
    title = f"{chosen.details['head']} head: test accuracy {metrics.test_accuracy:.2%}"
    storage.write_atomic(files.confusion_picture, save_png(confusion_figure(matrix, classes, title)))
    storage.write_atomic(files.metrics, metrics.model_dump_json(indent=2, exclude_none=True).encode())
    log.info("chose the %s head on validation (%.2f%%): test %.2f%% (%.0f s)", chosen.details["head"],
             100 * chosen.validation_accuracy, 100 * metrics.test_accuracy, metrics.seconds)
    return HeadResult(files=files, metrics=metrics)
