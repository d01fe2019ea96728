"""Images without labels, as `predict` and `similar` read them: SOURCE is an image file, a folder (searched
recursively, hidden files skipped), a glob, or any of these at an fsspec URL; or a Parquet table of encoded images
(a file, a folder of them, a glob), a binary column or `datasets`' Image() struct.

SOURCE is listed once here (`named_files`); each collection format reads its own files of it (`UNLABELLED_FORMATS`,
keyed as `detect.COLLECTION_FORMATS`: `folder.FolderImages`, `parquet.TableImages`), and `detect.unlabelled_format`
says which one does. A collection source (`sources.base.CollectionSource`) lists labelled items to plan shards and
keep a feature set current; these are read once, in order, with no split, label or version.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from fsspec.implementations.local import LocalFileSystem

from cifar_transfer.errors import SourceError
from cifar_transfer.redact import printable, redact
from cifar_transfer.sources import detect
from cifar_transfer.sources.base import UnlabelledFormat
from cifar_transfer.sources.files import MAX_FILE_MB, NamedFiles, file_limit, walk
from cifar_transfer.sources.folder import FolderImages
from cifar_transfer.sources.parquet import GLOB_MAGIC, TableImages
from cifar_transfer.storage import open_url

log = logging.getLogger(__name__)

# Each collection format's reader of images without labels; the order is `detect.unlabelled_format`'s (images first).
UNLABELLED_FORMATS: dict[str, UnlabelledFormat] = {"folder": FolderImages, "parquet": TableImages}


class UnlabelledImages:
    """The images of SOURCE, listed once (names only), read chunk by chunk as (path, bytes or None, reason)."""

    def __init__(self, source: str, image_column: str | None = None, max_file_mb: float = MAX_FILE_MB):
        self.source = source
        named = named_files(source)
        selected = {name: reader.select(named) for name, reader in UNLABELLED_FORMATS.items()}
        chosen = detect.unlabelled_format(selected, named.single)
        if chosen is None:
            raise SourceError(f"no {' or '.join(reader.wanted for reader in UNLABELLED_FORMATS.values())} at {redact(source)}")
        reader = UNLABELLED_FORMATS[chosen]
        self._images = reader(named, selected[chosen], image_column, file_limit(max_file_mb))
        if ignored := len(named.files) - len(selected[chosen]):
            log.info("images: ignored %d files of %s that are not %s", ignored, redact(source), reader.what)
        self.total = self._images.total
        self.path_width = self._images.path_width

    def chunks(self, size: int, first: int | None = None) -> Iterator[list[tuple[str, bytes | None, str | None]]]:
        """(path, bytes, None) or (path, None, reason) for every image in listing order, in lists of `first` rows,
        then each 4 times longer up to `size`: the backbone starts after a few images are decoded, not a whole chunk,
        and each list is decoded while the one before (a quarter as long, or as long) is in the backbone."""
        rows: list[tuple[str, bytes | None, str | None]] = []
        wanted = min(first or size, size)
        for entry in self._images.rows():
            rows.append(entry)
            if len(rows) == wanted:
                yield rows
                rows, wanted = [], min(size, 4 * wanted)
        if rows:
            yield rows


def named_files(source: str) -> NamedFiles:
    """The files SOURCE names: a glob's matches, everything under a folder but hidden entries, or the one file."""
    fs, path = open_url(source)
    local = isinstance(fs, LocalFileSystem)
    if GLOB_MAGIC.search(path):
        found = {name: info for name, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
    elif fs.isdir(path):
        root = path.rstrip("/") + "/"
        if local:
            files, unlisted = walk(path)
            for entry in unlisted:
                log.warning("images: skipped %s", printable(entry))
            found = {root + key: info for key, info in files.items()}
        else:
            found = {name: info for name, info in fs.find(path, detail=True).items() if "/." not in "/" + name.removeprefix(root)}
    elif os.path.lexists(path) if local else fs.isfile(path):  # a FIFO or a dangling link: reported when read
        return NamedFiles(source, fs, local, [path], {path: 0 if local else fs.size(path) or 0}, single=True)
    else:
        raise SourceError(f"{redact(source)} is no file, folder or glob that matches anything: check SOURCE")
    return NamedFiles(source, fs, local, sorted(found), {name: info.get("size") or 0 for name, info in found.items()}, single=False)
