"""Images without labels, as `predict` and `similar` read them: SOURCE is an image file, a folder (searched
recursively, hidden files skipped), a glob, or any of these at an fsspec URL; or a Parquet table of encoded images
(a file, a folder of them, a glob), a binary column or `datasets`' Image() struct.

A collection source (`sources.base.CollectionSource`) lists labelled items to plan shards and keep a feature set
current; these are read once, in order, with no split, label or version, so they are listed here on the same
file helpers rather than through that protocol.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from fsspec.implementations.local import LocalFileSystem

from cifar_transfer.errors import SourceError
from cifar_transfer.redact import printable, redact
from cifar_transfer.sources.files import MAX_FILE_MB, READ_BATCH, fetch, fetch_error, file_limit, not_a_regular_file, read_bounded, walk
from cifar_transfer.sources.folder import IMAGE_EXTENSIONS
from cifar_transfer.sources.parquet import GLOB_MAGIC, holds_encoded_images, image_bytes, open_parquet, row_group_over_cap
from cifar_transfer.storage import open_url

log = logging.getLogger(__name__)


class UnlabelledImages:
    """The images of SOURCE, listed once (names only), read chunk by chunk as (path, bytes or None, reason)."""

    def __init__(self, source: str, image_column: str | None = None, max_file_mb: float = MAX_FILE_MB):
        self.source = source
        self.image_column = image_column
        self.limit = file_limit(max_file_mb)
        self.fs, path = open_url(source)
        self._local = isinstance(self.fs, LocalFileSystem)
        self._sizes: dict[str, int] = {}  # listed sizes of an object store's files, checked against the cap before a read
        files, single = self._list(path)
        tables = [name for name in files if name.lower().endswith(".parquet") and not (self._local and self._unreadable_table(name))]
        if single:  # a file named on its own is decoded whatever its extension (or reported)
            self.image_files = [] if tables else files
        else:
            self.image_files = [name for name in files if name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS]
        self.tables: list[tuple[str, int]] = []  # (file, rows): SOURCE is a table when it holds no image files
        if not self.image_files:
            if not tables:
                raise SourceError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) or Parquet tables at {redact(source)}")
            self.tables = [(name, self._table_rows(name)) for name in tables]
        if ignored := len(files) - len(self.image_files or tables):
            log.info(
                "images: ignored %d files of %s that are not %s",
                ignored,
                redact(source),
                "images" if self.image_files else "Parquet files",
            )
        self.total = len(self.image_files) + sum(rows for _, rows in self.tables)
        if self.image_files:
            self.path_width = max(len(printable(self._shown(name))) for name in self.image_files)
        else:
            self.path_width = max(len(printable(self._shown(name))) + 1 + len(str(max(rows - 1, 0))) for name, rows in self.tables)

    def _list(self, path: str) -> tuple[list[str], bool]:
        """(files, whether SOURCE names one file): a glob's matches, everything under a folder but hidden entries, or the file."""
        if GLOB_MAGIC.search(path):
            found = {name: info for name, info in self.fs.glob(path, detail=True).items() if info.get("type") != "directory"}
        elif self.fs.isdir(path):
            root = path.rstrip("/") + "/"
            if self._local:
                files, unlisted = walk(path)
                for entry in unlisted:
                    log.warning("images: skipped %s", printable(entry))
                found = {root + key: info for key, info in files.items()}
            else:
                found = {name: info for name, info in self.fs.find(path, detail=True).items() if "/." not in "/" + name.removeprefix(root)}
        elif os.path.lexists(path) if self._local else self.fs.isfile(path):  # a FIFO or a dangling link: reported when read
            self._sizes = {path: 0 if self._local else self.fs.size(path) or 0}
            return [path], True
        else:
            raise SourceError(f"{redact(self.source)} is no file, folder or glob that matches anything: check SOURCE")
        self._sizes = {name: info.get("size") or 0 for name, info in found.items()}
        return sorted(found), False

    def _unreadable_table(self, name: str) -> bool:
        """A local table that is not a regular file (a FIFO would block its reader): logged and left out."""
        if problem := not_a_regular_file(name):
            log.warning("images: skipped %s: %s", printable(name), problem)
        return problem is not None

    def _shown(self, name: str) -> str:
        return name if self._local else redact(self.fs.unstrip_protocol(name))

    def _table_rows(self, name: str) -> int:
        """The table's row count (from its footer), after checking it holds encoded images in the image column."""
        with self.fs.open(name, "rb") as handle:
            parquet = open_parquet(handle, self._shown(name))
            schema = parquet.schema_arrow
            columns = [column.name for column in schema if holds_encoded_images(column.type)]
            if self.image_column is None:
                self.image_column = "image" if "image" in columns else (columns[0] if len(columns) == 1 else None)
            if self.image_column not in columns:
                raise SourceError(
                    f"{self._shown(name)}: no column {self.image_column or 'image'!r} of encoded images (binary, or a struct "
                    f"with binary 'bytes') among {', '.join(schema.names)}: pass --image-column NAME"
                )
            return parquet.metadata.num_rows

    def chunks(self, size: int, first: int | None = None) -> Iterator[list[tuple[str, bytes | None, str | None]]]:
        """(path, bytes, None) or (path, None, reason) for every image in listing order, in lists of `first` rows,
        then each 4 times longer up to `size`: the backbone starts after a few images are decoded, not a whole chunk,
        and each list is decoded while the one before (a quarter as long, or as long) is in the backbone."""
        rows: list[tuple[str, bytes | None, str | None]] = []
        wanted = min(first or size, size)
        for entry in self._files() if self.image_files else self._table_cells():
            rows.append(entry)
            if len(rows) == wanted:
                yield rows
                rows, wanted = [], min(size, 4 * wanted)
        if rows:
            yield rows

    def _files(self) -> Iterator[tuple[str, bytes | None, str | None]]:
        if self._local:
            for name in self.image_files:
                yield name, *read_bounded(name, self.limit)
            return
        sizes = [self._sizes.get(name, 0) for name in self.image_files]
        for name, data in zip(self.image_files, fetch(self.fs, self.image_files, sizes, self.limit), strict=True):
            if isinstance(data, str):
                yield self._shown(name), None, data
            elif isinstance(data, BaseException):
                yield self._shown(name), None, fetch_error(data)
            else:
                yield self._shown(name), data, None

    def _table_cells(self) -> Iterator[tuple[str, bytes | None, str | None]]:
        """Each row's image, a row group at a time; a row group over the cap is not read (its rows say why)."""
        for name, _ in self.tables:
            with self.fs.open(name, "rb") as handle:
                parquet = open_parquet(handle, self._shown(name))
                row = 0
                for group in range(parquet.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    column = self.image_column or "image"  # set from the first table's columns
                    if too_large := row_group_over_cap(parquet, group, column, self.limit, self._shown(name)):
                        yield from ((f"{self._shown(name)}#{number}", None, too_large) for number in range(row, row + rows))
                        row += rows
                        continue
                    for batch in parquet.iter_batches(batch_size=READ_BATCH, row_groups=[group], columns=[column]):
                        for cell in batch.column(0).to_pylist():
                            yield f"{self._shown(name)}#{row}", *image_bytes(cell)
                            row += 1
