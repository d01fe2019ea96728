"""Where everything lives under the storage root, local or any fsspec URL.

Every path goes through fsspec, so local disk and object stores share one code
path (the img2dataset way). Writes are atomic, so a reader never sees a partial
file under a final name: on filesystems with a rename, data goes to a hidden
temporary name in the same folder and is renamed into place when complete; object
stores have no rename (a move is a copy then a delete), but an upload becomes
visible only once complete, so data goes straight to its final key.
Credentials and endpoints come from the environment, as fsspec reads them
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from functools import cached_property
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.errors import StorageFull
from tasks.logs import logger

TEMP_SUFFIX = ".tmp"
CLAIM_SUFFIX = ".claim"
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 60.0


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
        """Whether `path` is there now: listings cached by fsspec may predate other runs' writes."""
        self.fs.invalidate_cache(path)
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
        if self.is_object_store:
            self.fs.pipe_file(path, data)  # one PUT (or one completed multipart upload): all or nothing
            return
        with self.open_atomic(path, len(data)) as stream:
            stream.write(data)

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
        temp = self.temp_path(path)
        try:
            with self.space_for(path, size):
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
        folder, name = posixpath.split(path)
        if not self.fs.exists(folder):
            return []
        return [
            entry
            for entry in self.fs.ls(folder, detail=False)
            if posixpath.basename(entry).startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX)
        ]

    @contextlib.contextmanager
    def claim(self, path: str) -> Iterator[None]:
        """Be the only writer of `path` across all runs and machines while the block runs (see `Claim`)."""
        held = Claim(self, path)
        held.acquire()
        try:
            yield
        finally:
            held.release()

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"


class Claim:
    """The right to produce one file, held by one writer among all the runs that share the storage.

    A claim is a hidden file next to the output (`.part-00012.parquet.claim`) made with an exclusive
    create: O_EXCL on local disk, a conditional PUT (`If-None-Match: *`) on S3. Its holder rewrites it
    every HEARTBEAT_SECONDS; a waiter takes it over when the holder is a dead process on this host,
    or when the claim has not changed for STALE_AFTER_SECONDS (a holder on another machine that died).
    Prefect's global concurrency limits were the first choice, but a slot held by a killed run is freed
    only when its lease expires, by the server's repossessor service, which ephemeral and test servers
    do not run (measured: still held 150 s after a kill -9), so the rerun after a crash would hang.
    Correctness never rests on the claim: every commit is atomic and shards are deterministic, so a
    claim wrongly taken over costs duplicate work, never a damaged file.
    """

    def __init__(self, storage: Storage, path: str):
        folder, name = posixpath.split(path)
        self.storage = storage
        self.path = posixpath.join(folder, f".{name}{CLAIM_SUFFIX}")
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"claim {name}", daemon=True)

    def _content(self, beat: int) -> bytes:
        return json.dumps({**self.holder, "beat": beat}).encode()

    def _create(self) -> bool:
        """Make the claim file unless it exists; a claim file this call made but could not write is removed."""
        fs, content, created = self.storage.fs, self._content(0), False
        try:
            with self.storage.space_for(self.path, len(content)):
                fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
                with fs.open(self.path, "xb") as stream:
                    created = True
                    stream.write(content)
        except FileExistsError:
            return False
        except BaseException:
            if created:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(self.path)
            raise
        return True

    def _read(self) -> bytes | None:
        try:
            return self.storage.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def acquire(self) -> None:
        """Wait until this writer holds the claim, taking over a claim whose holder is gone."""
        seen, unchanged_since, delay = None, time.monotonic(), 0.05
        while not self._create():
            content = self._read()
            if content is None:  # released meanwhile
                continue
            holder = _parse(content)
            if content != seen:
                if seen is None:
                    logger().info("waiting for %s: another writer holds it (%s)", self.storage.uri(self.path), holder or "being created")
                seen, unchanged_since = content, time.monotonic()
            if _dead_here(holder) or time.monotonic() - unchanged_since > STALE_AFTER_SECONDS:
                logger().warning("taking over %s: its holder %s is gone", self.storage.uri(self.path), holder or "(unreadable)")
                with contextlib.suppress(FileNotFoundError):
                    self.storage.fs.rm(self.path)
                continue
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        self._heartbeat.start()

    def _beat(self) -> None:
        beat = 0
        while not self._stop.wait(HEARTBEAT_SECONDS):
            beat += 1
            try:
                if _parse(self._read() or b"").get("id") != self.holder["id"]:
                    return  # taken over: never touch someone else's claim
                self.storage.write_atomic(self.path, self._content(beat))
            except (OSError, StorageFull) as exc:  # a missed beat only brings a takeover closer
                logger().warning("could not renew %s (%s)", self.storage.uri(self.path), exc)

    def release(self) -> None:
        self._stop.set()
        self._heartbeat.join()
        if _parse(self._read() or b"").get("id") == self.holder["id"]:
            with contextlib.suppress(FileNotFoundError):
                self.storage.fs.rm(self.path)


def _parse(content: bytes) -> dict:
    """A claim's holder; {} while a local claim is created but not yet written."""
    try:
        return json.loads(content)
    except ValueError:
        return {}


def _dead_here(holder: dict) -> bool:
    """True when the holder is a process of this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        pass
    return False
