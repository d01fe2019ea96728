"""Listing and reading local image files without trusting what the names say.

A folder handed to the pipeline may hold anything under an image's name: a FIFO (reading it blocks forever), a
link to `/dev/zero` (reading never ends), a sparse 1 GB file, a link loop, a folder it cannot open, a tree deeper
than Python's stack. Listing never fails on such an entry, and reading one never hangs or fills memory:

- `walk` lists a tree with an explicit stack (no recursion) and never follows links into folders; a folder it
  cannot open is returned among the unreadable entries instead of failing the listing.
- `read_bounded` opens without blocking (`O_NONBLOCK`: a FIFO opens at once), checks what the open descriptor
  is (after links are resolved) and its size against the cap, and reads at most the cap; anything else comes back
  as a one-line reason, so the image is skipped and listed like an undecodable one.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from fsspec import AbstractFileSystem

from cifar_transfer.redact import redact

READ_BATCH = 64  # files an object store fetches at once: a batch's reads overlap their round trips
MAX_FILE_MB = 256.0  # far above any real image (a 100-megapixel 16-bit TIFF is 600 MB: raise it with --max-file-mb)
GONE = "file not found: deleted or moved since the collection was listed"
_CHUNK = 1 << 20
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_limit(max_file_mb: float) -> int:
    """The cap in bytes for a `--max-file-mb` value."""
    return int(max_file_mb * 2**20)


def over_limit(size: int, limit: int) -> str:
    return f"file is {size:,} bytes, over the cap of {limit:,} bytes (raise --max-file-mb if it is a real image)"


@dataclass(frozen=True)
class NamedFiles:
    """The files a SOURCE of images without labels names, listed once: every file of a folder (hidden entries
    left out), a glob's matches, or the one file named (`single`), sorted, with the sizes listed. Each format's
    reader (`sources.unlabelled.UNLABELLED_FORMATS`) picks the files it reads from these."""

    source: str
    fs: AbstractFileSystem
    local: bool
    files: list[str]
    sizes: dict[str, int]  # an object store's listed sizes, checked against the cap before a read
    single: bool

    def shown(self, name: str) -> str:
        """A file as rows and messages show it: a local path as is, a URL without its secrets."""
        return name if self.local else redact(self.fs.unstrip_protocol(name))


def walk(root: str) -> tuple[dict[str, dict], list[str]]:
    """Every non-hidden entry below `root` that is not a folder, by key (its path below the root) with the `size` and
    `mtime` fsspec's `find(detail=True)` gives (a link: its target's size, 0 when dangling; its own mtime), and the
    folders that could not be listed, each with the reason. A link to a folder is an entry, never followed."""
    files: dict[str, dict] = {}
    unreadable: list[str] = []
    if not os.path.isdir(root):  # a missing root lists as empty, as with fsspec: "holds no images" says the rest
        return files, unreadable
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            with os.scandir(folder) as entries:
                found = list(entries)
        except OSError as error:
            unreadable.append(f"{prefix.rstrip('/')}: cannot list the folder: {os_reason(error)}")
            continue
        for entry in found:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, f"{prefix}{entry.name}/"))
                    continue
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted while listed
                continue
            except OSError as error:
                unreadable.append(f"{prefix}{entry.name}: cannot read the entry: {os_reason(error)}")
                continue
            size = _target_size(entry.path) if stat.S_ISLNK(status.st_mode) else status.st_size
            files[prefix + entry.name] = {"size": size, "mtime": status.st_mtime}
    return files, unreadable


def _target_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # a dangling link or a loop: fsspec gives it size 0
        return 0


def not_a_regular_file(path: str) -> str | None:
    """Why the local `path` (links resolved) is not a regular file to open, or None: for files a library opens itself
    (a Parquet table), where opening a FIFO would block."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return f"cannot read the file: {os_reason(error)}"
    return None if stat.S_ISREG(mode) else _kind(mode)


def _kind(mode: int) -> str:
    return "not a regular file: " + next((name for test, name in _KINDS if test(mode)), "of an unknown kind")


def read_bounded(path: str, limit: int) -> tuple[bytes | None, str | None]:
    """The bytes of the regular file at `path` (links resolved), or None and why not: not a regular file, over
    `limit` bytes, or unreadable. Never blocks on a FIFO, never reads more than `limit` bytes."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, GONE
    except OSError as error:
        return None, f"cannot read the file: {os_reason(error)}"
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            return None, _kind(status.st_mode)
        if status.st_size > limit:
            return None, over_limit(status.st_size, limit)
        os.set_blocking(descriptor, True)
        parts, total = [], 0
        while part := os.read(descriptor, min(_CHUNK, limit + 1 - total)):
            parts.append(part)
            total += len(part)
            if total > limit:  # the file grew since fstat
                return None, over_limit(total, limit)
        return b"".join(parts), None
    except OSError as error:
        return None, f"cannot read the file: {os_reason(error)}"
    finally:
        os.close(descriptor)


def fetch(fs: AbstractFileSystem, paths: list[str], sizes: list[int], limit: int) -> Iterator[bytes | BaseException | str]:
    """For each path of an object store, in order: its bytes, the error fsspec met, or (a listed size over `limit`)
    the reason it was not fetched. Fetched `READ_BATCH` at a time, concurrently."""
    for start in range(0, len(paths), READ_BATCH):
        batch = list(zip(paths[start : start + READ_BATCH], sizes[start : start + READ_BATCH], strict=True))
        wanted = [path for path, size in batch if size <= limit]
        fetched = iter(fs.cat_ranges(wanted, None, None, on_error="return"))
        for _, size in batch:
            yield next(fetched) if size <= limit else over_limit(size, limit)


def read_files(
    fs: AbstractFileSystem, local: bool, paths: list[str], sizes: list[int], limit: int
) -> Iterator[bytes | BaseException | str]:
    """For each path, in order: its bytes, the error an object store's read met, or why it was not read (a local
    file's `read_bounded` reason, an object's listed size over `limit`)."""
    if not local:
        yield from fetch(fs, paths, sizes, limit)
        return
    for path in paths:
        data, reason = read_bounded(path, limit)
        yield data if data is not None else str(reason)


def fetch_error(error: BaseException) -> str:
    """What an object store's failed read says, in one line and without secrets."""
    return f"cannot read the file: {redact(' '.join(str(error).split())) or type(error).__name__}"


def os_reason(error: OSError) -> str:
    """An OSError in one line without the path (the caller names the entry)."""
    if error.errno == errno.ELOOP:
        return "a symbolic link loop"
    if error.errno == errno.ENXIO:
        return "not a regular file: a socket or a device without a reader"
    return error.strerror or type(error).__name__
