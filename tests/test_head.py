"""Heads chosen on validation: logistic strength, network epochs, and the winner among kinds (no Prefect)."""

from __future__ import annotations

import numpy as np
import pytest

from cifar_transfer.config import HeadSettings
from cifar_transfer.head import LOGISTIC_STRENGTHS, STRENGTH_PATIENCE, Split, candidate_heads, fit_head, spatial_mean

SETTINGS = HeadSettings(head="auto", seed=0, learning_rate=1e-3, epochs=30, batch_size=64, patience=5, validation_split=0.1,
                        flip=False, refit=False)


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
    assert [point["C"] for point in curve] == list(LOGISTIC_STRENGTHS[: len(curve)])
    accuracies = [point["validation_accuracy"] for point in curve]
    best = accuracies.index(max(accuracies))
    assert len(curve) == len(LOGISTIC_STRENGTHS) or (len(curve) - 1 - best == STRENGTH_PATIENCE and max(accuracies[best + 1 :]) <= accuracies[best])
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
    conv = fit_head("conv", *[blobs(300, (2, 2, 8), 1.0, seed) for seed in (0, 1)], [2, 2, 8], 10, SETTINGS.model_copy(update={"epochs": 3}))
    assert conv.details["epochs_run"] <= 3 and conv.model.input_shape == (None, 32)


def test_ensemble_averages_its_members_and_every_head_survives_a_save(tmp_path):
    import keras

    from cifar_transfer.head import ensemble_head

    fit, validation = blobs(600, (32,), 2.5, 0), blobs(300, (32,), 2.5, 1)
    members = [fit_head(kind, fit, validation, [32], 10, SETTINGS.model_copy(update={"epochs": 5})) for kind in ("logistic", "mlp")]
    ensemble = ensemble_head(members, [32], validation)
    averaged = sum(member.model.predict(validation.features, verbose=0) for member in members) / 2
    assert ensemble.validation_accuracy == pytest.approx(np.mean(averaged.argmax(axis=1) == validation.labels))
    assert ensemble.details == {"head": "ensemble", "of": ["logistic", "mlp"]}
    for head in (*members, ensemble):
        path = tmp_path / f"{head.details['head']}.keras"
        head.model.save(path)
        np.testing.assert_allclose(keras.models.load_model(path).predict(validation.features, verbose=0),
                                   head.model.predict(validation.features, verbose=0), rtol=1e-5, atol=1e-6)


def test_flipped_views_double_the_training_rows_and_are_averaged_at_prediction():
    split = Split(np.ones((4, 3), np.float32), np.arange(4), 3 * np.ones((4, 3), np.float32))
    features, labels = split.training_data()
    assert features.shape == (8, 3) and list(labels) == [0, 1, 2, 3, 0, 1, 2, 3]
    np.testing.assert_allclose(split.probabilities(lambda rows: rows), 2 * np.ones((4, 3)))
    assert split.rows(np.array([1, 3])).mirrored.shape == (2, 3)


def test_refit_learns_from_the_validation_rows_with_what_validation_chose():
    """Class 9 appears only in the validation rows: the chosen heads never predict it, their refits on all rows do."""
    from cifar_transfer.head import ensemble_head, refit_head

    train = blobs(900, (32,), 1.0, 0)
    only_in_validation = train.labels == 9
    fit, validation = train.rows(np.flatnonzero(~only_in_validation)), train.rows(np.flatnonzero(only_in_validation | (np.arange(900) % 5 == 0)))
    test = blobs(300, (32,), 1.0, 2)
    candidates = [fit_head(kind, fit, validation, [32], 10, SETTINGS.model_copy(update={"epochs": 8})) for kind in ("logistic", "mlp")]
    members = list(candidates)
    candidates.append(ensemble_head(candidates, [32], validation))  # as train_head does: the ensemble joins its members' list
    chosen = candidates[-1]
    assert chosen.members == members
    refit = refit_head(chosen, train, [32], 10, SETTINGS)
    assert refit.validation_accuracy == chosen.validation_accuracy and refit.details["refit"]
    assert [member.details["refit"] for member in refit.members] == [True, True]
    assert refit.members[0].details["C"] == members[0].details["C"]
    assert refit.members[1].model.history.params["epochs"] == members[1].details["best_epoch"]  # not SETTINGS' 30
    nines = test.labels == 9
    assert not np.any(chosen.model.predict(test.features, verbose=0).argmax(axis=1) == 9)
    assert np.mean(refit.model.predict(test.features[nines], verbose=0).argmax(axis=1) == 9) > 0.9
