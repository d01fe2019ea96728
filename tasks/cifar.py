"""Read the CIFAR-10 python archive safely, store it decoded, and plan the shards.

The batches are Python pickles, and unpickling runs whatever a pickle asks
for, so they are loaded with an unpickler that allows only the few globals the
format needs (numpy's array reconstruction). Members are read from the tar
stream, never extracted, so no member path can write anywhere.

The decoded images (uint8, N x 32 x 32 x 3) and labels are stored once as .npy
files under `datasets/cifar10-<md5>/`; a shard then reads just its rows.
"""

from __future__ import annotations

import codecs
import io
import pickle
import posixpath
import tarfile
import zlib
from functools import cache

import numpy as np
from prefect import task
from pydantic import BaseModel

from tasks.caching import committed_file_key, output_key_fn, remember_output
from tasks.errors import ArchiveError
from tasks.logs import logger
from tasks.storage import Storage

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLIT_MEMBERS = {
    "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
    "test": ["cifar-10-batches-py/test_batch"],
}
META_MEMBER = "cifar-10-batches-py/batches.meta"
IMAGE_SHAPE = (32, 32, 3)
_ROW_BYTES = 32 * 32 * 3
_DONE_MARKER = "_SUCCESS.json"


def _latin1_encode(text, encoding="latin1"):
    """Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, 'latin1')."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
    return codecs.encode(text, "latin1")


@cache
def _allowed_globals() -> dict[tuple[str, str], object]:
    from numpy._core import multiarray

    reconstruct = multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Loads CIFAR-10 batches and refuses every global outside the format's needs."""

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return allowed


def load_batch(payload: bytes, member: str) -> dict:
    try:
        batch = RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as exc:
        raise ArchiveError(f"member {member} is not a CIFAR-10 batch ({exc}): use the official cifar-10-python.tar.gz") from None
    if not isinstance(batch, dict):
        raise ArchiveError(f"member {member} holds a {type(batch).__name__}, not a dict: use the official cifar-10-python.tar.gz")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


