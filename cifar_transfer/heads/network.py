"""Heads trained by gradient descent from the shards ("logistic", "mlp", "conv"): one shape, their layers apart.

A `Network` is the layers between the stored features and the softmax, and its optimizer. It trains from the
shards with early stopping on validation accuracy, keeping the best epoch's weights; its refit trains again on
every train row for that many epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cifar_transfer.config import HeadSettings
from cifar_transfer.heads.base import PREDICT_BATCH, FittedHead, HeadData, HeadDetails, Trainer, stream_accuracy, stream_moments
from cifar_transfer.native import load_keras, load_tensorflow
from cifar_transfer.streams import FeatureStream, Moments


class NetworkDetails(HeadDetails):
    best_epoch: int | None = None  # absent when trained without validation
    epochs_run: int | None = None
    history: dict[str, list[float]] | None = None  # Keras' per-epoch loss and accuracy, on fit and validation rows

    def choice(self) -> str:
        return f"best epoch {self.best_epoch}"


@dataclass(frozen=True)
class Network:
    """A trainable head `name`: `layers(features, feature_shape, moments)` maps the features (a Keras tensor of the
    stored, flattened features) to what the softmax reads; the Keras optimizer `optimizer` trains it. With
    `standardized`, the layers get the fit rows' moments (vectors, or maps pooled to vectors) to standardize with."""

    name: str
    layers: Callable
    optimizer: str = "Adam"
    standardized: bool = True
    details: type[NetworkDetails] = NetworkDetails

    @property
    def trainer(self) -> Trainer:
        return Trainer(self.details, self.fit, self.refit)

    def build(self, feature_shape: list[int], classes: int, moments: Moments | None, learning_rate: float):
        """The compiled head for features of `feature_shape` (stored flattened)."""
        keras = load_keras()

        inputs = keras.Input((int(np.prod(feature_shape)),), name="features")
        hidden = self.layers(inputs, feature_shape, moments)  # first: layers draw their seeds in the order they are made
        outputs = keras.layers.Dense(classes, activation="softmax")(hidden)
        model = keras.Model(inputs, outputs, name=f"{self.name}_head")
        optimizer = getattr(keras.optimizers, self.optimizer)(learning_rate)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def train(
        self, fit: FeatureStream, validation: FeatureStream | None, feature_shape: list[int], classes: int, settings: HeadSettings
    ) -> FittedHead:
        """Train from the shards with early stopping on validation accuracy, keeping the best epoch's weights
        (all epochs without validation)."""
        keras = load_keras()

        keras.utils.set_random_seed(settings.seed)
        moments = stream_moments(fit, classes, feature_shape, with_gram=False) if self.standardized else None
        model = self.build(feature_shape, classes, moments, settings.learning_rate)
        batches, steps = feature_batches(fit, settings.batch_size, settings.seed)
        if validation is None:  # the batches come shuffled
            history = model.fit(batches, epochs=settings.epochs, steps_per_epoch=steps, shuffle=False, verbose=0).history
            return FittedHead(model, float("nan"), self.details(head=self.name, epochs_run=len(history["loss"])))
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
        details = self.details(
            head=self.name,
            best_epoch=best_epoch + 1,
            epochs_run=len(history["val_accuracy"]),
            history={name: [float(value) for value in values] for name, values in history.items()},
        )
        accuracy = float(history["val_accuracy"][best_epoch]) if not validation.mirrored else stream_accuracy(validation, model)
        return FittedHead(model, accuracy, details)

    def fit(self, data: HeadData, settings: HeadSettings) -> FittedHead:
        return self.train(data.fit, data.validation, data.feature_shape, data.classes, settings)

    def refit(self, chosen: FittedHead, data: HeadData, settings: HeadSettings):
        """Every train row, the validation part included, for the best epoch count validation found."""
        assert isinstance(chosen.details, NetworkDetails), "refit gets what this trainer's fit chose"
        epochs = settings.model_copy(update={"epochs": chosen.details.best_epoch})
        return self.train(data.train, None, data.feature_shape, data.classes, epochs).model


def standardized(features, feature_shape: list[int], moments: Moments):
    """The features (maps averaged over height and width) standardized with the fit rows' moments."""
    keras = load_keras()

    if len(feature_shape) > 1:
        features = keras.layers.Reshape((-1, feature_shape[-1]))(features)
        features = keras.layers.GlobalAveragePooling1D()(features)
    return keras.layers.Normalization(mean=moments.mean, variance=moments.variance)(features)


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
