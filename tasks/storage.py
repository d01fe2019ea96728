"""Where everything lives under the storage root, local or any fsspec URL.

Every path goes through fsspec, so local disk and object stores share one code
path (the img2dataset way). Writes are atomic: data goes to a hidden temporary
name in the same folder and is renamed into place only when complete, so a
reader never sees a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from functools import cached_property

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.errors import StorageFull

TEMP_SUFFIX = ".tmp"


def file_md5(path: str, fs: fsspec.AbstractFileSystem | None = None, chunk_size: int = 4 << 20) -> str:
    """MD5 of a file on any filesystem (local by default), read in chunks."""
    digest = hashlib.md5()
    with (fs or LocalFileSystem()).open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class Storage:
    """The storage root and the layout of everything the pipeline writes under it."""

    def __init__(self, url: str):
        self.url = url

    @cached_property
    def _fs_and_root(self):
        return fsspec.core.url_to_fs(self.url)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_and_root[0]

    @property
    def root(self) -> str:
        return self._fs_and_root[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, path: str) -> str:
        """A path as a URL people and other tools can open."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def temp_path(self, path: str) -> str:
        """A hidden sibling name: ignored by Parquet readers and globs, unique per writer."""
        folder, name = posixpath.split(path)
        return posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")

    @contextlib.contextmanager
    def space_for(self, path: str, size: int | None = None) -> Iterator[None]:
        """Turn "no space left on device" into one line naming the storage and the space needed."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            needed = f"{size / 1e6:.1f} MB" if size is not None else "more space"
            raise StorageFull(
                f"storage {self.url} is full: writing {posixpath.basename(path)} needs {needed}; "
                "free some space (or use another --storage) and rerun: finished work is kept"
            ) from None

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write `data` to `path` so that `path` either does not exist or is complete."""
        folder = posixpath.dirname(path)
        temp = self.temp_path(path)
        try:
            with self.space_for(path, len(data)):
                self._write_then_rename(folder, temp, path, data)
        finally:
            if self.fs.exists(temp):
                self.fs.rm(temp)

    def _write_then_rename(self, folder: str, temp: str, path: str, data: bytes) -> None:
        self.fs.makedirs(folder, exist_ok=True)
        if self.is_local:
            with open(temp, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        else:
            self.fs.pipe_file(temp, data)
        self.commit(temp, path)

    def commit(self, temp: str, path: str) -> None:
        """Rename a fully written temporary file into its final place."""
        if self.is_local:
            os.replace(temp, path)
        else:
            self.fs.mv(temp, path)

    def stale_temp_files(self, path: str) -> list[str]:
        """Temporary files left behind by writers of `path` that never committed."""
        folder, name = posixpath.split(path)
        if not self.fs.exists(folder):
            return []
        return [
            entry
            for entry in self.fs.ls(folder, detail=False)
            if posixpath.basename(entry).startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX)
        ]

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"
