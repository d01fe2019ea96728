"""The images most like a query: `cifar-transfer similar QUERY --k 10`.

QUERY is a row of the set (`train:12`, `test/7`, or a collection's image name) or an image file (a path or an fsspec
URL). A file goes through the set's own extractor, as `predict` does (same backbone, weights, engine, input size and
decoding), so it lands where the set's own images do; a row of the set is read from its shard and is never its own
neighbour. The search uses the set's index (`audit.index`): exact up to its limit, usearch's HNSW above it; a set with
no index yet is searched exactly (an approximate index is built first when the set is too large for that).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from cifar_transfer.audit.index import EXACT_LIMIT, IndexRecord, Searcher, read_index_record, update_index
from cifar_transfer.audit.vectors import SetRows, normalized
from cifar_transfer.catalogue import find_feature_set
from cifar_transfer.errors import ConfigError, SourceError
from cifar_transfer.feature_records import FeatureSetInfo
from cifar_transfer.redact import redact
from cifar_transfer.storage import Storage
from cifar_transfer.stored import stored_source

ROW = re.compile(r"^(train|test)[:/](\d+)$")


@dataclass(frozen=True)
class Neighbour:
    rank: int
    split: str
    index: int
    key: str
    label: str
    similarity: float  # cosine similarity of the (pooled) features
    distance: float  # 1 - similarity


def query_row(storage: Storage, features: FeatureSetInfo, rows: SetRows, query: str) -> int | None:
    """The position of the row QUERY names, or None when it names none (then it is an image file)."""
    if match := ROW.match(query):
        split, number = match.group(1), int(match.group(2))
        if split not in rows.manifests:
            raise ConfigError(f"the feature set has no complete {split} split: query a row of {', '.join(rows.splits)}")
        splits, index, _ = rows.names()
        found = np.flatnonzero((splits == split) & (index == number))
        if not len(found):
            raise ConfigError(f"{split} has no row {number} (it has {rows.manifests[split].rows} rows): give an index it has")
        return int(found[0])
    named = stored_source(features.collection).row_named(storage, features.folder, rows.splits, query)
    return query_row(storage, features, rows, f"{named[0]}:{named[1]}") if named is not None else None


def image_vector(features: FeatureSetInfo, query: str, storage_url: str) -> np.ndarray:
    """The query image's pooled, normalized features through the set's own extractor (as `predict` decodes it)."""
    from cifar_transfer.extractors import get_extractor
    from cifar_transfer.sources.images import UndecodableImage, decode_image
    from cifar_transfer.sources.kinds import kind_of
    from cifar_transfer.sources.unlabelled import UnlabelledImages

    try:
        source = UnlabelledImages(query)
    except (SourceError, FileNotFoundError):
        raise ConfigError(
            f"{redact(query)} is neither an image file nor a row of the set: give a file, 'train:N', 'test:N' or an image name"
        ) from None
    if source.total != 1:
        raise ConfigError(f"{redact(query)} holds {source.total} images: give one image file")
    ((path, data, reason),) = next(source.chunks(1))
    if data is None:
        raise ConfigError(f"{redact(path)} cannot be read ({reason}): give a readable image file")
    size = kind_of(features.collection).predict_size(features.spec.input_size)
    try:
        pixels = decode_image(data, size)[None]
    except UndecodableImage as exc:
        raise ConfigError(f"{redact(path)} is not an image this can decode ({exc.reason}): give a JPEG, PNG, WebP, ...") from None
    values = get_extractor(features.spec, (size, size, 3), storage_url)(pixels, 1)
    return normalized(values.reshape(1, -1, features.feature_shape[-1]).mean(axis=1))


def current_index(storage: Storage, features: FeatureSetInfo, rows: SetRows) -> IndexRecord:
    """The set's index if it is current; else an exact search's record (nothing written) when the set is small enough,
    or the approximate index brought up to date."""
    shards = {split: [record.sha256 for record in manifest.shards] for split, manifest in rows.manifests.items()}
    record = read_index_record(storage, features.folder)
    if record is not None and record.fingerprint == features.fingerprint and record.shards == shards:
        return record
    if rows.rows <= (record.rows if record is not None and record.kind == "exact" else EXACT_LIMIT):
        return IndexRecord(fingerprint=features.fingerprint, kind="exact", rows=rows.rows, dimension=rows.width, shards=shards)
    return update_index(storage, features.folder, features.fingerprint).record


def similar(storage_url: str, query: str, k: int = 10, fingerprint: str | None = None) -> list[Neighbour]:
    """The k rows of the set most like QUERY, most alike first."""
    if k < 1:
        raise ConfigError(f"--k must be at least 1 (got {k})")
    storage = Storage(storage_url)
    features = find_feature_set(storage_url, fingerprint, splits=())
    rows = SetRows.open(storage, features.folder)
    if not rows.manifests:
        raise ConfigError(f"the feature set {features.fingerprint} has no complete split yet: finish its extraction first")
    position = query_row(storage, features, rows, query)
    if position is None:
        vector = image_vector(features, query, storage_url)
        exclude = None
    else:
        block = next(block for block in rows.blocks() if block.start <= position < block.stop)
        vector = block.vectors[position - block.start][None]
        exclude = np.array([position])
    searcher = Searcher(storage, features.folder, current_index(storage, features, rows))
    try:
        positions, similarities = searcher.search(vector, k, exclude)
    finally:
        searcher.close()
    splits, index, labels = rows.names()
    keys = stored_source(features.collection).row_keys(storage, features.folder, splits, index)
    return [
        Neighbour(rank + 1, str(splits[p]), int(index[p]), str(keys[p]), features.classes[int(labels[p])], float(s), float(1 - s))
        for rank, (p, s) in enumerate(zip(positions[0], similarities[0], strict=True))
        if p >= 0
    ]


def write_neighbours(neighbours: list[Neighbour], destination: str, query: str) -> None:
    """`--output`: a .json list or a .parquet table of the neighbours (the query in its metadata)."""
    from cifar_transfer.predict import output_kind
    from cifar_transfer.shard_files import parquet_bytes

    storage = Storage(destination)
    rows = [asdict(neighbour) for neighbour in neighbours]
    if output_kind(destination) == ".json":
        storage.write_atomic(storage.root, json.dumps({"query": redact(query), "neighbours": rows}, indent=2).encode())
        return
    columns = ("rank", "split", "index", "key", "label", "similarity", "distance")
    table = pa.table({name: [row[name] for row in rows] for name in columns})
    table = table.replace_schema_metadata({"query": redact(query)})
    storage.write_atomic(storage.root, parquet_bytes(table))
