"""Classify new images with a finished run's head: `cifar-transfer predict SOURCE`.

A head only understands the features it was trained on, so the images go through the very extractor that
made them: the feature set's `FeatureSpec` (backbone, weights, input size, engine, precision) builds it with
`extractors.get_extractor`, and its output is flattened as stored, (height, width, channels).

Pixels are made by `sources.images.decode_kept`, the decoding every collection source uses, at the size the
features' own images had: a collection's were decoded straight to the backbone's input size, so that is what
happens here; an archive's (CIFAR) were 32x32 images resized inside the extractor, so images are decoded to
32x32 and the same extractor resizes them. Either way a run's own images get exactly the run's features
(measured on all 10,000 CIFAR-10 test images as PNG files: the run's class for every one), and a large photo
reaches the head as the kind of image it was trained on. A head trained with flips averages the
probabilities of each image and its mirror image, as it did on the test split.

SOURCE is anything a collection format reads without labels (`sources.unlabelled.UnlabelledImages`, which picks
the format): image files, folders, globs or Parquet tables of encoded images, local or at an fsspec URL. The
source is processed in chunks: the next chunk is read and decoded while the current one runs through the backbone,
so memory holds two chunks of pixels whatever the source's size. An image that cannot be read or decoded becomes a
row with the reason, never a failed command.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifar_transfer import records
from cifar_transfer.errors import ConfigError
from cifar_transfer.extractors import KerasExtractor, get_extractor
from cifar_transfer.progress import duration
from cifar_transfer.redact import redact
from cifar_transfer.sources.images import decode_kept
from cifar_transfer.sources.kinds import kind_of
from cifar_transfer.sources.unlabelled import UnlabelledImages
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

    def predict(self, images: UnlabelledImages, top_k: int = 1, batch_size: int = 64, chunk: int = CHUNK) -> Iterator[Prediction]:
        """Every image's prediction, in listing order (checked here, computed as the rows are consumed)."""
        if top_k < 1 or batch_size < 1 or chunk < 1:
            raise ConfigError(f"top-k ({top_k}), batch size ({batch_size}) and chunk ({chunk}) must be at least 1")
        return self._predict(images, min(top_k, len(self.classes)), batch_size, chunk)

    def _predict(self, images: UnlabelledImages, top_k: int, batch_size: int, chunk: int) -> Iterator[Prediction]:
        """Reading and decoding the next chunk (I/O and Pillow, which release the GIL; its images on every core) overlap
        the backbone's work on this one."""
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
        pixels = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        images, reasons = decode_kept(pixels, ((data, reason) for _, data, reason in rows))
        return _Decoded([(path, reason) for (path, _, _), reason in zip(rows, reasons, strict=True)], images)

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
    images = UnlabelledImages(source, image_column)
    return Predictor(find_head(storage_url, fingerprint, head_key), storage_url).predict(images, top_k, batch_size, chunk)


def check_output(destination: str, overwrite: bool) -> None:
    """Before any work: `destination` is a .json or .parquet name, not an existing file (unless `overwrite`), in a
    folder that can be written to."""
    output_kind(destination)
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
    kind = output_kind(destination)
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


def output_kind(destination: str) -> str:
    kind = posixpath.splitext(destination.split("?", 1)[0])[1].lower()
    if kind not in (".json", ".parquet"):
        raise ConfigError(f"output {redact(destination)} must end in .json or .parquet")
    return kind