def _check_batch(batch: dict, member: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_BYTES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise ArchiveError(f"member {member}: 'data' is {dtype} {shape}, expected uint8 (N, {_ROW_BYTES})")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ArchiveError(f"member {member}: 'labels' has shape {labels.shape} ({labels.dtype}), expected {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ArchiveError(f"member {member}: labels range {labels.min()}..{labels.max()}, expected 0..{len(CLASS_NAMES) - 1}")
    return data, labels.astype(np.int64)


def read_archive(stream) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images (N, 32, 32, 3) uint8 and labels per split, from a CIFAR-10 tar.gz stream."""
    wanted = {member for members in SPLIT_MEMBERS.values() for member in members}
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|gz") as archive:
            for member in archive:
                if member.name not in wanted:
                    continue
                if member.name in batches:
                    raise ArchiveError(f"member {member.name} appears twice: the archive is not a clean CIFAR-10 archive")
                if not member.isfile():
                    raise ArchiveError(f"member {member.name} is not a regular file: the archive is not a clean CIFAR-10 archive")
                batches[member.name] = load_batch(archive.extractfile(member).read(), member.name)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ArchiveError(f"archive is truncated or not a tar.gz ({exc}): delete it from storage and fetch it again") from None
    missing = sorted(wanted - batches.keys())
    if missing:
        raise ArchiveError(f"archive lacks {', '.join(missing)}: it is not a complete CIFAR-10 python archive")
    splits = {}
    for split, members in SPLIT_MEMBERS.items():
        checked = [_check_batch(batches[member], member) for member in members]
        rows = np.concatenate([data for data, _ in checked])
        images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = (np.ascontiguousarray(images), np.concatenate([labels for _, labels in checked]))
    return splits


class DatasetInfo(BaseModel):
    """The decoded dataset in storage: where it is and how many images each split has."""

    folder: str
    md5: str
    sizes: dict[str, int]
    classes: list[str]


def dataset_folder(storage: Storage, archive_md5: str) -> str:
    return storage.path("datasets", f"cifar10-{archive_md5}")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def finished_dataset(storage_url: str, archive_md5: str) -> DatasetInfo | None:
    """The decoded dataset if its completion marker is there, else None."""
    storage = Storage(storage_url)
    marker = posixpath.join(dataset_folder(storage, archive_md5), _DONE_MARKER)
    if not storage.exists(marker):
        return None
    return DatasetInfo.model_validate_json(storage.read_bytes(marker))


def decode_archive(storage_url: str, archive_path: str, archive_md5: str) -> DatasetInfo:
    """Decode the archive once into .npy arrays (one decoder at a time); the marker file is written last."""
    done = finished_dataset(storage_url, archive_md5)
    if done is not None:
        return done
    storage = Storage(storage_url)
    folder = dataset_folder(storage, archive_md5)
    with storage.claim(posixpath.join(folder, _DONE_MARKER)):
        return finished_dataset(storage_url, archive_md5) or _decode(storage, folder, archive_path, archive_md5)


def _decode(storage: Storage, folder: str, archive_path: str, archive_md5: str) -> DatasetInfo:
    with storage.fs.open(archive_path, "rb") as stream:
        splits = read_archive(stream)
    for split, (images, labels) in splits.items():
        storage.write_atomic(posixpath.join(folder, f"{split}_images.npy"), _npy_bytes(images))
        storage.write_atomic(posixpath.join(folder, f"{split}_labels.npy"), _npy_bytes(labels))
    info = DatasetInfo(
        folder=folder, md5=archive_md5, sizes={split: len(labels) for split, (_, labels) in splits.items()}, classes=CLASS_NAMES
    )
    storage.write_atomic(posixpath.join(folder, _DONE_MARKER), info.model_dump_json(indent=2).encode())
    logger().info("decoded archive %s: %s", archive_md5, ", ".join(f"{k} {v} images" for k, v in info.sizes.items()))
    return info


def dataset_output_key(storage_url: str, archive_md5: str, **_) -> str | None:
    storage = Storage(storage_url)
    return committed_file_key(storage, posixpath.join(dataset_folder(storage, archive_md5), _DONE_MARKER))


@task(name="decode-archive", cache_key_fn=output_key_fn(dataset_output_key, DatasetInfo))
def decode_archive_task(storage_url: str, archive_path: str, archive_md5: str) -> DatasetInfo:
    info = decode_archive(storage_url, archive_path, archive_md5)
    return remember_output(info, dataset_output_key(storage_url, archive_md5))


def read_rows(storage: Storage, path: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a stored .npy array, reading only those bytes (no read-ahead on object stores)."""
    with storage.fs.open(path, "rb", cache_type="none") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if fortran_order:
            raise ArchiveError(f"{path} is Fortran-ordered: delete the datasets folder and rerun")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        stream.seek(stream.tell() + start * row_bytes)
        data = stream.read((stop - start) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *row_shape))


FLIPPED = "-flipped"
SPLITS = ("train", "test")
# Every view of the data a feature set may hold: the splits, and their horizontal mirrors
# (feature-level augmentation: extracted once, stored beside the originals as splits of their own).
VIEWS = (*SPLITS, *(f"{split}{FLIPPED}" for split in SPLITS))


class Shard(BaseModel):
    """A fixed slice of one view of a split: the unit of extraction, storage and resume."""

    split: str  # "train", "test", or a mirrored view such as "train-flipped"
    number: int
    start: int
    stop: int

    @property
    def source_split(self) -> str:
        return self.split.removesuffix(FLIPPED)

    @property
    def flipped(self) -> bool:
        return self.split.endswith(FLIPPED)

    @property
    def name(self) -> str:
        return f"{self.split}/{self.number:05d}"

    @property
    def file_name(self) -> str:
        return f"part-{self.number:05d}.parquet"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(sizes: dict[str, int], shard_size: int, flip: bool = False) -> list[Shard]:
    """Cut each split into consecutive shards of `shard_size` images (the last may be smaller).

    With `flip`, the mirrored views follow the originals, so the originals are complete first.
    """
    views = {**sizes, **({f"{split}{FLIPPED}": size for split, size in sizes.items()} if flip else {})}
    return [
        Shard(split=view, number=number, start=start, stop=min(start + shard_size, size))
        for view, size in views.items()
        for number, start in enumerate(range(0, size, shard_size))
    ]


def shard_images(storage_url: str, dataset: DatasetInfo, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    storage = Storage(storage_url)
    images = read_rows(storage, posixpath.join(dataset.folder, f"{shard.source_split}_images.npy"), shard.start, shard.stop)
    labels = read_rows(storage, posixpath.join(dataset.folder, f"{shard.source_split}_labels.npy"), shard.start, shard.stop)
    if shard.flipped:
        images = np.ascontiguousarray(images[:, :, ::-1])  # (row, column, channel): mirror the columns
    return images, labels

