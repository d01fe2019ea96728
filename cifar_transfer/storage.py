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
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from functools import cached_property
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cifar_transfer import layout
from cifar_transfer.errors import ConfigError, StorageFull, StorageNotWritable
from cifar_transfer.redact import redact

log = logging.getLogger(__name__)


OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 60.0
DEFAULT_HOLD_SECONDS = 3600.0  # how long a claim may be held when its writer gives no estimate


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

    @contextlib.contextmanager
    def claim(self, path: str, hold_seconds: float | None = None) -> Iterator[Claim]:
        """Be the only writer of `path` across all runs and machines while the block runs (see `Claim`).

        `hold_seconds` (DEFAULT_HOLD_SECONDS when None) is how long the block may run: a writer still
        holding the claim after that is presumed stuck and may be taken over, which the block can see
        in the yielded claim's `lost`.
        """
        held = Claim(self, path, hold_seconds)
        held.acquire()
        try:
            yield held
        finally:
            held.release()

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"


class Claim:
    """The right to produce one file, held by one writer among all the runs that share the storage.

    A claim is a hidden file next to the output (`.part-00012.parquet.claim`) made with an exclusive
    create: on local disk a hard link to a complete temporary file, which fails if the name exists; on
    S3 a conditional PUT (`If-None-Match: *`). It names its holder and a deadline (wall-clock time, set
    when the claim is acquired and never moved), and the holder rewrites it every HEARTBEAT_SECONDS.
    A waiter takes it over when the holder is a dead process on this host, is past its deadline (a
    heartbeat proves a live process, not progress, so a stuck holder must not keep the claim forever),
    or has not rewritten it for STALE_AFTER_SECONDS (a holder on another machine that died). Deadlines
    compare the clocks of different machines, so they shift by the clocks' skew.

    Every change to an existing claim (heartbeat, takeover, release) is made while holding its guard,
    `.part-00012.parquet.claim.lock`, also made with an exclusive create, after reading the claim again
    under it: a takeover goes ahead only if the claim is still, byte for byte, the one judged abandoned;
    a heartbeat or a release only if the claim still names this holder. So of many waiters racing on
    one abandoned claim exactly one replaces it and the others wait for the new holder, and a holder
    that was taken over never touches its successor's claim: it finds out at its next heartbeat or at
    release, and sets `lost`. A guard is held for milliseconds; one whose maker died holding it is
    removed like an abandoned claim, and only then (or if its maker stalls for STALE_AFTER_SECONDS
    inside those milliseconds) can two writers hold one claim.

    Prefect's global concurrency limits were the first choice, but a slot held by a killed run is freed
    only when its lease expires, by the server's repossessor service, which ephemeral and test servers
    do not run (measured: still held 150 s after a kill -9), so the rerun after a crash would hang.
    Correctness never rests on the claim: every commit is atomic and shards are deterministic, so a
    claim wrongly taken over costs duplicate work, never a damaged file.
    """

    def __init__(self, storage: Storage, path: str, hold_seconds: float | None = None):
        self.storage = storage
        self.path = layout.claim_file(path)
        self.guard = self.path + ".lock"
        self.hold_seconds = DEFAULT_HOLD_SECONDS if hold_seconds is None else hold_seconds
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.deadline = 0.0
        self.lost = False  # another writer took the claim over: this one must not count on it any more
        self._guard_made = b""
        self._guard_seen, self._guard_seen_since = b"", 0.0
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"claim {posixpath.basename(path)}", daemon=True)

    def _content(self, beat: int) -> bytes:
        return json.dumps({**self.holder, "deadline": self.deadline, "beat": beat}).encode()

    def _create(self, path: str, content: bytes) -> bool:
        """Make `path` holding `content` unless it exists, all at once: an empty file could not tell its makers apart."""
        if self.storage.is_local:
            temp = layout.temp_file(path)
            try:
                with self.storage.explaining_write_errors(path, len(content)):
                    os.makedirs(posixpath.dirname(path), exist_ok=True)
                    with open(temp, "wb") as stream:
                        stream.write(content)
                    os.link(temp, path)  # exclusive like O_EXCL (also on NFS), and `path` appears complete
            except FileExistsError:
                return False
            finally:
                self._remove(temp)
            return True
        fs, created = self.storage.fs, False
        try:
            with self.storage.explaining_write_errors(path, len(content)):
                fs.makedirs(posixpath.dirname(path), exist_ok=True)
                with fs.open(path, "xb") as stream:  # on S3 one conditional PUT: all or nothing
                    created = True
                    stream.write(content)
        except FileExistsError:
            return False
        except BaseException:
            if created:  # a store that made the file before its content came
                self._remove(path)
            raise
        return True

    def _read(self, path: str) -> bytes | None:
        try:
            return self.storage.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.storage.fs.rm(path)

    def acquire(self) -> None:
        """Wait until this writer holds the claim, taking over a claim whose holder is gone or stuck."""
        seen, unchanged_since, delay = None, time.monotonic(), 0.05
        while True:
            self.deadline = time.time() + self.hold_seconds
            if self._create(self.path, self._content(0)):
                break
            content = self._read(self.path)
            if content is None:  # released meanwhile
                continue
            holder = _parse(content)
            if content != seen:
                if seen is None:
                    log.info("waiting for %s: another writer holds it (%s)", self.storage.uri(self.path), holder or "unreadable")
                seen, unchanged_since = content, time.monotonic()
            reason = _abandoned(holder, time.monotonic() - unchanged_since)
            if reason and self._take_over(content, holder, reason):
                break
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        self._heartbeat.start()

    def _take_over(self, content: bytes, holder: dict, reason: str) -> bool:
        """Replace the claim by this writer's if, under the guard, it is still `content`."""
        if not self._lock():
            return False
        try:
            if self._read(self.path) != content:
                return False  # renewed, released or taken over since it was judged
            self.storage.write_atomic(self.path, self._content(0))
        finally:
            self._unlock()
        log.warning("took over %s: its holder %s %s", self.storage.uri(self.path), holder or "(unreadable)", reason)
        return True

    def _lock(self) -> bool:
        """Make the guard; a guard whose maker is gone is removed, for the next try to make."""
        made = json.dumps({**self.holder, "nonce": uuid.uuid4().hex}).encode()
        if self._create(self.guard, made):
            self._guard_made = made
            return True
        found = self._read(self.guard)
        if found is None:
            return False
        if found != self._guard_seen:
            self._guard_seen, self._guard_seen_since = found, time.monotonic()
        reason = _abandoned(_parse(found), time.monotonic() - self._guard_seen_since)
        if reason:
            log.warning("removing %s: its maker %s %s", self.storage.uri(self.guard), _parse(found) or "(unreadable)", reason)
            self._remove(self.guard)
        return False

    def _unlock(self) -> None:
        """Remove the guard, unless it was removed as abandoned and made again by another writer."""
        if self._read(self.guard) == self._guard_made:
            self._remove(self.guard)

    def _as_holder(self, content: bytes | None) -> bool:
        """Under the guard, rewrite the claim (remove it when `content` is None) if it still names this holder,
        else mark it lost; False while the guard is busy."""
        if not self._lock():
            return False
        try:
            if _parse(self._read(self.path) or b"").get("id") != self.holder["id"]:
                self.lost = True
                log.warning("lost %s: another writer took it over, as this one passed its deadline or stopped renewing it",
                            self.storage.uri(self.path))
            elif content is None:
                self._remove(self.path)
            else:
                self.storage.write_atomic(self.path, content)
        finally:
            self._unlock()
        return True

    def _beat(self) -> None:
        beat = 0
        while not self._stop.wait(HEARTBEAT_SECONDS) and not self.lost:
            beat += 1
            try:  # a beat that finds the guard busy is skipped: a takeover in progress is seen at the next one
                self._as_holder(self._content(beat))
            except (OSError, StorageFull, StorageNotWritable) as exc:  # a missed beat only brings a takeover closer
                log.warning("could not renew %s (%s)", self.storage.uri(self.path), exc)

    def release(self) -> None:
        """Remove the claim if this writer still holds it; never touch a successor's."""
        self._stop.set()
        self._heartbeat.join()
        while not self.lost and not self._as_holder(None):
            time.sleep(0.05)  # the guard is held for milliseconds, or removed once its maker is gone


