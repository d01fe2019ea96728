"""The ensemble: the average of the candidates' probabilities, one more candidate when a kind tries several heads."""

from __future__ import annotations

import numpy as np

from cifar_transfer.heads.base import FittedHead, HeadData, HeadDetails, stream_accuracy
from cifar_transfer.native import load_keras


class EnsembleDetails(HeadDetails):
    of: list[str]  # its members' kinds, in the order they were fitted

    def choice(self) -> str:
        return " + ".join(self.of)


def average_model(members: list[FittedHead], feature_shape: list[int]):
    """One Keras model giving the average of the members' probabilities."""
    keras = load_keras()

    inputs = keras.Input((int(np.prod(feature_shape)),), name="features")
    outputs = keras.layers.Average()([member.model(inputs) for member in members])
    return keras.Model(inputs, outputs, name="ensemble_head")


def ensemble_head(members: list[FittedHead], data: HeadData) -> FittedHead:
    """The average of the members' probabilities: one more candidate, chosen only if validation prefers it."""
    model = average_model(members, data.feature_shape)
    details = EnsembleDetails(head="ensemble", of=[member.details.head for member in members])
    return FittedHead(model, stream_accuracy(data.validation, model), details, list(members))
