"""The ridge head: least squares onto one-hot classes, solved in closed form from streamed moments.

Why it is the default head: on frozen features it is as accurate as a tuned
logistic regression (measured on MobileNetV2 features of CIFAR-10: within half
a point either way), yet it needs one pass over the fit rows (their `Moments`),
one Cholesky solve per strength, and one pass over the
validation rows to judge all strengths together. Its memory is the Gram matrix
(width², never the rows), and a refit on every train row is the sum of the fit
and validation moments and one more solve, so refitting is free.

Features are standardized with the fit rows' statistics; the strength `alpha`
multiplies the identity added to their correlation matrix. Scores become
probabilities through a softmax whose temperature is chosen on validation (by
log-loss), so the saved head is an ordinary Keras softmax model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cifar_transfer.native import load_keras
from cifar_transfer.streams import Moments

RIDGE_STRENGTHS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)  # weak to strong regularization
TEMPERATURES = tuple(np.geomspace(1.0, 100.0, 21))  # softmax inverse temperatures tried on validation
PROBE_FOLDS = 4  # of `probe_answers`
RELATIVE_DEVIATION_FLOOR = 1e-6  # of the largest: constant features stay out of the solution instead of dividing by zero


@dataclass(frozen=True)
class LinearScores:
    """scores = features @ weights + bias, for one or several strengths side by side (columns grouped by strength)."""

    weights: np.ndarray  # (width, classes * strengths), float32
    bias: np.ndarray  # (classes * strengths,)
    classes: int

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(rows, strengths, classes)."""
        return (features @ self.weights + self.bias).reshape(len(features), -1, self.classes)

    def strength(self, position: int) -> LinearScores:
        """The solution of the strength at `position` alone."""
        columns = slice(position * self.classes, (position + 1) * self.classes)
        return LinearScores(self.weights[:, columns], self.bias[columns], self.classes)


def standard_deviation(variance: np.ndarray) -> np.ndarray:
    """What features are divided by to standardize them, floored relative to the largest (features of randomly
    initialised networks can be 1e-13 small, and must still be standardized, not zeroed)."""
    deviation = np.sqrt(variance)
    largest = float(deviation.max(initial=0.0))
    return np.maximum(deviation, RELATIVE_DEVIATION_FLOOR * largest if largest > 0 else 1.0)


def solve(moments: Moments, strengths: tuple[float, ...]) -> LinearScores:
    """Ridge solutions of every strength in `strengths`, folded back to raw features: from the rows themselves while
    there are fewer of them than features (`_solve_from_rows`), else a Cholesky solve of the moments per strength.

    A Cholesky factorization runs in matrix-matrix kernels; an eigendecomposition's tridiagonal reduction runs at
    memory speed. Eleven solves took 0.62 of one eigendecomposition's time at 2,816 features on 2 cores."""
    deviation = standard_deviation(moments.variance)
    rows = moments.centred_rows()
    if rows is not None:
        weights = _solve_from_rows(rows, deviation, moments.classes, strengths)
    else:
        weights = _solve_from_moments(moments, deviation, strengths)
    bias = np.tile(moments.class_frequencies, len(strengths)) - moments.mean @ weights
    return LinearScores(weights.astype(np.float32), bias.astype(np.float32), moments.classes)


def _solve_from_moments(moments: Moments, deviation: np.ndarray, strengths: tuple[float, ...]) -> np.ndarray:
    from scipy.linalg import cho_factor, cho_solve

    # One width² matrix for the temporaries and every strength's factor: fresh memory at each step (LAPACK copies
    # a row-major matrix it is handed) took longer than the factorizations at 4,096 features.
    regularized = np.empty((len(deviation), len(deviation)))
    correlation = moments.covariance(scratch=regularized)
    np.multiply(deviation[:, None], deviation[None, :], out=regularized)
    correlation /= regularized
    targets = moments.target_covariance() / deviation[:, None]
    diagonal = np.diag_indices_from(correlation)
    blocks = []
    for strength in strengths:
        np.copyto(regularized, correlation)
        regularized[diagonal] += strength
        # Factored in place as its column-major transpose, whose lower triangle is this upper one.
        factor = cho_factor(regularized.T, lower=True, overwrite_a=True, check_finite=False)
        blocks.append(cho_solve(factor, targets, check_finite=False) / deviation[:, None])
    return np.concatenate(blocks, axis=1)


