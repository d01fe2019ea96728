"""Heads chosen on validation: logistic strength, network epochs, and the winner among kinds (no Prefect)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.head import LOGISTIC_STRENGTHS, Split, candidate_heads, fit_head, spatial_mean

SETTINGS = {"seed": 0, "learning_rate": 1e-3, "epochs": 30, "batch_size": 64, "patience": 5}


def blobs(count: int, shape: tuple[int, ...], noise: float, seed: int) -> Split:
    """Ten noisy class centres in a space of `shape`; harder with more noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(42).normal(size=(10, *shape)).astype(np.float32)
    labels = rng.integers(0, 10, count)
    features = centres[labels] + noise * rng.normal(size=(count, *shape)).astype(np.float32)
    return Split(features.reshape(count, -1), labels)


def test_candidates_follow_the_feature_shape():
    assert candidate_heads("auto", [1280]) == ["logistic", "mlp"]
    assert candidate_heads("auto", [3, 3, 2048]) == ["conv", "logistic"]
    assert candidate_heads("mlp", [1280]) == ["mlp"]


def test_logistic_strength_is_chosen_on_validation_and_the_keras_model_reproduces_it():
    fit, validation, test = blobs(600, (32,), 1.5, 0), blobs(300, (32,), 1.5, 1), blobs(300, (32,), 1.5, 2)
    head = fit_head("logistic", fit, validation, [32], 10, SETTINGS)
    curve = head.details["strengths"]
    assert [point["C"] for point in curve] == list(LOGISTIC_STRENGTHS)
    assert head.validation_accuracy == max(point["validation_accuracy"] for point in curve)
    assert head.details["C"] == next(point["C"] for point in curve if point["validation_accuracy"] == head.validation_accuracy)
    probabilities = head.model.predict(validation.features, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(probabilities.argmax(axis=1) == validation.labels) == pytest.approx(head.validation_accuracy, abs=1e-9)
    assert np.mean(head.model.predict(test.features, verbose=0).argmax(axis=1) == test.labels) > 0.8


def test_logistic_on_spatial_maps_uses_their_spatial_mean():
    fit, validation = blobs(400, (2, 2, 16), 1.0, 0), blobs(200, (2, 2, 16), 1.0, 1)
    head = fit_head("logistic", fit, validation, [2, 2, 16], 10, SETTINGS)
    assert head.model.input_shape == (None, 64)
    pooled = spatial_mean(validation.features, [2, 2, 16])
    assert pooled.shape == (200, 16)
    np.testing.assert_allclose(pooled[0], validation.features[0].reshape(4, 16).mean(axis=0), rtol=1e-6)
    assert head.validation_accuracy > 0.9


def test_network_heads_keep_the_best_epoch_and_repeat_with_the_seed():
    fit, validation = blobs(600, (32,), 2.5, 0), blobs(300, (32,), 2.5, 1)
    first = fit_head("mlp", fit, validation, [32], 10, SETTINGS)
    history = first.details["history"]["val_accuracy"]
    assert first.validation_accuracy == max(history) and history[first.details["best_epoch"] - 1] == max(history)
    assert np.mean(first.model.predict(validation.features, verbose=0).argmax(axis=1) == validation.labels) == pytest.approx(
        first.validation_accuracy, abs=1e-6)
    again = fit_head("mlp", fit, validation, [32], 10, SETTINGS)
    assert again.details["history"] == first.details["history"]
    conv = fit_head("conv", *[blobs(300, (2, 2, 8), 1.0, seed) for seed in (0, 1)], [2, 2, 8], 10, {**SETTINGS, "epochs": 3})
    assert conv.details["epochs_run"] <= 3 and conv.model.input_shape == (None, 32)
