"""Train a small classifier head on stored features; pick the epoch on validation, test once.

Heads:
- "dense": standardize, dropout, Dense(1024, relu), dropout, softmax (pooled vectors);
- "linear": standardize, L2-regularized softmax regression (pooled vectors);
- "conv": the 2017 post's head on spatial maps: Conv2D(100, 2), dropout 0.4,
  global average pooling, dropout 0.3, softmax, trained with RMSprop.
Standardization statistics come from the training part only. The validation
part is a seeded random fraction of the train split; test is touched once,
after training, by the restored best-on-validation weights.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time

import numpy as np
from prefect import task
from pydantic import BaseModel

from tasks.caching import committed_file_key, output_key_fn, remember_output
from tasks.logs import logger
from tasks.plots import confusion_figure, save_png
from tasks.storage import Storage
from tasks.store import read_manifest, read_split

METRICS_NAME = "metrics.json"


class HeadResult(BaseModel):
    folder: str
    model: str
    metrics: str
    confusion_picture: str
    test_accuracy: float
    validation_accuracy: float
    best_epoch: int
    seconds: float


def head_paths(folder: str, key: str) -> dict[str, str]:
    out = posixpath.join(folder, "heads", key)
    return {
        "folder": out,
        "model": posixpath.join(out, "model.keras"),
        "metrics": posixpath.join(out, METRICS_NAME),
        "confusion_picture": posixpath.join(out, "confusion.png"),
    }


def finished_head(storage: Storage, folder: str, key: str) -> HeadResult | None:
    """The head's result if its metrics file (written last) is there."""
    paths = head_paths(folder, key)
    if not storage.exists(paths["metrics"]):
        return None
    metrics = json.loads(storage.read_bytes(paths["metrics"]))
    return HeadResult(
        **paths,
        test_accuracy=metrics["test_accuracy"],
        validation_accuracy=metrics["validation_accuracy"],
        best_epoch=metrics["best_epoch"],
        seconds=metrics["seconds"],
    )


def build_head(kind: str, feature_shape: list[int], classes: int, train_features: np.ndarray, learning_rate: float):
    """A compiled head for features of `feature_shape` (stored flattened)."""
    import keras

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
        if kind == "dense":
            x = keras.layers.Dropout(0.2)(x)
            x = keras.layers.Dense(1024, activation="relu")(x)
            x = keras.layers.Dropout(0.5)(x)
        optimizer = keras.optimizers.Adam(learning_rate)
    regularizer = keras.regularizers.L2(1e-4) if kind == "linear" else None
    outputs = keras.layers.Dense(classes, activation="softmax", kernel_regularizer=regularizer)(x)
    model = keras.Model(inputs, outputs, name=f"{kind}_head")
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def split_validation(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train rows, validation rows) of the train split."""
    order = np.random.default_rng(seed).permutation(count)
    held_out = max(1, int(round(count * fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(truth * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def train_head(storage_url: str, folder: str, key: str, settings: dict, classes: list[str]) -> HeadResult:
    """Fit, select on validation, evaluate on test once, save model + metrics + picture."""
    import keras

    storage = Storage(storage_url)
    done = finished_head(storage, folder, key)
    if done is not None:
        return done
    log = logger()
    started = time.perf_counter()
    feature_shape = read_manifest(storage, folder, "train").feature_shape
    _, labels, features = read_split(storage, folder, "train")
    fit_rows, validation_rows = split_validation(len(labels), settings["validation_split"], settings["seed"])
    keras.utils.set_random_seed(settings["seed"])
    model = build_head(settings["head"], feature_shape, len(classes), features[fit_rows], settings["learning_rate"])
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=settings["patience"], restore_best_weights=True)
    history = model.fit(
        features[fit_rows],
        labels[fit_rows],
        validation_data=(features[validation_rows], labels[validation_rows]),
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        callbacks=[stop],
        verbose=0,
    ).history
    del features
    best_epoch = int(np.argmax(history["val_accuracy"]))
    _, test_labels, test_features = read_split(storage, folder, "test")
    predicted = model.predict(test_features, batch_size=1024, verbose=0).argmax(axis=1)
    matrix = confusion_matrix(test_labels, predicted, len(classes))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    seconds = time.perf_counter() - started
    metrics = {
        "test_accuracy": float((predicted == test_labels).mean()),
        "validation_accuracy": float(history["val_accuracy"][best_epoch]),
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history["val_accuracy"]),
        "per_class_accuracy": {name: float(value) for name, value in zip(classes, per_class, strict=True)},
        "confusion_matrix": matrix.tolist(),
        "classes": classes,
        "sizes": {"train": len(fit_rows), "validation": len(validation_rows), "test": len(test_labels)},
        "history": {name: [float(value) for value in values] for name, values in history.items()},
        "settings": settings,
        "features": folder,
        "seconds": seconds,
    }
    paths = head_paths(folder, key)
    with tempfile.TemporaryDirectory() as scratch:
        local_model = os.path.join(scratch, "model.keras")
        model.save(local_model)
        with open(local_model, "rb") as stream:
            storage.write_atomic(paths["model"], stream.read())
    title = f"{settings['head']} head: test accuracy {metrics['test_accuracy']:.2%}"
    storage.write_atomic(paths["confusion_picture"], save_png(confusion_figure(matrix, classes, title)))
    storage.write_atomic(paths["metrics"], json.dumps(metrics, indent=2).encode())
    log.info(
        "%s head: best epoch %d of %d, validation %.2f%%, test %.2f%% (%.0f s)",
        settings["head"], best_epoch + 1, len(history["val_accuracy"]), 100 * metrics["validation_accuracy"],
        100 * metrics["test_accuracy"], seconds,
    )
    return finished_head(storage, folder, key)


def head_output_key(storage_url: str, folder: str, key: str, **_) -> str | None:
    return committed_file_key(Storage(storage_url), head_paths(folder, key)["metrics"])


@task(name="head", cache_key_fn=output_key_fn(head_output_key))
def train_head_task(storage_url: str, folder: str, key: str, settings: dict, classes: list[str]) -> HeadResult:
    result = train_head(storage_url, folder, key, settings, classes)
    return remember_output(result, head_output_key(storage_url, folder, key))
