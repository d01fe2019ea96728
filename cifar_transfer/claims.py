"""Claims: one writer per output file among all the runs (and machines) that share a storage.

`claim(storage, path)` holds the claim on `path` while its block runs; `held_by_live_writer` tells whether a
writer that may still be working holds one (eviction and repair leave such files alone). How a claim is made,
renewed and taken over is `Claim`'s docstring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from cifar_transfer import layout
from cifar_transfer.errors import StorageFull, StorageNotWritable
from cifar_transfer.storage import Storage, modified_time

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 60.0
DEFAULT_HOLD_SECONDS = 3600.0  # how long a claim may be held when its writer gives no estimate


@contextlib.contextmanager
def claim(storage: Storage, path: str, hold_seconds: float | None = None) -> Iterator[Claim]:
    """Be the only writer of `path` across all runs and machines while the block runs (see `Claim`).

    `hold_seconds` (DEFAULT_HOLD_SECONDS when None) is how long the block may run: a writer still
    holding the claim after that is presumed stuck and may be taken over, which the block can see
    in the yielded claim's `lost`.
    """
    held = Claim(storage, path, hold_seconds)
    held.acquire()
    try:
        yield held
    finally:
        held.release()


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
                log.warning(
                    "lost %s: another writer took it over, as this one passed its deadline or stopped renewing it",
                    self.storage.uri(self.path),
                )
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
