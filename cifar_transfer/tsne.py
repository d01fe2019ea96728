"""A seeded openTSNE map of the train features, saved as Parquet and a PNG scatter.

The features are reduced to 50 principal components first (the usual practice
for t-SNE on wide features: the neighbour search gets much cheaper and the map
does not change in kind); spatial maps are averaged to one vector per image.
The components are fitted on a seeded 5,000 of the sample's rows: at 25,000
points of 4,096 features that took 1.1 s instead of 3-8 s, and the map's 10-NN
accuracy moved by -0.17 (InceptionV3) and +0.15 points (MobileNetV2).
Up to `EXACT_NEIGHBOURS_UP_TO` points the neighbours are exact (scikit-learn,
3x faster here than openTSNE's default Annoy index on 50 dimensions, and
exact); beyond, openTSNE's approximate search. The FFT-accelerated gradient
uses a grid twice as coarse as openTSNE's default (`ints_in_interval=2`):
half the time at 25,000 points with the same 10-NN accuracy in the map. It
runs half openTSNE's default iterations (125 exaggerated, then 250): at 25,000
points of MobileNetV2 features the optimization took 0.40 of the time and the
map's 10-NN accuracy moved from 48.95% to 49.68% (a smaller sample instead,
10,000 points, lost 1.85 points).
The map's quality is reported as the 10-nearest-neighbour class accuracy in 2-D
next to the same figure in the 50-d PCA space it was made from, read off the
neighbour search the map's affinities used (no second search). When asked,
test images are placed into the finished map with openTSNE's `transform`.
"""

from __future__ import annotations

import logging
import posixpath
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.config import TsneSettings
from cifar_transfer.evaluation import sample_rows
from cifar_transfer.feature_records import Lineage, split_manifest
from cifar_transfer.hardware import share_of_cores, sharing_cores
from cifar_transfer.neighbours import Projection, fitted_pca, point_neighbours
from cifar_transfer.pause import pause_at
from cifar_transfer.plots import save_png, scatter_figure
from cifar_transfer.shard_files import parquet_bytes
from cifar_transfer.storage import Storage
from cifar_transfer.store import read_split

log = logging.getLogger(__name__)

# The explorer's neighbours of each point (positions in the table, -1 where there are fewer) and their cosine
# similarities, kept in the map's table; maps made before have neither.
NEIGHBOURS_COLUMN, SIMILARITIES_COLUMN = "neighbours", "neighbour_similarity"
PCA_COMPONENTS = 50
PCA_BASIS_ROWS = 5_000  # rows of the sample the components are fitted on
NEIGHBOURS = 10
EXACT_NEIGHBOURS_UP_TO = 100_000  # brute force is quadratic: beyond this, approximate neighbours
GRID_INTERVALS_PER_CELL = 2  # openTSNE's ints_in_interval (default 1): a coarser interpolation grid
EXAGGERATED_ITERATIONS = 125  # openTSNE's early_exaggeration_iter (default 250)
ITERATIONS = 250  # openTSNE's n_iter after them (default 500)
ITERATIONS_BETWEEN_SHARES = 50  # the optimization's threads are its share of the cores, asked again this often


class TsneResult(BaseModel):
    embedding: str
    picture: str
    points: int  # train points in the map
    test_points: int  # test points placed into it (0 unless asked)
    seconds: float
    map_knn_accuracy: float  # 10-NN class accuracy of the train points in 2-D
    feature_knn_accuracy: float  # the same in the PCA space the map was made from
    made_by: Lineage | None  # the flow run that made it (None: not made by a flow run)


def fixed_rows(values: np.ndarray) -> pa.FixedSizeListArray:
    """A 2-D array as one fixed-size list per row."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).ravel()), values.shape[1])


def finished_tsne(storage: Storage, folder: str, key: str) -> TsneResult | None:
    """The map's result if every file of it is there and readable, else None (so it is made again)."""
    files = layout.tsne_files(folder, key)
    if files.missing(storage):
        return None
    try:
        with storage.fs.open(files.embedding, "rb") as stream:
            footer = pq.read_metadata(stream)
        return records.TSNE_RESULT.load(TsneResult, footer.metadata[b"tsne"], storage.uri(files.embedding), storage.root)
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as exc:
        log.warning("t-SNE map %s is unreadable (%s): making it again", storage.uri(files.embedding), exc)
        return None


