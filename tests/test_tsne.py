"""The t-SNE map's quality measure, on points whose answer is known (no Prefect)."""

from __future__ import annotations

import numpy as np

from cifar_transfer.tsne import embed, knn_accuracy


def test_knn_accuracy_is_one_for_separated_classes_and_chance_for_shuffled_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    points = np.eye(10)[labels] * 50 + rng.normal(size=(1000, 10))
    assert knn_accuracy(points, labels) == 1.0
    assert abs(knn_accuracy(points, rng.permutation(labels)) - 0.1) < 0.05


def test_embedding_keeps_clusters_and_places_new_points_near_their_own():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 80)) * 10
    labels, new_labels = np.repeat(np.arange(5), 60), np.repeat(np.arange(5), 4)
    points, reduced, feature_knn_accuracy, placed = embed(
        centres[labels] + rng.normal(size=(300, 80)), labels, 30, 0, centres[new_labels] + rng.normal(size=(20, 80))
    )
    assert points.shape == (300, 2) and reduced.shape == (300, 50) and placed.shape == (20, 2)
    assert knn_accuracy(points, labels) > 0.95
    assert feature_knn_accuracy == knn_accuracy(reduced, labels) > 0.95  # read off the map's own neighbour search
    nearest = np.linalg.norm(placed[:, None] - points[None], axis=2).argmin(axis=1)
    assert np.mean(labels[nearest] == new_labels) > 0.9


def test_components_fitted_on_a_seeded_part_of_a_large_sample_project_like_scikit_learn(monkeypatch):
    from sklearn.decomposition import PCA

    from cifar_transfer import tsne
    from cifar_transfer.evaluation import sample_rows

    monkeypatch.setattr(tsne, "PCA_BASIS_ROWS", 400)
    rows = np.random.default_rng(2).normal(size=(1000, 64)).astype(np.float32) + 3.0
    part = sample_rows(len(rows), tsne.PCA_BASIS_ROWS, seed=0)
    assert len(part) == 400 and np.array_equal(part, sample_rows(len(rows), tsne.PCA_BASIS_ROWS, seed=0))
    assert np.array_equal(sample_rows(400, tsne.PCA_BASIS_ROWS, seed=0), np.arange(400))  # a sample no larger is fitted whole
    pca = PCA(n_components=tsne.PCA_COMPONENTS, random_state=0).fit(rows[part])
    projected = tsne.Projection.of(pca)(rows)
    assert projected.dtype == np.float32
    np.testing.assert_allclose(projected, pca.transform(rows), rtol=1e-4, atol=1e-4)


def test_a_map_optimized_in_parts_on_its_share_of_the_cores_is_the_map_one_call_makes():
    from openTSNE import TSNE
    from openTSNE.affinity import MultiscaleMixture, get_knn_index

    from cifar_transfer import tsne
    from cifar_transfer.hardware import share_of_cores, sharing_cores, usable_cores

    rng = np.random.default_rng(3)
    points = (np.eye(4)[np.repeat(np.arange(4), 300)] @ rng.normal(size=(4, 20)) * 5 + rng.normal(size=(1200, 20))).astype(np.float32)
    calls: dict[str, list[int]] = {"one call": [], "in parts": []}

    def made(way: str, optimize) -> np.ndarray:
        search = tsne.shared_search(get_knn_index(points, "exact", k=90, metric="euclidean", n_jobs=1, random_state=0))
        affinities = MultiscaleMixture(perplexities=[30], knn_index=search, n_jobs=1, random_state=0)
        settings = {"perplexity": 30, "random_state": 0, "ints_in_interval": 2, "early_exaggeration_iter": 120, "n_iter": 120}
        # Called every 40 iterations of one `optimize` call: a call of 50 iterations calls it once, one of 120 three times.
        counted = TSNE(**settings, callbacks=lambda iteration, error, embedding: calls[way].append(iteration), callbacks_every_iters=40)
        return np.asarray(optimize(counted, affinities))

    one_call = made("one call", lambda made_by, affinities: made_by.set_params(n_jobs=usable_cores()).fit(points, affinities=affinities))
    in_parts = made("in parts", lambda made_by, affinities: tsne.optimized(made_by, points, affinities))
    np.testing.assert_array_equal(in_parts, one_call)
    assert calls == {"one call": [40, 80, 120] * 2, "in parts": [40, 80, 120, 40, 40]}  # exaggerated in one part, then 50, 50, 20
    with sharing_cores(), sharing_cores():  # the map and the head side by side
        assert share_of_cores() == max(1, usable_cores() // 2)
    assert share_of_cores() == usable_cores()
