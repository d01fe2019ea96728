"""Classify new images with a finished run's head: `cifar-transfer predict SOURCE`.

A head only understands the features it was trained on, so the images go through the very extractor that
made them: the feature set's `FeatureSpec` (backbone, weights, input size, engine, precision) builds it with
`extractors.get_extractor`, and its output is flattened as stored, (height, width, channels).

Pixels are made by `sources.images.decode_image`, the decoding every collection source uses, at the size the
features' own images had: a collection's were decoded straight to the backbone's input size, so that is what
happens here; an archive's (CIFAR) were 32x32 images resized inside the extractor, so images are decoded to
32x32 and the same extractor resizes them. Either way a run's own images get exactly the run's features
(measured on all 10,000 CIFAR-10 test images as PNG files: the run's class for every one), and a large photo
reaches the head as the kind of image it was trained on. A head trained with flips averages the
probabilities of each image and its mirror image, as it did on the test split.

SOURCE is an image file, a folder (searched recursively, hidden files skipped), a glob, or any of these at
an fsspec URL; or a Parquet table of encoded images (a file, a folder of them, a glob), a binary column or
`datasets`' Image() struct. The source is processed in chunks: the next chunk is read and decoded while the
current one runs through the backbone, so memory holds two chunks of pixels whatever the source's size. An
image that cannot be read or decoded becomes a row with the reason, never a failed command.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cifar_transfer import records
from cifar_transfer.errors import ConfigError, SourceError
from cifar_transfer.extractors import KerasExtractor, get_extractor
from cifar_transfer.progress import duration
from cifar_transfer.redact import printable, redact
from cifar_transfer.sources.files import MAX_FILE_MB, READ_BATCH, fetch, fetch_error, file_limit, not_a_regular_file, read_bounded, walk
from cifar_transfer.sources.folder import IMAGE_EXTENSIONS
from cifar_transfer.sources.images import UndecodableImage, decode_image
from cifar_transfer.sources.kinds import kind_of
from cifar_transfer.sources.parquet import GLOB_MAGIC, holds_encoded_images, image_bytes, open_parquet, row_group_over_cap
from cifar_transfer.storage import Storage
from cifar_transfer.trained import TrainedHead, find_head

log = logging.getLogger(__name__)

CHUNK = 1000  # images decoded and held at once (two chunks are in memory: one decoding, one in the backbone)
HEAD_BATCH = 1024
PROGRESS_SECONDS = 10.0  # at most one progress line this often (and always one at the end)
PARQUET_ROW_GROUP = 10_000
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("class", pa.string()),
        ("class_index", pa.int64()),
        ("confidence", pa.float32()),
        ("top_classes", pa.list_(pa.string())),
        ("top_probabilities", pa.list_(pa.float32())),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class Prediction:
    """One image's answer: its best class and that class's probability, the `top` classes best first; or, for an
    image that could not be read or decoded, `error` with the reason and no class."""

    path: str
    class_name: str | None
    class_index: int | None
    confidence: float | None
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def record(self) -> dict:
        """The row as written to JSON and Parquet (the columns of `SCHEMA`)."""
        return {
            "path": self.path,
            "class": self.class_name,
            "class_index": self.class_index,
            "confidence": self.confidence,
            "top_classes": [name for name, _ in self.top],
            "top_probabilities": [probability for _, probability in self.top],
            "error": self.error,
        }


class ImageSource:
    """The images of SOURCE, listed once (names only), read chunk by chunk as (path, bytes or None, reason)."""

    def __init__(self, source: str, image_column: str | None = None, max_file_mb: float = MAX_FILE_MB):
        self.source = source
        self.image_column = image_column
        self.limit = file_limit(max_file_mb)
        self.fs, path = fsspec.core.url_to_fs(source)
        self._local = isinstance(self.fs, LocalFileSystem)
        self._sizes: dict[str, int] = {}  # listed sizes of an object store's files, checked against the cap before a read
        files, single = self._list(path)
        tables = [name for name in files if name.lower().endswith(".parquet") and not (self._local and self._unreadable_table(name))]
        if single:  # a file named on its own is decoded whatever its extension (or reported)
            self.image_files = [] if tables else files
        else:
            self.image_files = [name for name in files if name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS]
        self.tables: list[tuple[str, int]] = []  # (file, rows): SOURCE is a table when it holds no image files
        if not self.image_files:
            if not tables:
                raise SourceError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) or Parquet tables at {redact(source)}")
            self.tables = [(name, self._table_rows(name)) for name in tables]
        if ignored := len(files) - len(self.image_files or tables):
            log.info(
                "predict: ignored %d files of %s that are not %s",
                ignored,
                redact(source),
                "images" if self.image_files else "Parquet files",
            )
        self.total = len(self.image_files) + sum(rows for _, rows in self.tables)
        if self.image_files:
            self.path_width = max(len(printable(self._shown(name))) for name in self.image_files)
        else:
            self.path_width = max(len(printable(self._shown(name))) + 1 + len(str(max(rows - 1, 0))) for name, rows in self.tables)

    def _list(self, path: str) -> tuple[list[str], bool]:
        """(files, whether SOURCE names one file): a glob's matches, everything under a folder but hidden entries, or the file."""
        self.fs.invalidate_cache()
        if GLOB_MAGIC.search(path):
            found = {name: info for name, info in self.fs.glob(path, detail=True).items() if info.get("type") != "directory"}
        elif self.fs.isdir(path):
            root = path.rstrip("/") + "/"
            if self._local:
                files, unlisted = walk(path)
                for entry in unlisted:
                    log.warning("predict: skipped %s", printable(entry))
                found = {root + key: info for key, info in files.items()}
            else:
                found = {name: info for name, info in self.fs.find(path, detail=True).items() if "/." not in "/" + name.removeprefix(root)}
        elif os.path.lexists(path) if self._local else self.fs.isfile(path):  # a FIFO or a dangling link: reported when read
            self._sizes = {path: 0 if self._local else self.fs.size(path) or 0}
            return [path], True
        else:
            raise SourceError(f"{redact(self.source)} is no file, folder or glob that matches anything: check SOURCE")
        self._sizes = {name: info.get("size") or 0 for name, info in found.items()}
        return sorted(found), False

    def _unreadable_table(self, name: str) -> bool:
        """A local table that is not a regular file (a FIFO would block its reader): logged and left out."""
        if problem := not_a_regular_file(name):
            log.warning("predict: skipped %s: %s", printable(name), problem)
        return problem is not None

    def _shown(self, name: str) -> str:
        return name if self._local else redact(self.fs.unstrip_protocol(name))

    def _table_rows(self, name: str) -> int:
        """The table's row count (from its footer), after checking it holds encoded images in the image column."""
        with self.fs.open(name, "rb") as handle:
            parquet = open_parquet(handle, self._shown(name))
            schema = parquet.schema_arrow
            columns = [column.name for column in schema if holds_encoded_images(column.type)]
            if self.image_column is None:
                self.image_column = "image" if "image" in columns else (columns[0] if len(columns) == 1 else None)
            if self.image_column not in columns:
                raise SourceError(
                    f"{self._shown(name)}: no column {self.image_column or 'image'!r} of encoded images (binary, or a struct "
                    f"with binary 'bytes') among {', '.join(schema.names)}: pass --image-column NAME"
                )
            return parquet.metadata.num_rows

    def chunks(self, size: int, first: int | None = None) -> Iterator[list[tuple[str, bytes | None, str | None]]]:
        """(path, bytes, None) or (path, None, reason) for every image in listing order, in lists of `first` rows,
        then each 4 times longer up to `size`: the backbone starts after a few images are decoded, not a whole chunk,
        and each list is decoded while the one before (a quarter as long, or as long) is in the backbone."""
        rows: list[tuple[str, bytes | None, str | None]] = []
        wanted = min(first or size, size)
        for entry in self._files() if self.image_files else self._table_cells():
            rows.append(entry)
            if len(rows) == wanted:
                yield rows
                rows, wanted = [], min(size, 4 * wanted)
        if rows:
            yield rows

    def _files(self) -> Iterator[tuple[str, bytes | None, str | None]]:
        if self._local:
            for name in self.image_files:
                yield name, *read_bounded(name, self.limit)
            return
        sizes = [self._sizes.get(name, 0) for name in self.image_files]
        for name, data in zip(self.image_files, fetch(self.fs, self.image_files, sizes, self.limit), strict=True):
            if isinstance(data, str):
                yield self._shown(name), None, data
            elif isinstance(data, BaseException):
                yield self._shown(name), None, fetch_error(data)
            else:
                yield self._shown(name), data, None

    def _table_cells(self) -> Iterator[tuple[str, bytes | None, str | None]]:
        """Each row's image, a row group at a time; a row group over the cap is not read (its rows say why)."""
        for name, _ in self.tables:
            with self.fs.open(name, "rb") as handle:
                parquet = open_parquet(handle, self._shown(name))
                row = 0
                for group in range(parquet.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    column = self.image_column or "image"  # set from the first table's columns
                    if too_large := row_group_over_cap(parquet, group, column, self.limit, self._shown(name)):
                        yield from ((f"{self._shown(name)}#{number}", None, too_large) for number in range(row, row + rows))
                        row += rows
                        continue
                    for batch in parquet.iter_batches(batch_size=READ_BATCH, row_groups=[group], columns=[column]):
                        for cell in batch.column(0).to_pylist():
                            yield f"{self._shown(name)}#{row}", *image_bytes(cell)
                            row += 1


@dataclass
class _Decoded:
    """A chunk's pixels, row for row with its decoded rows, and each row's reason where it has no pixels."""

    rows: list[tuple[str, str | None]]  # (path, reason or None)
    pixels: np.ndarray


class Predictor:
    """A trained head with the extractor of its features, built once, applied to any number of images."""

    def __init__(self, head: TrainedHead, storage_url: str | None = None):
        self.head = head
        self.spec = head.features.spec
        self.classes = head.metrics.classes
        self.flip = head.metrics.settings.flip
        self.size = kind_of(head.features.collection).predict_size(self.spec.input_size)
        self.extractor = get_extractor(self.spec, (self.size, self.size, 3), storage_url)
        self.model = KerasExtractor(_load_head_model(head))

    def describe(self) -> str:
        spec, metrics = self.spec, self.head.metrics
        return (
            f"head {self.head.key} ({metrics.chosen.head}, test accuracy {metrics.test_accuracy:.2%}) on "
            f"{spec.backbone} {spec.input_size}px {spec.pooling} features ({spec.engine} {spec.precision}, {self.head.features.folder})"
        )

    def probabilities(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Class probabilities of uint8 (n, size, size, 3) images: as the head's test split got them."""
        probabilities = self._head(pixels, batch_size)
        if self.flip:
            probabilities = (probabilities + self._head(np.ascontiguousarray(pixels[:, :, ::-1]), batch_size)) / 2
        return probabilities

    def _head(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        features = self.extractor(pixels, batch_size)
        return self.model(features.reshape(len(features), -1), HEAD_BATCH)

    def predict(self, images: ImageSource, top_k: int = 1, batch_size: int = 64, chunk: int = CHUNK) -> Iterator[Prediction]:
        """Every image's prediction, in listing order (checked here, computed as the rows are consumed)."""
        if top_k < 1 or batch_size < 1 or chunk < 1:
            raise ConfigError(f"top-k ({top_k}), batch size ({batch_size}) and chunk ({chunk}) must be at least 1")
        return self._predict(images, min(top_k, len(self.classes)), batch_size, chunk)

    def _predict(self, images: ImageSource, top_k: int, batch_size: int, chunk: int) -> Iterator[Prediction]:
        """Reading and decoding the next chunk (I/O and Pillow, which release the GIL) overlap the backbone's work on this one."""
        log.info("predict: %d images from %s with %s", images.total, redact(images.source), self.describe())
        started = last_line = time.perf_counter()
        done = failed = 0
        with ThreadPoolExecutor(1, thread_name_prefix="predict-decode") as decoder:
            chunks = images.chunks(chunk, first=batch_size)

            def next_chunk() -> _Decoded:  # on the one decoding thread only, so the listing is read by one thread at a time
                return self._decode(next(chunks, []))

            pending = decoder.submit(next_chunk)
            while True:
                decoded = pending.result()
                if not decoded.rows:
                    break
                pending = decoder.submit(next_chunk)
                probabilities = self.probabilities(decoded.pixels, batch_size) if len(decoded.pixels) else None
                position = 0
                for path, reason in decoded.rows:
                    if reason is not None:
                        failed += 1
                        log.warning("predict: %s: %s", path, reason)
                        yield Prediction(path, None, None, None, error=reason)
                        continue
                    assert probabilities is not None, "a row without a reason has pixels"
                    yield self._answer(path, probabilities[position], top_k)
                    position += 1
                done += len(decoded.rows)
                now = time.perf_counter()
                if now - last_line >= PROGRESS_SECONDS or done == images.total:
                    last_line = now
                    rate = done / max(now - started, 1e-9)
                    log.info(
                        "predict: %d/%d images (%d undecodable), %.0f images/s, ETA %s",
                        done,
                        images.total,
                        failed,
                        rate,
                        duration((images.total - done) / rate) if done < images.total else "-",
                    )

    def _decode(self, rows: list[tuple[str, bytes | None, str | None]]) -> _Decoded:
        pixels, out = [], []
        for path, data, reason in rows:
            if data is not None:
                try:
                    pixels.append(decode_image(data, self.size))
                except UndecodableImage as exc:
                    reason = exc.reason
            out.append((path, reason))
        stacked = np.stack(pixels) if pixels else np.zeros((0, self.size, self.size, 3), np.uint8)
        return _Decoded(out, stacked)

    def _answer(self, path: str, probabilities: np.ndarray, top_k: int) -> Prediction:
        best = np.argsort(-probabilities, kind="stable")[:top_k]
        top = [(self.classes[index], float(probabilities[index])) for index in best]
        return Prediction(path, top[0][0], int(best[0]), top[0][1], top)


def _load_head_model(head: TrainedHead):
    """The head's Keras model, copied to a local file first (Keras loads from paths only; storage may be remote)."""
    from cifar_transfer.native import load_keras

    keras = load_keras()
    storage = Storage(head.features.storage_url)
    with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, "model.keras")
        with open(local, "wb") as stream:
            stream.write(storage.read_bytes(head.files.model))
        return keras.models.load_model(local, compile=False)


def predict(
    source: str,
    storage_url: str,
    fingerprint: str | None = None,
    head_key: str | None = None,
    top_k: int = 1,
    batch_size: int = 64,
    chunk: int = CHUNK,
    image_column: str | None = None,
) -> Iterator[Prediction]:
    """Predictions for every image of `source` with the newest finished head under `storage_url` (or the one named)."""
    images = ImageSource(source, image_column)
    return Predictor(find_head(storage_url, fingerprint, head_key), storage_url).predict(images, top_k, batch_size, chunk)


def check_output(destination: str, overwrite: bool) -> None:
    """Before any work: `destination` is a .json or .parquet name, not an existing file (unless `overwrite`), in a
    folder that can be written to."""
    _output_kind(destination)
    storage = Storage(destination)
    if storage.exists(storage.root):
        if storage.fs.isdir(storage.root):
            raise ConfigError(f"output {redact(destination)} is a folder: name a .json or .parquet file in it")
        if not overwrite:
            raise ConfigError(f"output {redact(destination)} already exists: choose another name, or pass --overwrite to replace it")
    storage.check_writable(posixpath.dirname(storage.root), "the predictions")


def write_predictions(rows: Iterable[Prediction], destination: str, metadata: dict | None = None) -> int:
    """Write the rows to a .json (a list of objects) or .parquet file (columns of `SCHEMA`), streamed, so memory stays
    flat, and atomically: the file is complete or absent. Returns the number of rows. Callers run `check_output` first,
    before any work."""
    kind = _output_kind(destination)
    storage = Storage(destination)
    count = 0
    with storage.open_atomic(storage.root) as stream:
        if kind == ".json":
            stream.write(b"[")
            for count, row in enumerate(rows, 1):
                stream.write((",\n " if count > 1 else "\n ").encode() + json.dumps(row.record()).encode())
            stream.write(b"\n]\n" if count else b"]\n")
            return count
        schema = SCHEMA.with_metadata({"cifar_transfer": records.PREDICTIONS.dump(metadata or {}, indent=None)})
        with pq.ParquetWriter(stream, schema) as writer:
            group: list[dict] = []
            for row in rows:
                group.append(row.record())
                if len(group) == PARQUET_ROW_GROUP:
                    writer.write_table(pa.Table.from_pylist(group, schema))
                    count, group = count + len(group), []
            if group:
                writer.write_table(pa.Table.from_pylist(group, schema))
                count += len(group)
    return count


def _output_kind(destination: str) -> str:
    kind = posixpath.splitext(destination.split("?", 1)[0])[1].lower()
    if kind not in (".json", ".parquet"):
        raise ConfigError(f"output {redact(destination)} must end in .json or .parquet")
    return kind