def vote_accuracy(nearest: np.ndarray, labels: np.ndarray) -> float:
    """Share of points whose neighbours (rows of `nearest`, the point itself excluded) vote for their own class."""
    votes = labels[nearest]
    counts = np.apply_along_axis(np.bincount, 1, votes, minlength=int(labels.max()) + 1)
    return float(np.mean(counts.argmax(axis=1) == labels))


def knn_accuracy(points: np.ndarray, labels: np.ndarray, neighbours: int = NEIGHBOURS) -> float:
    """Share of points whose `neighbours` nearest other points vote for their own class."""
    from sklearn.neighbors import NearestNeighbors

    neighbours = min(neighbours, len(points) - 1)
    if neighbours < 1:
        return float("nan")
    return vote_accuracy(NearestNeighbors(n_neighbors=neighbours).fit(points).kneighbors(return_distance=False), labels)


class Embedding(NamedTuple):
    coordinates: np.ndarray  # the map, one 2-D row per point
    reduced: np.ndarray  # the PCA input the map was made from
    feature_knn_accuracy: float  # 10-NN class accuracy in `reduced`, from the map's own neighbour search
    placed: np.ndarray | None  # new points placed into the map


def shared_search(search):
    """Wrap an openTSNE neighbour index so what its build found stays readable: the map's affinities and
    the feature-space quality figure then share one search (it was a second, 10 s search at 50,000 points);
    `transform` queries the wrapped index as usual."""
    from openTSNE.nearest_neighbors import KNNIndex

    class SharedSearch(KNNIndex):
        def __init__(self):  # the wrapped index holds the data and settings
            self.n_samples, self.k, self.found = search.n_samples, search.k, None

        def build(self):
            self.found = search.build()
            return self.found

        def query(self, query, k):
            return search.query(query, k)

    return SharedSearch()


def embed(features: np.ndarray, labels: np.ndarray, perplexity: float, seed: int, new_points: np.ndarray | None = None) -> Embedding:
    """2-D openTSNE embedding of `features` (rows are points) and `new_points` placed into it."""
    from openTSNE import TSNE
    from openTSNE.affinity import MultiscaleMixture, get_knn_index

    project = None
    if features.shape[1] > PCA_COMPONENTS and len(features) > PCA_COMPONENTS:
        basis = features[sample_rows(len(features), PCA_BASIS_ROWS, seed)]
        project = Projection.of(fitted_pca(basis, seed, n_components=PCA_COMPONENTS))
        features = project(features)
    perplexity = min(perplexity, max((len(features) - 1) / 3, 1.0))
    method = "exact" if len(features) <= EXACT_NEIGHBOURS_UP_TO else "auto"
    k = min(len(features) - 1, int(3 * perplexity))
    search = shared_search(get_knn_index(features, method, k=k, metric="euclidean", n_jobs=share_of_cores(), random_state=seed))
    affinities = MultiscaleMixture(perplexities=[perplexity], knn_index=search, n_jobs=share_of_cores(), random_state=seed)
    embedding = optimized(
        TSNE(
            perplexity=perplexity,
            random_state=seed,
            ints_in_interval=GRID_INTERVALS_PER_CELL,
            early_exaggeration_iter=EXAGGERATED_ITERATIONS,
            n_iter=ITERATIONS,
        ),
        features,
        affinities,
    )
    neighbours = search.found[0][:, : min(NEIGHBOURS, len(features) - 1)]
    placed = None
    if new_points is not None:
        placed = np.asarray(embedding.transform(project(new_points) if project else new_points), dtype=np.float32)
    return Embedding(np.asarray(embedding, dtype=np.float32), features, vote_accuracy(neighbours, labels), placed)


def optimized(tsne, features: np.ndarray, affinities):
    """`tsne.fit(features, affinities=affinities)`, its phases run as openTSNE runs them, each part on the share of
    the cores this stage has when it begins (`hardware.share_of_cores`). openTSNE's threads are OpenMP's: started
    beside the head's on 2 cores (three threads on two cores) they made the map and the head together 23.3-24.6 s
    long, against 22.0-23.3 s with the map on one thread; asked again every `ITERATIONS_BETWEEN_SHARES` iterations
    after the exaggerated ones, the map takes the whole machine back when the head ends. The optimizer keeps its gains
    and momentum from one part to the next, so the parts make the map one call makes, bit for bit, at the same
    thread counts."""
    embedding = tsne.prepare_initial(features, affinities)
    phases = [
        (tsne.early_exaggeration_iter, tsne.early_exaggeration, tsne.initial_momentum),
        (tsne.n_iter, tsne.exaggeration, tsne.final_momentum),
    ]
    for iterations, exaggeration, momentum in phases:
        # An exaggerated phase in one part: openTSNE multiplies the affinities by the exaggeration for a call and
        # divides them back after it, which is not exact in floating point.
        part = ITERATIONS_BETWEEN_SHARES if exaggeration in (None, 1) else iterations
        for done in range(0, iterations, part):
            embedding.optimize(
                n_iter=min(part, iterations - done),
                exaggeration=exaggeration,
                momentum=momentum,
                n_jobs=share_of_cores(),
                inplace=True,
                propagate_exception=True,
            )
    return embedding


