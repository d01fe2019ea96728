"""Each point of a map's nearest other points, by cosine similarity of their pooled, normalized features (as the
audit's index and `similar` measure it): what the map explorer shows for a clicked point.

The exact search over the full width would be 10 TFLOP at 60,000 points of 2,816 floats (minutes on a laptop);
instead the vectors are projected onto their first `PROJECTION` principal components, each point's `CANDIDATES`
nearest there are found by blocked matrix products, and those are ranked by the full vectors (held in float32, and
ranked four times as fast as from half precision, which numpy casts slowly). `bench/explorer.py` measures the recall
against the exact search. The t-SNE stage runs it on the vectors it holds anyway (`point_neighbours`), so the
explorer reads no features; maps made before that are searched by the explorer (`explorer.point_vectors`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cifar_transfer.audit.index import top_k
from cifar_transfer.audit.vectors import normalized, row_norms
from cifar_transfer.evaluation import sample_rows
from cifar_transfer.hardware import quiet_scipy_blas

NEIGHBOURS = 8  # neighbours shown for a clicked point
PROJECTION = 128  # principal components the neighbour search runs in
PROJECTION_BASIS_ROWS = 10_000  # rows of the points the projection is fitted on (`point_neighbours`)
# Power iterations of the projection's randomized PCA (scikit-learn's "auto": 7 here). The projection only picks the
# candidates the full features rank: at 25,000 points of 4,096 InceptionV3 features, 2 took 0.8 s instead of 2.3 s
# and found 92.40% of the exact 8 nearest against 92.31% (1,000 queries).
PROJECTION_POWER_ITERATIONS = 2
# Blocks small enough that their work arrays stay in cache and memory the allocator reuses: at 25,000 points of 4,096
# features blocks of 1,024 queries (100 MB of similarities) and 256 reranked points (134 MB of candidates) took 8.2 s,
# these 4.6 (and 64, 256 or 512 queries, no faster than 128, since `nearest_points` keeps its scores in one array).
QUERY_BLOCK = 128  # query rows compared with every point at once (QUERY_BLOCK x points floats in memory)
CANDIDATES = 32  # nearest points in the projection whose full features are compared
RERANK_BLOCK = 64  # points whose candidates are compared at once (RERANK_BLOCK x CANDIDATES x width floats)
CHUNK = 64  # points whose maximum is compared first when ranking a query's neighbours (a power of two: `chunk_maxima` halves it)


class Projection(NamedTuple):
    """Rows onto fitted principal components, as rows @ components^T - mean @ components^T: no centred copy of the
    rows (at 25,000 of 4,096 features, 410 MB of fresh memory)."""

    components: np.ndarray  # (components, width)
    offset: np.ndarray  # mean @ components^T

    @classmethod
    def of(cls, pca) -> Projection:
        components = pca.components_
        return cls(components, pca.mean_.astype(components.dtype) @ components.T)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return rows.astype(self.components.dtype, copy=False) @ self.components.T - self.offset


def fitted_pca(rows: np.ndarray, seed: int, **options):
    """scikit-learn's PCA of `rows` (`options` as its own), fitted with scipy's own OpenBLAS on one thread: a randomized
    PCA's power iterations alternate numpy's products with scipy's LU (`hardware.quiet_scipy_blas`)."""
    from sklearn.decomposition import PCA

    with quiet_scipy_blas():
        return PCA(random_state=seed, **options).fit(rows)


class PointVectors(NamedTuple):
    projected: np.ndarray  # float32, the top principal components, normalized: where candidates are searched
    full: np.ndarray  # float32, the pooled normalized features: what candidates are ranked by


def map_neighbours(vectors: PointVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's k nearest other points by the cosine of its full features, best first (-1 and NaN where there are
    fewer): the CANDIDATES nearest in the projection, ranked by their full features. On CIFAR-10's 2,816-float
    MobileNetV2 features the projection alone finds 68% of the exact 8 nearest (128, 256 or 512 components alike);
    ranking its 32 nearest finds 97%, at a twentieth of the exact search's work."""
    candidates, _ = nearest_points(vectors.projected, max(k, CANDIDATES))
    positions = np.full((len(candidates), k), -1, np.int64)
    similarities = np.full((len(candidates), k), np.nan, np.float32)
    # One buffer for every block's gathered candidates: a new 34 MB array each block would be fresh memory each time.
    gathered = np.empty((RERANK_BLOCK, candidates.shape[1], vectors.full.shape[1]), np.float32)
    for start in range(0, len(candidates), RERANK_BLOCK):
        chosen = candidates[start : start + RERANK_BLOCK]
        queries = vectors.full[start : start + RERANK_BLOCK]
        rows = np.take(vectors.full, chosen, axis=0, out=gathered[: len(chosen)], mode="clip")  # -1 (none) reads row 0
        found = np.matmul(rows, queries[:, :, None])[:, :, 0]  # faster than einsum
        found[chosen < 0] = -np.inf
        best, values = top_k(found, chosen, k)
        positions[start : start + len(chosen)] = np.where(np.isfinite(values), best, -1)
        similarities[start : start + len(chosen)] = np.where(np.isfinite(values), values, np.nan)
    return positions, similarities


