"""A seeded openTSNE map of the train features, saved as Parquet and a PNG scatter.

The features are reduced to 50 principal components first (the usual practice
for t-SNE on wide features: the neighbour search gets much cheaper and the map
does not change in kind); spatial maps are averaged to one vector per image.
"""

from __future__ import annotations

import os
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel

from tasks.caching import committed_file_key, output_key_fn, remember_output
from tasks.logs import logger
from tasks.plots import save_png, scatter_figure
from tasks.storage import Storage
from tasks.store import read_split

PCA_COMPONENTS = 50


class TsneResult(BaseModel):
    embedding: str
    picture: str
    points: int
    seconds: float


def tsne_paths(folder: str, key: str) -> tuple[str, str]:
    out = posixpath.join(folder, "tsne", key)
    return posixpath.join(out, "embedding.parquet"), posixpath.join(out, "tsne.png")


def finished_tsne(storage: Storage, folder: str, key: str) -> TsneResult | None:
    embedding, picture = tsne_paths(folder, key)
    if not (storage.exists(embedding) and storage.exists(picture)):
        return None
    with storage.fs.open(embedding, "rb") as stream:
        footer = pq.read_metadata(stream)
    seconds = float((footer.metadata or {}).get(b"seconds", b"0"))
    return TsneResult(embedding=embedding, picture=picture, points=footer.num_rows, seconds=seconds)


def sample_rows(count: int, sample: int, seed: int) -> np.ndarray:
    """Sorted row positions of a seeded sample; all rows when the sample covers the split."""
    if sample >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=sample, replace=False))


def embed(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D openTSNE embedding of `features` (rows are points)."""
    from openTSNE import TSNE
    from sklearn.decomposition import PCA

    if features.shape[1] > PCA_COMPONENTS and len(features) > PCA_COMPONENTS:
        features = PCA(n_components=PCA_COMPONENTS, random_state=seed).fit_transform(features)
    perplexity = min(perplexity, max((len(features) - 1) / 3, 1.0))
    embedding = TSNE(perplexity=perplexity, random_state=seed, n_jobs=os.cpu_count() or 1).fit(features)
    return np.asarray(embedding, dtype=np.float32)


def tsne_map(storage_url: str, folder: str, key: str, sample: int, perplexity: float, seed: int, classes: list[str]) -> TsneResult:
    """Embed a seeded sample of the train features, unless this map already exists."""
    storage = Storage(storage_url)
    done = finished_tsne(storage, folder, key)
    if done is not None:
        return done
    started = time.perf_counter()
    index, labels, features = read_split(storage, folder, "train", pooled=True)
    rows = sample_rows(len(index), sample, seed)
    coordinates = embed(features[rows], perplexity, seed)
    seconds = time.perf_counter() - started
    embedding_path, picture_path = tsne_paths(folder, key)
    figure = scatter_figure(coordinates, labels[rows], classes, f"t-SNE of {len(rows)} train images ({posixpath.basename(folder)})")
    storage.write_atomic(picture_path, save_png(figure))
    table = pa.table({"index": index[rows], "label": labels[rows], "x": coordinates[:, 0], "y": coordinates[:, 1]})
    table = table.replace_schema_metadata({b"seconds": f"{seconds:.3f}".encode(), b"perplexity": str(perplexity).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_atomic(embedding_path, sink.getvalue().to_pybytes())
    logger().info("t-SNE of %d points in %.1f s: %s", len(rows), seconds, storage.uri(picture_path))
    return TsneResult(embedding=embedding_path, picture=picture_path, points=len(rows), seconds=seconds)


def tsne_output_key(storage_url: str, folder: str, key: str, **_) -> str | None:
    return committed_file_key(Storage(storage_url), tsne_paths(folder, key)[0])


@task(name="tsne", cache_key_fn=output_key_fn(tsne_output_key))
def tsne_task(storage_url: str, folder: str, key: str, sample: int, perplexity: float, seed: int, classes: list[str]) -> TsneResult:
    result = tsne_map(storage_url, folder, key, sample, perplexity, seed, classes)
    return remember_output(result, tsne_output_key(storage_url, folder, key))