def _solve_from_rows(rows: tuple[np.ndarray, np.ndarray], deviation: np.ndarray, classes: int, strengths: tuple[float, ...]) -> np.ndarray:
    """`solve`'s weights from the centred rows themselves, when there are fewer of them (n) than features (d).

    With Z the standardized rows and Y their one-hot labels, each strength's (Z^T Z / n + alpha I)^-1 Z^T Y / n is
    Z^T (Z Z^T + n alpha I)^-1 Y: one eigendecomposition of the n x n kernel Z Z^T serves every strength, n²d work
    in all instead of a d³ factorization per strength (at 240 rows of 2,816 features, 11 strengths: 0.05 s, not 4 s)."""
    centred, labels = rows
    standardized = (centred / deviation.astype(np.float32)).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(standardized @ standardized.T)
    projected = eigenvectors.T @ np.eye(classes)[labels]  # U^T Y
    blocks = [eigenvectors @ (projected / (eigenvalues + len(labels) * strength)[:, None]) for strength in strengths]
    return (standardized.T @ np.concatenate(blocks, axis=1)) / deviation[:, None]


def probe_answers(features: np.ndarray, labels: np.ndarray, folds: int = PROBE_FOLDS) -> np.ndarray:
    """Which of a few hundred labelled rows a ridge head gets right: each of `folds` seeded random folds predicted by a
    head fitted on the others, at the strength of `RIDGE_STRENGTHS` most accurate over all folds. The engine's
    precision check compares these answers between float32's features and a reduced precision's of the same
    images. Solved from the rows (n²d work, no width² Gram matrix: at 512 rows of 4,096 features 0.6 s, not the
    4 s of streamed `Moments`)."""
    folds = min(folds, len(labels))
    if folds < 2:
        return np.zeros(len(labels), bool)
    classes = int(labels.max()) + 1
    right = np.zeros((len(labels), len(RIDGE_STRENGTHS)), bool)
    fold_of = np.random.default_rng(0).permutation(len(labels)) % folds  # seeded: the same folds for every precision
    for fold in range(folds):
        held = fold_of == fold
        fit, fit_labels = features[~held].astype(np.float64), labels[~held]
        mean = fit.mean(axis=0)
        weights = _solve_from_rows(
            ((fit - mean).astype(np.float32), fit_labels), standard_deviation(fit.var(axis=0)), classes, RIDGE_STRENGTHS
        )
        frequencies = np.bincount(fit_labels, minlength=classes) / len(fit_labels)
        scores = LinearScores(weights, np.tile(frequencies, len(RIDGE_STRENGTHS)) - mean @ weights, classes)  # as `solve` folds
        right[held] = scores(features[held]).argmax(axis=-1) == labels[held, None]
    return right[:, int(right.sum(axis=0).argmax())]


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass
class ValidationTally:
    """Per (strength, temperature): rows right and summed log-loss, over streamed validation batches."""

    correct: np.ndarray
    log_loss: np.ndarray
    rows: int = 0

    @classmethod
    def empty(cls, strengths: int) -> ValidationTally:
        return cls(np.zeros((strengths, len(TEMPERATURES))), np.zeros((strengths, len(TEMPERATURES))))

    def add(self, views: list[np.ndarray], labels: np.ndarray) -> None:
        """`views`: each view's scores (rows, strengths, classes); probabilities are averaged over views."""
        for position, temperature in enumerate(TEMPERATURES):
            probabilities = np.mean([softmax(temperature * scores) for scores in views], axis=0)
            truth = probabilities[np.arange(len(labels)), :, labels]  # (rows, strengths)
            self.correct[:, position] += (probabilities.argmax(axis=-1) == labels[:, None]).sum(axis=0)
            self.log_loss[:, position] -= np.log(np.maximum(truth, 1e-12)).sum(axis=0)
        self.rows += len(labels)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy, temperature position) of each strength, at its lowest log-loss temperature."""
        temperatures = self.log_loss.argmin(axis=1)
        return self.correct[np.arange(len(temperatures)), temperatures] / self.rows, temperatures

    def best(self) -> tuple[int, int]:
        """(strength position, temperature position): the most accurate strength, at its lowest log-loss temperature."""
        accuracy, temperatures = self.curve()
        strength = int(np.argmax(accuracy))  # the first (weakest) of equals
        return strength, int(temperatures[strength])

    def accuracy(self, strength: int, temperature: int) -> float:
        return float(self.correct[strength, temperature] / self.rows)


def ridge_model(scores: LinearScores, temperature: float, feature_shape: list[int], name: str = "ridge_head"):
    """The Keras head of a linear solution: (spatial mean,) dense scores scaled by the temperature, softmax."""
    keras = load_keras()

    inputs = keras.Input((int(np.prod(feature_shape)),), name="features")
    x = inputs
    if len(feature_shape) > 1:
        x = keras.layers.Reshape((-1, feature_shape[-1]))(x)
        x = keras.layers.GlobalAveragePooling1D()(x)
    dense = keras.layers.Dense(scores.classes, activation="softmax")
    outputs = dense(x)
    dense.set_weights([temperature * scores.weights, temperature * scores.bias])
    return keras.Model(inputs, outputs, name=name)
