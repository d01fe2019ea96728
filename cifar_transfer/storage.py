"""Where everything lives under the storage root, local or any fsspec URL.

Every path goes through fsspec, so local disk and object stores share one code
path (the img2dataset way). Writes are atomic, so a reader never sees a partial
file under a final name: on filesystems with a rename, data goes to a hidden
temporary name in the same folder and is renamed into place when complete; object
stores have no rename (a move is a copy then a delete), but an upload becomes
visible only once complete, so data goes straight to its final key.
Credentials and endpoints come from the environment, as fsspec reads them
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...), or from a source of fsspec
options the caller sets (`set_storage_options`: the Prefect layer reads a block), asked when a storage is opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import cached_property
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cifar_transfer import layout
from cifar_transfer.errors import ConfigError, StorageFull, StorageNotWritable
from cifar_transfer.redact import redact

log = logging.getLogger(__name__)


OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def file_md5(path: str, fs: fsspec.AbstractFileSystem | None = None, chunk_size: int = 4 << 20) -> str:
    """MD5 of a file on any filesystem (local by default), read in chunks."""
    digest = hashlib.md5()
    with (fs or LocalFileSystem()).open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# The fsspec options (credentials, endpoint) of a storage URL beyond what fsspec reads from the environment, or None.
StorageOptions = Callable[[str], dict[str, Any]]
_storage_options: StorageOptions | None = None


def set_storage_options(source: StorageOptions | None) -> None:
    """Where every storage opened from now on in this process gets its fsspec options: `source(url)` is asked when a
    storage is opened and its answer goes to fsspec only (never logged, stored or returned); None: the environment only."""
    global _storage_options
    _storage_options = source


def open_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of any URL the pipeline reads or writes (storage roots and sources alike), with the
    options `set_storage_options` gives it.

    fsspec's listings cache is off: runs and other processes share these places, and a listing cached by one
    thread (or fetched before another run's write and stored after it) would hide files that are there.
    """
    options = {"use_listings_cache": False, **(_storage_options(url) if _storage_options else {})}
    return fsspec.core.url_to_fs(url, **options)


class Storage:
    """The storage root and the layout of everything the pipeline writes under it."""

    def __init__(self, url: str):
        self.url = url

    @cached_property
    def _fs_and_root(self):
        return open_url(self.url)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_and_root[0]

    @property
    def root(self) -> str:
        return self._fs_and_root[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def is_object_store(self) -> bool:
        """S3, GCS, Azure: no rename, but an upload is visible only once complete."""
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        return bool(protocols & OBJECT_STORES)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, path: str) -> str:
        """A path as a URL people and other tools can open."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        """Whether `path` is there now (asked of the store: see `_fs_and_root`)."""
        return self.fs.exists(path)

    def check_writable(self, folder: str, what: str) -> None:
        """`ConfigError` naming `folder` and why, unless a file can be written in it (or, where it does not exist yet,
        in the nearest folder above it that does): checked before any work, so a wrong place fails in a second
        instead of after the work, or after retries. Creates nothing."""
        place = folder
        while self.is_local and not os.path.exists(place) and posixpath.dirname(place) != place:
            place = posixpath.dirname(place)
        probe = posixpath.join(place, f".cifar-transfer-write-check-{os.getpid()}")
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm(probe)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise ConfigError(f"cannot write {what} to {redact(self.uri(folder))} ({reason}): choose a place you can write to") from None

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_frame(self, path: str):
        """A Parquet file on this storage (a map's embedding, a head's predictions, an audit table) as a DataFrame."""
        import pyarrow.parquet as pq

        with self.fs.open(path, "rb") as stream:
            return pq.read_table(stream).to_pandas()

    @contextlib.contextmanager
    def explaining_write_errors(self, path: str, size: int | None = None) -> Iterator[None]:
        """Turn "no space left on device" and "read-only" or "permission denied" into one line naming the storage and
        what to do (finished work is kept either way)."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                needed = f"{size / 1e6:.1f} MB" if size is not None else "more space"
                raise StorageFull(
                    f"storage {redact(self.url)} is full: writing {posixpath.basename(path)} needs {needed}; "
                    "free some space (or use another --storage) and rerun: finished work is kept"
                ) from None
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR):
                raise StorageNotWritable(
                    f"storage {redact(self.url)} cannot be written ({exc.strerror}) and this run has {posixpath.basename(path)} to "
                    "write: give it write access or use another --storage (a complete feature set is reused read-only)"
                ) from None
            raise

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write `data` to `path` so that `path` either does not exist or is complete."""
        if self.is_object_store:
            self.fs.pipe_file(path, data)  # one PUT (or one completed multipart upload): all or nothing
            return
        with self.open_atomic(path, len(data)) as stream:
            stream.write(data)

    def write_if_changed(self, path: str, data: bytes) -> None:
        """`write_atomic`, unless `path` already holds exactly `data`: a rerun writes nothing (and works on a
        read-only storage)."""
        if self.exists(path) and self.fs.size(path) == len(data) and self.read_bytes(path) == data:
            return
        self.write_atomic(path, data)

    @contextlib.contextmanager
    def open_atomic(self, path: str, size: int | None = None) -> Iterator[BinaryIO]:
        """A stream whose bytes appear at `path`, complete, when the block ends cleanly, and never otherwise."""
        if self.is_object_store:
            # An uncommitted upload to the final key (fsspec's autocommit=False): completed on success, aborted on error.
            stream = self.fs.open(path, "wb", autocommit=False)
            try:
                with stream:
                    yield stream
            except BaseException:
                stream.discard()
                raise
            stream.commit()
            return
        temp = layout.temp_file(path)
        try:
            with self.explaining_write_errors(path, size):
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                with self.fs.open(temp, "wb") as stream:
                    yield stream
                    if self.is_local:
                        stream.flush()
                        os.fsync(stream.fileno())
                if self.is_local:
                    os.replace(temp, path)
                else:
                    self.fs.mv(temp, path)
        finally:
            if self.fs.exists(temp):
                self.fs.rm(temp)

    def stale_temp_files(self, path: str) -> list[str]:
        """Temporary files left behind by writers of `path` that never committed (only while holding its claim)."""
        folder = posixpath.dirname(path)
        if not self.fs.exists(folder):
            return []
        return [entry for entry in self.fs.ls(folder, detail=False) if layout.is_temp_file_of(entry, path)]

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"


# Where filesystems put what changes when a file is rewritten: local and SFTP (mtime), S3 and Azure (ETag,
# LastModified), GCS (etag, updated), memory (created: a rewrite is a new file).
STAMP_FIELDS = ("mtime", "ETag", "etag", "LastModified", "last_modified", "updated", "created")


def file_stamp(entry: dict) -> str:
    """What changes whenever the file of an fsspec info/listing entry is rewritten, on any filesystem ("" if none)."""
    return str(next((entry[field] for field in STAMP_FIELDS if entry.get(field)), ""))


def modified_time(entry: dict) -> float | None:
    """An fsspec info/listing entry's modification time in seconds since the epoch (local disks give `mtime`,
    object stores a date), or None where the filesystem gives none."""
    value = entry.get("mtime") or entry.get("LastModified") or entry.get("updated") or entry.get("last_modified")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value) if isinstance(value, (int, float)) else None
