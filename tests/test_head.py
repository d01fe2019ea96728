"""Heads read real Parquet feature sets shard by shard and choose on validation (no Prefect)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from cifar_transfer import layout, ridge
from cifar_transfer.commit import commit_feature_set
from cifar_transfer.config import FeatureSpec, HeadSettings
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.head import refit_head, train_head
from cifar_transfer.heads import HEADS, candidate_heads, softmax
from cifar_transfer.heads.base import HeadData, stream_accuracy, stream_moments
from cifar_transfer.heads.ensemble import EnsembleDetails, ensemble_head
from cifar_transfer.shard_files import features_folder, shard_path, shard_table, write_shard
from cifar_transfer.shards import FLIPPED, Shard, ShardRows
from cifar_transfer.storage import Storage
from cifar_transfer.store import iter_split, read_ahead, read_each, read_split
from cifar_transfer.streams import FeatureStream, Moments, run_or_rows, validation_mask

SETTINGS = HeadSettings(
    head="auto", seed=0, learning_rate=1e-3, epochs=30, batch_size=64, patience=5, validation_split=0.2, flip=False, refit=False
)
CLASSES = [f"class{number}" for number in range(10)]


def blobs(count: int, shape: tuple[int, ...], noise: float, seed: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ten noisy class centres in a space of `shape` (flattened rows), with an offset and scale per feature
    (as real activations have); harder with more noise. Classes drawn at random unless `labels` are given."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(42).normal(size=(10, *shape)).astype(np.float32)
    labels = rng.integers(0, 10, count) if labels is None else labels
    features = centres[labels] + noise * rng.normal(size=(count, *shape)).astype(np.float32)
    scale = np.random.default_rng(7).uniform(0.1, 10, size=shape).astype(np.float32)
    return (features * scale + 5).reshape(count, -1), labels


def synthetic_spec(pooling: str = "avg", dataset_md5: str = "0" * 32) -> FeatureSpec:
    """The spec of a feature set written by a test, not by a backbone."""
    return FeatureSpec(
        dataset_md5=dataset_md5,
        backbone="MobileNetV2",
        weights_id="test",
        weights="none",
        seed=0,
        input_size=32,
        pooling=pooling,
        engine="tensorflow",
        precision="float32",
    )


def write_feature_set(root, splits: dict[str, tuple[np.ndarray, np.ndarray]], feature_shape: tuple[int, ...], shard_size: int = 100) -> str:
    """A real feature set (Parquet shards, manifests) holding `splits` (view name -> flattened features, labels)."""
    spec = synthetic_spec("avg" if len(feature_shape) == 1 else "none")
    storage, records = Storage(str(root)), []
    for view, (features, labels) in splits.items():
        for number, start in enumerate(range(0, len(labels), shard_size)):
            stop = min(start + shard_size, len(labels))
            shard = Shard(split=view, number=number, start=start, stop=stop)
            rows = ShardRows(labels=labels[start:stop], ids=np.arange(start, stop))
            table = shard_table(spec, shard, rows, features[start:stop].reshape(stop - start, *feature_shape))
            records.append(write_shard(storage, shard_path(storage, spec, shard), shard, table))
    commit_feature_set(str(root), spec, records, CLASSES)
    return features_folder(storage, spec)


@pytest.fixture
def vector_set(tmp_path):
    folder = write_feature_set(tmp_path, {"train": blobs(1000, (32,), 1.5, 0), "test": blobs(400, (32,), 1.5, 1)}, (32,))
    return Storage(str(tmp_path)), folder


def fit_head(kind: str, data: HeadData, settings: HeadSettings):
    return HEADS[kind].trainer.fit(data, settings)


def test_candidates_follow_the_feature_shape():
    def names(kind: str, shape: list[int]) -> list[str]:
        return [head.name for head in candidate_heads(kind, shape)]

    assert names("auto", [1280]) == ["softmax"]  # ridge's solution is its start and one of its candidates
    assert names("auto", [3, 3, 2048]) == ["conv", "softmax"]
    assert names("mlp", [1280]) == ["mlp"] and names("ridge", [1280]) == ["ridge"]
    assert names("all", [1280]) == ["ridge", "softmax", "logistic", "mlp"]
    assert names("all", [3, 3, 2048]) == ["conv", "ridge", "softmax", "logistic", "mlp"]


def test_streams_read_every_selected_row_once_and_shuffle_reproducibly(vector_set):
    storage, folder = vector_set
    stream = FeatureStream.open(storage, folder, "train", mirrored=False)
    held_out = validation_mask(stream.rows, 0.2, 0)
    index, labels, features = read_split(storage, folder, "train")
    fit = stream.select(~held_out)
    in_order = list(fit.batches())
    assert np.array_equal(np.concatenate([batch.index for batch in in_order]), index[~held_out])
    np.testing.assert_array_equal(np.concatenate([batch.features for batch in in_order]), features[~held_out])
    shuffled = np.concatenate([batch.index for batch in fit.batches(seed=3)])
    assert sorted(shuffled) == sorted(index[~held_out]) and not np.array_equal(shuffled, index[~held_out])
    assert np.array_equal(shuffled, np.concatenate([batch.index for batch in fit.batches(seed=3)]))
    assert max(len(batch.index) for batch in fit.batches(seed=3)) <= 4 * 100  # a window of shards, never the split


@pytest.mark.parametrize("laid_out", [False, True])  # by position; the fit rows first, as the head stage holds them
def test_a_held_split_is_read_once_and_yields_what_streaming_yields(vector_set, laid_out):
    storage, folder = vector_set
    stream = FeatureStream.open(storage, folder, "train", mirrored=False)
    held_out = validation_mask(stream.rows, 0.2, 0)
    assert stream.held(budget=1000 * 32 * 4 - 1).memory is None  # 1,000 rows of 32 float32 features: one byte too many
    order = np.concatenate([np.flatnonzero(~held_out), np.flatnonzero(held_out)]) if laid_out else None
    held = stream.held(budget=1000 * 32 * 4, order=order)
    streamed = {name: list(part.batches()) for name, part in (("train", stream), ("fit", stream.select(~held_out)))}
    streamed["shuffled"] = list(stream.select(held_out).batches(seed=3))
    parts = {"train": held, "fit": held.select(~held_out), "shuffled": held.select(held_out)}
    os.rename(os.path.join(folder, "train"), os.path.join(folder, "moved"))  # nothing is read from storage any more
    for name, part in parts.items():
        batches = list(part.batches(seed=3 if name == "shuffled" else None))
        assert len(batches) == len(streamed[name])
        for mine, theirs in zip(batches, streamed[name], strict=True):
            np.testing.assert_array_equal(mine.index, theirs.index)
            np.testing.assert_array_equal(mine.features, theirs.features)
    assert held.memory is not None
    for part in (parts["fit"], parts["shuffled"]):
        assert part.memory is not None and np.shares_memory(part.memory.features, held.memory.features) == laid_out
    assert [len(block.index) for block in parts["fit"].blocks(100 * 32 * 4)] == [100] * 8  # views of 100 rows
    assert sorted(np.concatenate([block.index for block in held.blocks(300 * 32 * 4)])) == sorted(held.memory.index)


def test_shards_are_read_on_several_threads_at_once_in_order_and_a_failed_read_is_raised():
    together = threading.Barrier(3, timeout=30)  # broken, and raising, unless three reads run at the same time
    read_each(6, lambda shard: together.wait(), bytes_each=1, threads=3)

    def read(shard: int) -> None:
        if shard == 4:
            raise FeatureSetError(f"shard {shard} is damaged")

    with pytest.raises(FeatureSetError, match="shard 4 is damaged"):
        read_each(10, read, bytes_each=1, threads=2)
    assert list(read_ahead(10, lambda shard: shard * shard, bytes_each=1, threads=3)) == [shard * shard for shard in range(10)]
    begun: list[int] = []
    reads = read_ahead(100, begun.append, bytes_each=1, threads=3)
    next(reads), next(reads)
    reads.close()  # a reader that stops early: no read begins after it, at most one a thread was ahead
    assert len(begun) <= 2 + 3


def test_a_split_read_on_several_threads_holds_what_one_thread_reads(vector_set):
    storage, folder = vector_set
    shards = list(iter_split(storage, folder, "train"))  # one shard after another, as they are stored
    features, labels = np.concatenate([shard.features for shard in shards]), np.concatenate([shard.labels for shard in shards])
    rows = np.sort(np.random.default_rng(0).choice(1000, 250, replace=False))
    rows = rows[(rows < 300) | (rows >= 400)]  # one shard with no row wanted
    for threads in (1, 3):
        index, read_labels, read_features = read_split(storage, folder, "train", rows=rows, threads=threads)
        np.testing.assert_array_equal(index, rows)
        np.testing.assert_array_equal(read_labels, labels[rows])
        np.testing.assert_array_equal(read_features, features[rows])
    stream = FeatureStream.open(storage, folder, "train", mirrored=False)
    order = np.random.default_rng(1).permutation(stream.rows)
    one, several = (stream.held(order=order, threads=threads).memory for threads in (1, 3))
    assert one is not None and several is not None
    for column in ("positions", "index", "labels", "features"):
        np.testing.assert_array_equal(getattr(several, column), getattr(one, column))
    np.testing.assert_array_equal(several.features, features[order])


def test_rows_in_one_increasing_run_are_copied_as_a_slice():
    assert run_or_rows(np.arange(5, 9)) == slice(5, 9)
    for rows in (np.array([5, 7, 8]), np.array([8, 7, 6]), np.array([5, 5, 6, 8])):
        assert isinstance(run_or_rows(rows), np.ndarray) and np.array_equal(run_or_rows(rows), rows)
    assert len(run_or_rows(np.zeros(0, np.int64))) == 0


def test_streamed_moments_match_the_whole_array_and_add_up(vector_set):
    storage, folder = vector_set
    _, labels, features = read_split(storage, folder, "train")
    halves = [Moments(10), Moments(10)]
    for start in range(0, 1000, 100):
        halves[start >= 500].add(features[start : start + 100], labels[start : start + 100])
    whole = halves[0] + halves[1]
    np.testing.assert_allclose(whole.mean, features.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(whole.variance, features.var(axis=0), rtol=1e-4)
    np.testing.assert_allclose(whole.covariance(), np.cov(features.T, bias=True), rtol=1e-4, atol=1e-4)
    one_hot = np.eye(10)[labels]
    expected = (features - features.mean(axis=0)).T @ one_hot / len(labels)
    np.testing.assert_allclose(whole.target_covariance(), expected, rtol=1e-4, atol=1e-5)


def test_moments_fed_in_blocks_are_the_moments_of_every_row_whatever_the_batch_sizes(monkeypatch):
    """Batches smaller than a block are gathered in one reused buffer (grown for a larger batch arriving behind
    others), a batch of a block or more on an empty buffer goes in as it is: every row counts once."""
    from cifar_transfer.heads import base

    monkeypatch.setattr(base, "MOMENT_BLOCK_BYTES", 40 * 16 * 4)  # 40 rows of 16 float32 features
    rng = np.random.default_rng(4)
    features, labels = rng.normal(size=(300, 16)).astype(np.float32), rng.integers(0, 5, 300)
    blocked, whole = base.BlockedMoments(Moments(5)), Moments(5)
    sizes = [3, 7, 60, 1, 39, 40, 2, 100, 48]
    assert sum(sizes) == 300
    start = 0
    for size in sizes:
        blocked.add(features[start : start + size], labels[start : start + size])
        start += size
    whole.add(features, labels)
    done = blocked.done()
    assert done.count == 300
    np.testing.assert_allclose(done.mean, whole.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(done.covariance(), whole.covariance(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(done.target_covariance(), whole.target_covariance(), rtol=1e-5, atol=1e-7)


def test_the_gram_matrix_of_the_heads_moments_leaves_the_interpreter_to_the_map_beside_it():
    """The head sums its Gram matrix while the map runs in another thread of the same process, and the map's optimizer
    needs the interpreter between its native steps. A thread counting in Python goes on through the whole product:
    no stall as long as the product (a held GIL leaves one gap that long)."""
    import threading
    import time

    from cifar_transfer.streams import gram

    rows = np.random.default_rng(5).standard_normal((8192, 3072), dtype=np.float32)
    out = np.empty((3072, 3072), np.float32)
    ticks: list[float] = []
    running, done = threading.Event(), threading.Event()

    def count() -> None:
        running.set()
        while not done.is_set():
            ticks.append(time.monotonic())

    counter = threading.Thread(target=count)
    counter.start()
    running.wait()
    started = time.monotonic()
    result = gram(rows, out)
    finished = time.monotonic()
    done.set()
    counter.join()
    during = np.array([started, *[tick for tick in ticks if started < tick < finished], finished])
    assert finished - started > 0.05, "the product was too short to show a stall"
    assert np.diff(during).max() < (finished - started) / 4, "the counting thread stalled for much of the product"
    np.testing.assert_allclose(result, rows.T.astype(np.float64) @ rows, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("rows", [1000, 24])  # more rows than the 32 features (moments), then fewer (the rows' kernel)
def test_ridge_solution_equals_least_squares_on_standardized_features(vector_set, rows):
    storage, folder = vector_set
    _, labels, features = read_split(storage, folder, "train")
    labels, features = labels[:rows], features[:rows]
    first, second = Moments(10), Moments(10)
    first.add(features[: rows // 2], labels[: rows // 2])
    second.add(features[rows // 2 :], labels[rows // 2 :])
    moments = first + second
    assert (moments.centred_rows() is not None) == (rows < features.shape[1]), "the solve took the other path"
    scores = ridge.solve(moments, (0.1, 1.0))
    standardized = (features - features.mean(axis=0)) / ridge.standard_deviation(features.var(axis=0))
    targets = np.eye(10)[labels] - np.eye(10)[labels].mean(axis=0)
    for position, strength in enumerate((0.1, 1.0)):
        weights = np.linalg.solve(standardized.T @ standardized / rows + strength * np.eye(32), standardized.T @ targets / rows)
        expected = standardized @ weights + np.eye(10)[labels].mean(axis=0)
        np.testing.assert_allclose(scores(features)[:, position], expected, atol=2e-4)


def test_ridge_chooses_strength_and_temperature_on_validation_and_its_keras_model_reproduces_them(vector_set):
    storage, folder = vector_set
    data = HeadData.open(storage, folder, SETTINGS, 10)
    head = fit_head("ridge", data, SETTINGS)
    curve = head.details.strengths
    assert [point.strength for point in curve] == list(ridge.RIDGE_STRENGTHS)
    assert head.validation_accuracy == max(point.validation_accuracy for point in curve)
    assert head.details.strength == next(point.strength for point in curve if point.validation_accuracy == head.validation_accuracy)
    assert head.details.temperature > 1  # raw ridge scores are far less confident than the truth
    assert stream_accuracy(data.validation, head.model) == pytest.approx(head.validation_accuracy)
    probabilities = head.model.predict(read_split(storage, folder, "test")[2], verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert stream_accuracy(data.test, head.model) > 0.85


def test_ridge_on_spatial_maps_uses_their_spatial_mean(tmp_path):
    folder = write_feature_set(tmp_path, {"train": blobs(600, (2, 2, 16), 1.0, 0), "test": blobs(200, (2, 2, 16), 1.0, 1)}, (2, 2, 16))
    data = HeadData.open(Storage(str(tmp_path)), folder, SETTINGS, 10)
    head = fit_head("ridge", data, SETTINGS)
    assert head.model.input_shape == (None, 64) and head.validation_accuracy > 0.9


@pytest.mark.slow
def test_network_heads_keep_the_best_epoch_and_repeat_with_the_seed(vector_set, tmp_path):
    storage, folder = vector_set
    data = HeadData.open(storage, folder, SETTINGS, 10)
    first = fit_head("mlp", data, SETTINGS)
    history = first.details.history["val_accuracy"]
    assert first.validation_accuracy == max(history) and history[first.details.best_epoch - 1] == max(history)
    assert stream_accuracy(data.validation, first.model) == pytest.approx(first.validation_accuracy, abs=1e-6)
    again = fit_head("mlp", data, SETTINGS)
    assert again.details.history == first.details.history
    logistic = fit_head("logistic", data, SETTINGS)
    assert logistic.details.epochs_run <= 30 and logistic.validation_accuracy > 0.8
    maps = write_feature_set(tmp_path / "maps", {"train": blobs(300, (2, 2, 8), 1.0, 0), "test": blobs(100, (2, 2, 8), 1.0, 1)}, (2, 2, 8))
    conv = fit_head("conv", HeadData.open(Storage(str(tmp_path / "maps")), maps, SETTINGS, 10), SETTINGS.model_copy(update={"epochs": 3}))
    assert conv.details.epochs_run <= 3 and conv.model.input_shape == (None, 32)


def test_ensemble_averages_its_members_and_every_head_survives_a_save(vector_set, tmp_path):
    import keras

    storage, folder = vector_set
    data = HeadData.open(storage, folder, SETTINGS, 10)
    members = [fit_head(kind, data, SETTINGS.model_copy(update={"epochs": 5})) for kind in ("ridge", "mlp")]
    ensemble = ensemble_head(members, data)
    _, labels, features = read_split(storage, folder, "train")
    validation = validation_mask(len(labels), SETTINGS.validation_split, SETTINGS.seed)
    averaged = sum(member.model.predict(features[validation], verbose=0) for member in members) / 2
    assert ensemble.validation_accuracy == pytest.approx(np.mean(averaged.argmax(axis=1) == labels[validation]))
    assert ensemble.details.model_dump(exclude_none=True) == {"head": "ensemble", "of": ["ridge", "mlp"]}
    for head in (*members, ensemble):
        path = tmp_path / f"{head.details.head}.keras"
        head.model.save(path)
        np.testing.assert_allclose(
            keras.models.load_model(path).predict(features, verbose=0), head.model.predict(features, verbose=0), rtol=1e-5, atol=1e-6
        )


def test_flipped_views_train_as_more_rows_and_are_averaged_at_prediction(tmp_path):
    features, labels = blobs(400, (16,), 1.0, 0)
    mirrored = features + 1.0
    folder = write_feature_set(
        tmp_path,
        {
            "train": (features, labels),
            f"train{FLIPPED}": (mirrored, labels),
            "test": blobs(100, (16,), 1.0, 1),
            f"test{FLIPPED}": blobs(100, (16,), 1.0, 1),
        },
        (16,),
    )
    storage = Storage(str(tmp_path))
    stream = FeatureStream.open(storage, folder, "train", mirrored=True)
    batch = next(stream.batches())
    np.testing.assert_array_equal(batch.mirrored, batch.features + 1.0)
    rows, doubled = batch.training_rows()
    assert len(rows) == 2 * len(batch.index) and list(doubled) == [*batch.labels, *batch.labels]
    np.testing.assert_allclose(batch.probabilities(lambda view: view), batch.features + 0.5)
    settings = SETTINGS.model_copy(update={"flip": True})
    data = HeadData.open(storage, folder, settings, 10)
    head = fit_head("ridge", data, settings)
    assert head.moments[0].count == 2 * data.fit.count  # both views of every fit row
    assert stream_accuracy(data.validation, head.model) == pytest.approx(head.validation_accuracy)
    with pytest.raises(Exception, match="no complete test-flipped view|run extraction with --flip"):
        FeatureStream.open(storage, write_feature_set(tmp_path / "plain", {"train": (features, labels)}, (16,)), "train", mirrored=True)


@pytest.mark.slow
def test_refit_learns_from_the_validation_rows_with_what_validation_chose(tmp_path):
    """Class 9 appears only in the validation rows: the chosen heads never predict it, their refits on all rows do."""
    held_out = validation_mask(1000, SETTINGS.validation_split, SETTINGS.seed)
    labels = np.where(held_out, 9, np.random.default_rng(0).integers(0, 9, 1000))  # class 9: the validation rows only
    labels[np.flatnonzero(held_out)[::2]] = 0
    features, labels = blobs(1000, (32,), 1.0, 0, labels)
    test_features, test_labels = blobs(300, (32,), 1.0, 2)
    folder = write_feature_set(tmp_path, {"train": (features, labels), "test": (test_features, test_labels)}, (32,))
    data = HeadData.open(Storage(str(tmp_path)), folder, SETTINGS, 10)
    candidates = [fit_head(kind, data, SETTINGS.model_copy(update={"epochs": 8})) for kind in ("ridge", "mlp")]
    members = list(candidates)
    chosen = ensemble_head(candidates, data)
    refit = refit_head(chosen, data, SETTINGS)
    assert refit.validation_accuracy == chosen.validation_accuracy and refit.details.refit
    assert [member.details.refit for member in refit.members] == [True, True]
    assert refit.members[0].details.strength == members[0].details.strength
    assert refit.members[1].model.history.params["epochs"] == members[1].details.best_epoch  # not SETTINGS' 30
    nines = test_labels == 9
    assert not np.any(chosen.model.predict(test_features, verbose=0).argmax(axis=1) == 9)
    assert np.mean(refit.model.predict(test_features[nines], verbose=0).argmax(axis=1) == 9) > 0.9
    alone = refit_head(members[0], data, SETTINGS)
    assert np.mean(alone.model.predict(test_features[nines], verbose=0).argmax(axis=1) == 9) > 0.9


def test_ridge_refit_solves_the_moments_of_every_train_row_though_its_fit_left_out_the_validation_gram(vector_set):
    """The fit sums no Gram matrix of the validation rows (a softmax head refits with their mean and variance alone);
    ridge's own refit computes it, and solves exactly what a fit on every train row would."""
    storage, folder = vector_set
    data = HeadData.open(storage, folder, SETTINGS, 10)
    chosen = fit_head("ridge", data, SETTINGS)
    assert chosen.moments is not None
    fit_moments, validation_moments = chosen.moments
    assert fit_moments.sums is not None and fit_moments.sums.gram is not None
    assert validation_moments.sums is not None and validation_moments.sums.gram is None
    weights, bias = refit_head(chosen, data, SETTINGS).model.layers[-1].get_weights()
    every_row = ridge.solve(stream_moments(data.train, 10, data.feature_shape, with_gram=True), (chosen.details.strength,))
    for refit, expected in ((weights, every_row.weights), (bias, every_row.bias)):
        expected = chosen.details.temperature * expected
        np.testing.assert_allclose(refit, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_train_head_refits_the_chosen_head_and_writes_every_output(vector_set):
    storage, folder = vector_set
    result = train_head(storage.url, folder, "k", SETTINGS.model_copy(update={"refit": True}), CLASSES)
    assert not result.files.missing(storage)
    assert result.metrics.chosen.head == "softmax" and result.metrics.chosen.refit
    assert result.metrics.sizes == {"train": 800, "validation": 200, "test": 400}
    assert result.test_accuracy > 0.85


def classes_on_a_line(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes one after another along one direction (and its square), seven noise features: least squares onto
    one-hot classes masks the middle classes (no linear score of theirs is ever highest), a logistic regression
    does not."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    along = labels + 0.25 * rng.normal(size=count)
    features = np.column_stack([along, along**2 / 10, rng.normal(size=(count, 7))]).astype(np.float32)
    return features * np.random.default_rng(7).uniform(0.1, 10, 9).astype(np.float32) + 5, labels


def test_softmax_head_starts_from_ridge_and_beats_it_where_least_squares_masks_classes(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (features, labels), test = classes_on_a_line(2000, 0), classes_on_a_line(1000, 1)
    folder = write_feature_set(tmp_path, {"train": (features, labels), "test": test}, (9,))
    data = HeadData.open(Storage(str(tmp_path)), folder, SETTINGS, 10)
    ridge_alone, head = fit_head("ridge", data, SETTINGS), fit_head("softmax", data, SETTINGS)
    start = HEADS["ridge"].trainer.fit(data, SETTINGS, softmax.START_STRENGTHS)
    assert head.details.start == start.details and head.details.start_accuracy == start.validation_accuracy
    assert [point.C for point in head.details.strengths] == list(softmax.STRENGTHS)
    assert head.validation_accuracy == max(point.validation_accuracy for point in head.details.strengths)
    assert stream_accuracy(data.validation, head.model) == pytest.approx(head.validation_accuracy)
    scaler = StandardScaler().fit(features)
    baseline = LogisticRegression(C=0.01).fit(scaler.transform(features), labels).score(scaler.transform(test[0]), test[1])
    refit = refit_head(head, data, SETTINGS)
    ridge_accuracy, softmax_accuracy = stream_accuracy(data.test, ridge_alone.model), stream_accuracy(data.test, refit.model)
    assert ridge_accuracy < 0.45 < baseline < softmax_accuracy - 0.05, (ridge_accuracy, baseline, softmax_accuracy)


def test_softmax_head_keeps_ridges_solution_when_it_validates_best_and_streams_rows_too_large_to_hold(vector_set, monkeypatch):
    storage, folder = vector_set
    data = HeadData.open(storage, folder, SETTINGS, 10)
    held = softmax.HeldRows.of(data.fit, data.feature_shape)
    monkeypatch.setattr(softmax, "IN_MEMORY_BYTES", 1000)  # the 800 fit rows of 32 features take 102,400 bytes
    streamed = softmax.HeldRows.of(data.fit, data.feature_shape)
    assert streamed.kept is None and held.kept is not None and [len(batch.labels) for batch in held.kept] == [800]
    scale = softmax.Standardization.of(stream_moments(data.fit, 10, data.feature_shape, with_gram=False))
    start = softmax.linear_scores(fit_head("ridge", data, SETTINGS).model)
    value = softmax.objective(held, scale, 0.01, 800)(scale.standardized(start))
    again = softmax.objective(streamed, scale, 0.01, 800)(scale.standardized(start))
    assert again[0] == pytest.approx(value[0])
    np.testing.assert_allclose(again[1], value[1], rtol=1e-4, atol=1e-7)
    head = fit_head("softmax", data, SETTINGS)
    ridge_won = head.details.model_copy(update={"C": None})  # metrics.json leaves out what is None: it must read back
    assert softmax.SoftmaxDetails.model_validate_json(ridge_won.model_dump_json(exclude_none=True)) == ridge_won
    if head.details.C is None:  # ridge's own solution won: it is the head, and refits as ridge does
        assert head.validation_accuracy == head.details.start_accuracy and head.model.name == "ridge_head"
        assert refit_head(head, data, SETTINGS).model.name == "ridge_head"
    else:
        assert head.validation_accuracy > head.details.start_accuracy


def test_softmax_head_is_the_same_on_every_run(vector_set):
    """Its rows held as one array and its Gram matrix by `syrk`: a second fit gives the same weights, curve and choice."""
    storage, folder = vector_set
    data = HeadData.open(storage, folder, SETTINGS, 10)
    first, again = fit_head("softmax", data, SETTINGS), fit_head("softmax", data, SETTINGS)
    assert again.details == first.details and [point.C for point in first.details.strengths] == list(softmax.STRENGTHS)
    for mine, theirs in zip(first.model.get_weights(), again.model.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)


# Head records (metrics.json, settings.json) as earlier commits wrote them: 8ac3e8e, before heads moved into a registry,
# and a98c73e, before ridge replaced the logistic path (its logistic head chose a C).
OLD_HEADS = Path(__file__).parent / "fixtures" / "old-heads"


@pytest.mark.parametrize(
    "name, chosen, candidates",
    [
        (
            "8ac3e8e-all-vectors",
            "ridge (alpha=0.3)",
            ["ridge (alpha=0.3)", "logistic (best epoch 4)", "mlp (best epoch 4)", "ensemble (ridge + logistic + mlp)"],
        ),
        ("8ac3e8e-auto-maps", "ensemble (conv + ridge)", ["conv (best epoch 3)", "ridge (alpha=0.1)", "ensemble (conv + ridge)"]),
        ("8ac3e8e-mlp-vectors", "mlp (best epoch 3)", ["mlp (best epoch 3)"]),
        ("a98c73e-logistic", "logistic (C=0.003)", ["logistic (C=0.003)"]),
    ],
)
def test_heads_written_before_are_read_and_reused_without_training(tmp_path, name, chosen, candidates):
    storage = Storage(str(tmp_path))
    folder = storage.path("features", "set")
    files = layout.head_files(folder, name)
    for record in ("metrics.json", "settings.json"):
        storage.write_atomic(f"{files.folder}/{record}", (OLD_HEADS / name / record).read_bytes())
    for path in (files.model, files.predictions, files.confusion_picture):  # not read to decide reuse: any bytes do
        storage.write_atomic(path, b"as the old run left it")
    written = {path: storage.read_bytes(path) for path in files.paths()}
    settings = HeadSettings.model_validate_json(storage.read_bytes(files.settings))
    result = train_head(storage.url, folder, name, settings, CLASSES)  # no feature set there: training would fail
    assert {path: storage.read_bytes(path) for path in files.paths()} == written
    assert result.metrics.chosen.description() == chosen
    assert [candidate.description() for candidate in result.metrics.candidates] == candidates
    assert result.metrics.settings == settings and result.kind == chosen.split()[0]
    for details in (result.metrics.chosen, *result.metrics.candidates):  # typed by their kind
        assert type(details) is (EnsembleDetails if details.head == "ensemble" else HEADS[details.head].trainer.details)
    assert json.loads(result.metrics.model_dump_json(exclude_none=True)) == json.loads(written[files.metrics])  # nothing lost
