"""The decoded dataset in storage: images (uint8, N x 32 x 32 x 3) and labels as .npy files, decoded once.

A shard then reads just its rows (byte ranges on object stores). The dataset is done when its marker and
every array are there at their recorded sizes, so a deleted or truncated array is decoded again.
"""

from __future__ import annotations

import logging
import posixpath

import numpy as np
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.cifar import archive_format_named, archive_format_of, read_archive
from cifar_transfer.claims import claim
from cifar_transfer.errors import ArchiveError
from cifar_transfer.shards import Shard, ShardRows, plan_shards
from cifar_transfer.sources.base import UnreadableItem
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)


class DatasetInfo(BaseModel):
    """The decoded dataset in storage: where it is and how many images each split has."""

    folder: str
    md5: str
    sizes: dict[str, int]
    classes: list[str]
    bytes: dict[str, int]  # each array file's size
    format: str  # the archive format
    label_mode: str | None  # the label set, where the format has several (CIFAR-100: "fine" or "coarse")

    @property
    def id(self) -> str:
        return dataset_id(self.md5, self.format, self.label_mode)

    @property
    def collection(self) -> None:
        return None  # an archive is known by its id: its decoded arrays, or its copy under raw/

    @property
    def unusable(self) -> dict[str, list[UnreadableItem]]:
        return {}  # every row of an archive has its label

    def plan_shards(self, storage: Storage, folder: str, shard_size: int, flip: bool) -> tuple[list[Shard], dict[str, list[str]]]:
        return plan_shards(self.sizes, shard_size, flip), {}  # fixed row ranges: nothing is ever retired

    def shard_rows(self, storage_url: str, shard: Shard, input_size: int) -> tuple[np.ndarray, ShardRows]:
        """The shard's rows at the archive's 32 px (the model brings them to `input_size`); ids are row positions."""
        images, labels = shard_images(storage_url, self, shard)
        return images, ShardRows(labels=labels, ids=np.arange(shard.start, shard.stop, dtype=np.int64))

    def calibration_rows(self, storage_url: str, count: int, input_size: int) -> tuple[np.ndarray, np.ndarray]:
        first = Shard(split="train", number=0, start=0, stop=min(count, self.sizes["train"]))
        return shard_images(storage_url, self, first)


def read_marker(storage: Storage, path: str) -> DatasetInfo:
    return records.DATASET.load(DatasetInfo, storage.read_bytes(path), storage.uri(path), storage.root)


def _write_npy(storage: Storage, path: str, array: np.ndarray) -> int:
    """Write `array` as a .npy file atomically, straight from its memory (no copy of it as bytes); its size."""
    with storage.open_atomic(path, array.nbytes) as stream:
        np.lib.format.write_array(stream, array, allow_pickle=False)
        return stream.tell()


def dataset_id(archive_md5: str, archive_format: str = "cifar10", label_mode: str | None = None) -> str:
    """What names decoded images in the features' fingerprint and in storage (`layout.dataset_files`): a CIFAR-10
    archive's MD5, as it always was; else `<format>[-<label set>]-<md5>` (`cifar100-coarse-<md5>`), since the
    label set changes the labels stored with the features."""
    if archive_format == "cifar10":
        return archive_md5
    found = archive_format_named(archive_format)
    mode = found.label_mode_name(label_mode)
    return f"{found.name}-{archive_md5}" if mode is None else f"{found.name}-{mode}-{archive_md5}"


def parse_dataset_id(identifier: str) -> tuple[str, str, str]:
    """(archive format, label mode, archive MD5) of a `dataset_id`: the one reader of the form it writes."""
    *named, md5 = identifier.split("-")
    if not named:
        return "cifar10", "fine", md5
    return named[0], named[-1] if len(named) > 1 else "fine", md5


def _dataset_files(storage: Storage, archive_md5: str, archive_format: str, label_mode: str | None) -> layout.DatasetFiles:
    return layout.dataset_files(storage, dataset_id(archive_md5, archive_format, label_mode))


def resolved_format(storage: Storage, archive_path: str, archive_format: str, label_mode: str | None) -> tuple[str, str | None]:
    """The archive's format ("auto": read from its first header) and the label mode it has (None for CIFAR-10's one set)."""
    if archive_format == "auto":
        with storage.fs.open(archive_path, "rb") as stream:
            archive_format = archive_format_of(stream)
    return archive_format, label_mode if label_mode in archive_format_named(archive_format).label_modes else None


def finished_dataset(
    storage_url: str, archive_md5: str, archive_format: str = "cifar10", label_mode: str | None = None
) -> DatasetInfo | None:
    """The decoded dataset if its marker and every array are there (at their recorded sizes), else None."""
    storage = Storage(storage_url)
    files = _dataset_files(storage, archive_md5, archive_format, label_mode)
    if not storage.exists(files.marker):
        return None
    info = read_marker(storage, files.marker)
    for path in files.paths():
        if path == files.marker:
            continue
        name = path.rsplit("/", 1)[-1]
        if not storage.exists(path) or name in info.bytes and storage.fs.size(path) != info.bytes[name]:
            log.warning("decoded dataset %s lacks a complete %s: decoding the archive again", archive_md5, name)
            return None
    return info