def _parse(content: bytes) -> dict:
    """A claim's (or guard's) maker; {} when unreadable."""
    try:
        parsed = json.loads(content)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def modified_time(entry: dict) -> float | None:
    """An fsspec info/listing entry's modification time in seconds since the epoch (local disks give `mtime`,
    object stores a date), or None where the filesystem gives none."""
    value = entry.get("mtime") or entry.get("LastModified") or entry.get("updated") or entry.get("last_modified")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value) if isinstance(value, (int, float)) else None


def held_by_live_writer(storage: Storage, path: str) -> bool:
    """Whether a writer that may still be working holds the claim on `path` (so its files must not be touched)."""
    claim = layout.claim_file(path)
    try:
        content, info = storage.fs.cat_file(claim), storage.fs.info(claim)
    except FileNotFoundError:
        return False
    modified = modified_time(info)
    return _abandoned(_parse(content), 0.0 if modified is None else time.time() - modified) is None


def _abandoned(holder: dict, unchanged_for: float) -> str | None:
    """Why a claim (or guard) made by `holder`, unchanged for `unchanged_for` seconds, may be taken; None while it may not."""
    if _dead_here(holder):
        return "is a process of this host that no longer runs"
    deadline = holder.get("deadline")
    if isinstance(deadline, (int, float)) and time.time() > deadline:
        return f"passed its deadline {time.time() - deadline:.0f} s ago and is presumed stuck"
    if unchanged_for > STALE_AFTER_SECONDS:
        return f"has not renewed it for {unchanged_for:.0f} s"
    return None


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