def nearest_points(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows by cosine (rows normalized), best first: (positions, similarities);
    -1 and NaN where there are fewer than k other rows.

    A block of queries is compared with every row at once, laid out a row per point and a column per query, and the
    points are taken CHUNK at a time: the k chunks with the largest maxima hold a query's k largest values (a chunk
    without one has a smaller maximum than each of them), so only those k x CHUNK values are ranked, 4 to 6 times
    faster than `argpartition` over 60,000 columns. In that layout a chunk's maximum is an elementwise maximum of
    whole rows (`chunk_maxima`): at 25,000 points of 128 components the search took 2.3 s, not the 3.7 s of a
    row per query."""
    count = len(vectors)
    positions = np.full((count, k), -1, np.int64)
    similarities = np.full((count, k), np.nan, np.float32)
    wanted = min(k, count - 1)
    if wanted < 1:
        return positions, similarities
    chunks = -(-count // CHUNK)
    scores = np.full((chunks * CHUNK, QUERY_BLOCK), -np.inf, np.float32)  # the rows past `count` stay -inf
    halves = np.empty((chunks, CHUNK // 2, QUERY_BLOCK), np.float32)
    for start in range(0, count, QUERY_BLOCK):
        stop = min(count, start + QUERY_BLOCK)
        queries = stop - start
        if queries < QUERY_BLOCK:  # the last block: contiguous arrays as wide as it
            scores = np.full((chunks * CHUNK, queries), -np.inf, np.float32)
            halves = np.empty((chunks, CHUNK // 2, queries), np.float32)
        np.matmul(vectors, vectors[start:stop].T, out=scores[:count])
        scores[np.arange(start, stop), np.arange(queries)] = -np.inf  # never its own neighbour
        by_chunk = scores.reshape(chunks, CHUNK, queries)
        maxima = chunk_maxima(by_chunk, halves).T  # (queries, chunks)
        best_chunks = top_k(maxima, np.broadcast_to(np.arange(chunks), maxima.shape), min(wanted, chunks))[0]
        candidates = by_chunk[best_chunks, :, np.arange(queries)[:, None]].reshape(queries, -1)
        places = (best_chunks[:, :, None] * CHUNK + np.arange(CHUNK)).reshape(queries, -1)
        positions[start:stop, :wanted], similarities[start:stop, :wanted] = top_k(candidates, places, wanted)
    return positions, similarities


def chunk_maxima(by_chunk: np.ndarray, halves: np.ndarray) -> np.ndarray:
    """(chunks, CHUNK, columns) -> each chunk's maximum per column, by halving: elementwise maxima of whole blocks of
    rows run at memory speed, where numpy's `max(axis=1)` runs a short loop per row (0.17-0.25 s against 0.63-0.68 s
    over 25,000 x 25,000). `halves` (chunks, CHUNK // 2, columns) is the work array, reused."""
    width = CHUNK // 2
    np.maximum(by_chunk[:, :width], by_chunk[:, width:], out=halves)
    while width > 1:
        width //= 2
        np.maximum(halves[:, :width], halves[:, width : 2 * width], out=halves[:, :width])
    return halves[:, 0]


def point_neighbours(vectors: np.ndarray, seed: int, k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """`map_neighbours` of points given as pooled float32 features, which are normalized in place (the caller is done
    with them: a normalized copy would be fresh memory the size of the map's features). The projection is fitted on
    a seeded `PROJECTION_BASIS_ROWS` of the points."""
    vectors /= np.maximum(row_norms(vectors), 1e-12)[:, None]
    if vectors.shape[1] <= PROJECTION or len(vectors) <= 1:
        return map_neighbours(PointVectors(vectors, vectors), k)
    basis = sample_rows(len(vectors), PROJECTION_BASIS_ROWS, seed)
    options = {"n_components": min(PROJECTION, len(basis)), "svd_solver": "randomized", "iterated_power": PROJECTION_POWER_ITERATIONS}
    project = Projection.of(fitted_pca(vectors[basis], seed, **options))
    return map_neighbours(PointVectors(normalized(project(vectors)), vectors), k)
