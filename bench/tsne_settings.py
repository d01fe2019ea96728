"""Benchmark: the t-SNE map's time and 10-NN class accuracy by sample size and openTSNE settings, in one run.

    .venv/bin/python bench/tsne_settings.py storage/features/<set> '{}' '{"sample": 10000}' '{"n_iter": 250, "ee_iter": 125}'

Each JSON argument is a variant (keys: sample, n_iter, ee_iter, ints, perplexity, seed, pca_rows: the PCA
fitted on that many of the sampled rows, learning_rate; defaults: the map as it was
made before issue 25: 25,000 points, openTSNE's 500 + 250 iterations, `ints_in_interval=2`). The train split is read
once; each variant samples it as `tsne_map` does, reduces it to 50 principal components, and times the PCA, the
affinities (exact neighbours) and the optimization; the map's 10-NN class accuracy is the report's figure
(`tsne.knn_accuracy`). One row per variant to bench/results/tsne_settings.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402
from cifar_transfer.evaluation import sample_rows  # noqa: E402
from cifar_transfer.storage import Storage  # noqa: E402
from cifar_transfer.store import read_split  # noqa: E402
from cifar_transfer.tsne import PCA_COMPONENTS, knn_accuracy  # noqa: E402


def variant(
    features, labels, sample=25000, n_iter=500, ee_iter=250, ints=2, perplexity=30.0, seed=0, pca_rows=None, learning_rate="auto"
) -> dict:
    from openTSNE import TSNE
    from openTSNE.affinity import PerplexityBasedNN
    from sklearn.decomposition import PCA

    rows = sample_rows(len(labels), sample, seed)
    points, labels = features[rows], labels[rows]
    seconds, started = {}, time.perf_counter()
    fitted_on = points if pca_rows is None else points[np.random.default_rng(seed).permutation(len(points))[: int(pca_rows)]]
    points = PCA(n_components=PCA_COMPONENTS, random_state=seed).fit(fitted_on).transform(points)
    seconds["pca"], started = time.perf_counter() - started, time.perf_counter()
    affinities = PerplexityBasedNN(points, perplexity=perplexity, method="exact", n_jobs=os.cpu_count(), random_state=seed)
    seconds["affinity"], started = time.perf_counter() - started, time.perf_counter()
    embedding = TSNE(
        perplexity=perplexity,
        random_state=seed,
        n_jobs=os.cpu_count(),
        ints_in_interval=ints,
        n_iter=n_iter,
        early_exaggeration_iter=ee_iter,
        learning_rate=learning_rate,
    ).fit(points, affinities=affinities)
    seconds["optimize"] = time.perf_counter() - started
    return {"map_knn_accuracy": knn_accuracy(np.asarray(embedding), labels), "seconds": seconds, "total": sum(seconds.values())}


def main() -> None:
    folder, variants = sys.argv[1], [json.loads(argument) for argument in sys.argv[2:]] or [{}]
    _, labels, features = read_split(Storage(str(Path(folder).parents[1])), folder, "train", pooled=True)
    for options in variants:
        row = {"features": os.path.basename(folder), "variant": options, **variant(features, labels, **options)}
        record("tsne_settings", json.loads(json.dumps(row), parse_float=lambda text: round(float(text), 4)))


if __name__ == "__main__":
    main()