def tsne_map(
    storage_url: str, folder: str, key: str, settings: TsneSettings, classes: list[str], lineage: Lineage | None = None
) -> TsneResult:
    """Embed a seeded sample of the train features (and place the test images), unless this map already exists."""
    storage = Storage(storage_url)
    done = finished_tsne(storage, folder, key)
    if done is not None:
        return done
    with sharing_cores():
        return _new_map(storage, folder, key, settings, classes, lineage)


def _new_map(storage: Storage, folder: str, key: str, settings: TsneSettings, classes: list[str], lineage: Lineage | None) -> TsneResult:
    started = time.perf_counter()
    files = layout.tsne_files(folder, key)
    storage.write_atomic(files.settings, records.TSNE_SETTINGS.dump(settings))
    pause_at("tsne")  # a test hook, inert unless CIFAR_TRANSFER_PAUSE_AT names it
    train = split_manifest(storage, folder, "train")
    rows = sample_rows(train.rows, settings.sample, settings.seed)
    # The map's points, the sample and then the test images placed into it, in one array: the neighbour search
    # reads them all together afterwards.
    tests = split_manifest(storage, folder, "test").rows if settings.test else 0
    vectors = np.empty((len(rows) + tests, train.feature_shape[-1]), np.float32)
    features, test_features = vectors[: len(rows)], vectors[len(rows) :] if settings.test else None
    index, labels, _ = read_split(storage, folder, "train", pooled=True, rows=rows, out=features)  # a shard at a time
    test_index = test_labels = None
    if settings.test:
        test_index, test_labels, _ = read_split(storage, folder, "test", pooled=True, out=test_features)
    coordinates, reduced, feature_knn_accuracy, placed = embed(features, labels, settings.perplexity, settings.seed, test_features)
    neighbours, similarities = point_neighbours(vectors, settings.seed)  # the explorer's, while the features are here
    del features, test_features, vectors
    embedding_path, picture_path = files.embedding, files.picture
    figure = scatter_figure(coordinates, labels, classes, f"t-SNE of {len(rows)} train images ({posixpath.basename(folder)})")
    storage.write_atomic(picture_path, save_png(figure))
    table = pa.table({"split": ["train"] * len(index), "index": index, "label": labels, "x": coordinates[:, 0], "y": coordinates[:, 1]})
    if placed is not None:
        assert test_index is not None, "a map places the test split only when it was read"
        test = {"split": ["test"] * len(test_index), "index": test_index, "label": test_labels, "x": placed[:, 0], "y": placed[:, 1]}
        table = pa.concat_tables([table, pa.table(test, schema=table.schema)])
    table = table.append_column(NEIGHBOURS_COLUMN, fixed_rows(neighbours.astype(np.int32))).append_column(
        SIMILARITIES_COLUMN, fixed_rows(similarities)
    )
    result = TsneResult(
        embedding=embedding_path,
        picture=picture_path,
        points=len(rows),
        test_points=0 if placed is None else len(placed),
        seconds=time.perf_counter() - started,
        map_knn_accuracy=knn_accuracy(coordinates, labels),
        feature_knn_accuracy=feature_knn_accuracy,
        made_by=lineage,
    )
    table = table.replace_schema_metadata(
        {
            b"tsne": records.TSNE_RESULT.dump(result, indent=None, root=storage.root),
            b"perplexity": str(settings.perplexity).encode(),
        }
    )
    storage.write_atomic(embedding_path, parquet_bytes(table))
    log.info(
        "t-SNE of %d points in %.1f s (10-NN class accuracy: %.1f%% in the map, %.1f%% in PCA-%d space): %s",
        len(rows),
        result.seconds,
        100 * result.map_knn_accuracy,
        100 * result.feature_knn_accuracy,
        reduced.shape[1],
        storage.uri(picture_path),
    )
    return result
