"""'ridge' (the default): least squares onto one-hot classes from streamed moments (`cifar_transfer.ridge`), its
strength and softmax temperature chosen on validation; its refit is one more solve on the summed moments."""

from __future__ import annotations

from pydantic import BaseModel

from cifar_transfer import ridge
from cifar_transfer.config import HeadSettings
from cifar_transfer.heads.base import BlockedMoments, FittedHead, HeadData, HeadDetails, Trainer, spatial_mean, stream_moments
from cifar_transfer.streams import Moments


class StrengthScore(BaseModel):
    strength: float
    validation_accuracy: float  # at the best temperature for this strength


class RidgeDetails(HeadDetails):
    strength: float  # the chosen alpha
    temperature: float
    strengths: list[StrengthScore]  # the validation curve along the strengths tried (`ridge.RIDGE_STRENGTHS` unless a caller chose)

    def choice(self) -> str:
        return f"alpha={self.strength:g}"


def fit(data: HeadData, settings: HeadSettings, strengths: tuple[float, ...] = ridge.RIDGE_STRENGTHS) -> FittedHead:
    """Ridge along `strengths`: one pass for the fit moments, one solve, one validation pass judging all strengths.
    The validation rows' moments (for a refit's standardization) leave out their Gram matrix: only ridge's own refit
    needs it, and computes it then (summed and added here, it cost every softmax head a second at 4,096 features)."""
    shape = data.feature_shape
    fit_moments = stream_moments(data.fit, data.classes, shape, with_gram=True)
    validation_moments = BlockedMoments(Moments(data.classes, with_gram=False))
    scores = ridge.solve(fit_moments, strengths)
    tally = ridge.ValidationTally.empty(len(strengths))
    for batch in data.validation.batches():
        tally.add([scores(spatial_mean(view, shape)) for view in batch.views], batch.labels)
        features, labels = batch.training_rows()
        validation_moments.add(spatial_mean(features, shape), labels)
    strength, temperature = tally.best()
    accuracies, _ = tally.curve()
    details = RidgeDetails(
        head="ridge",
        strength=strengths[strength],
        temperature=float(ridge.TEMPERATURES[temperature]),
        strengths=[
            StrengthScore(strength=value, validation_accuracy=float(accuracy))
            for value, accuracy in zip(strengths, accuracies, strict=True)
        ],
    )
    model = ridge.ridge_model(scores.strength(strength), ridge.TEMPERATURES[temperature], shape)
    return FittedHead(model, tally.accuracy(strength, temperature), details, moments=(fit_moments, validation_moments.done()))


def refit(chosen: FittedHead, data: HeadData, settings: HeadSettings):
    """The fit and validation moments summed: the moments of every train row, solved at the chosen strength."""
    assert isinstance(chosen.details, RidgeDetails) and chosen.moments is not None, "refit gets what this trainer's fit chose"
    fit_moments, _ = chosen.moments
    validation_moments = stream_moments(data.validation, data.classes, data.feature_shape, with_gram=True)
    scores = ridge.solve(fit_moments + validation_moments, (chosen.details.strength,))
    return ridge.ridge_model(scores, chosen.details.temperature, data.feature_shape)


TRAINER = Trainer(RidgeDetails, fit, refit)