def decode_archive(
    storage_url: str, archive_path: str, archive_md5: str, archive_format: str = "cifar10", label_mode: str | None = None
) -> DatasetInfo:
    """Decode the archive once into .npy arrays (one decoder at a time); the marker file is written last.

    `archive_format` "auto" reads the format from the archive's first header, as the folder is named by it; a
    `label_mode` the format does not have (CIFAR-10 has one label set) is ignored.
    """
    storage = Storage(storage_url)
    archive_format, label_mode = resolved_format(storage, archive_path, archive_format, label_mode)
    done = finished_dataset(storage_url, archive_md5, archive_format, label_mode)
    if done is not None:
        return done
    files = _dataset_files(storage, archive_md5, archive_format, label_mode)
    with claim(storage, files.marker):
        done = finished_dataset(storage_url, archive_md5, archive_format, label_mode)
        return done or _decode(storage, files, archive_path, archive_md5, archive_format, label_mode)


def _decode(
    storage: Storage, files: layout.DatasetFiles, archive_path: str, archive_md5: str, archive_format: str, label_mode: str | None
) -> DatasetInfo:
    with storage.fs.open(archive_path, "rb") as stream:
        content = read_archive(stream, archive_format, label_mode)
    splits = content.splits
    sizes = {}
    for split, (images, labels) in splits.items():
        for kind, array in (("images", images), ("labels", labels)):
            path = files.array(split, kind)
            sizes[path.rsplit("/", 1)[-1]] = _write_npy(storage, path, array)
    info = DatasetInfo(
        folder=files.folder,
        md5=archive_md5,
        sizes={split: len(labels) for split, (_, labels) in splits.items()},
        classes=content.classes,
        bytes=sizes,
        format=content.format,
        label_mode=content.label_mode,
    )
    storage.write_atomic(files.marker, records.DATASET.dump(info, root=storage.root))
    log.info("decoded archive %s: %s", archive_md5, ", ".join(f"{k} {v} images" for k, v in info.sizes.items()))
    return info


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


def stored_rows(storage: Storage, path: str, rows: np.ndarray) -> np.ndarray:
    """Chosen rows of a stored .npy array: memory-mapped on local disk (only those rows are read), whole elsewhere."""
    if storage.is_local:
        return np.load(path, mmap_mode="r", allow_pickle=False)[rows]
    with storage.fs.open(path, "rb") as stream:
        return np.load(stream, allow_pickle=False)[rows]


def shard_images(storage_url: str, dataset: DatasetInfo, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one shard (mirrored for a flipped view)."""
    storage = Storage(storage_url)
    files = layout.dataset_files_in(dataset.folder)
    images = read_rows(storage, files.array(shard.source_split, "images"), shard.start, shard.stop)
    labels = read_rows(storage, files.array(shard.source_split, "labels"), shard.start, shard.stop)
    if shard.flipped:
        images = np.ascontiguousarray(images[:, :, ::-1])  # (row, column, channel): mirror the columns
    return images, labels


def decoded_problems(storage_url: str, dataset_id: str) -> dict[str, list[str]]:
    """Problems of the decoded dataset a feature set was made from (paths relative to the storage root)."""
    storage = Storage(storage_url)
    files = layout.dataset_files(storage, dataset_id)
    if not storage.exists(files.marker) or finished_dataset(storage_url, dataset_id) is not None:
        return {}  # never decoded here (features may come from elsewhere), or complete
    problems = {}
    info = read_marker(storage, files.marker)
    for path in files.paths()[:-1]:
        name = posixpath.basename(path)
        if not storage.exists(path):
            problems[posixpath.relpath(path, storage.root)] = ["missing: decoded again by `verify --repair` or the next run"]
        elif name in info.bytes and storage.fs.size(path) != info.bytes[name]:
            problems[posixpath.relpath(path, storage.root)] = [f"{storage.fs.size(path)} bytes, decoded it had {info.bytes[name]}"]
    return problems


def remove_damaged_decoded(storage_url: str, dataset_id: str, problems: dict[str, list[str]]) -> None:
    """Delete the damaged arrays and the dataset's marker, so the next extraction decodes the archive again."""
    storage = Storage(storage_url)
    files = layout.dataset_files(storage, dataset_id)
    for relative in problems:
        path = storage.path(relative)
        if path in files.paths() and storage.exists(path):
            storage.fs.rm(path)
            log.warning("removed damaged %s", storage.uri(path))
    if problems and storage.exists(files.marker):
        storage.fs.rm(files.marker)
