"""A Parquet table of encoded images as a collection: what Hugging Face `datasets` writes for an `Image()`
feature (a struct of `bytes` and `path`), or any table with a binary image column and an integer label column.

Listing reads each file's footer and its label column, never the images. An item is "<file>#<row>" and its
version is its file's identity (size and ETag/mtime), so a new file adds items while the old ones keep their
versions, and a rewritten file re-extracts its own rows only. Reading fetches the image column of just the row
groups that hold the requested rows, one row group at a time.

Splits follow the Hub's file names: a file whose name starts with `train` or `test` (`train-00000-of-00002.parquet`,
`test.parquet`), or that lies under a folder named so. Validation files (`validation*`, `valid*`) are the test
split when no file is named `test`, and are skipped otherwise. A table whose files do not name both a train and
a test (or validation) split is split per row by a seeded hash of the item's key, which a new file never changes
for the rows already there.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cifar_transfer.errors import ConfigError, SourceError
from cifar_transfer.redact import printable, redact
from cifar_transfer.sources.base import SPLITS, Item, Listing, UnreadableItem
from cifar_transfer.sources.files import (
    MAX_FILE_MB,
    READ_BATCH,
    NamedFiles,
    file_limit,
    not_a_regular_file,
    over_limit,
    read_bounded,
)
from cifar_transfer.storage import file_stamp, open_url

log = logging.getLogger(__name__)

# `datasets` stores its features as JSON under this schema metadata key:
# {"info": {"features": {"label": {"names": [...], "_type": "ClassLabel"}, "image": {"_type": "Image"}}}}
HF_METADATA_KEY = b"huggingface"

GLOB_MAGIC = re.compile(r"[*?\[]")
CLASSES_FILE_BYTES = 16 << 20
_ROWS_PER_READ = 16  # cells of the image column decoded from the pages at once
_SPLIT_WORDS = {"train": "train", "test": "test", "validation": "validation", "valid": "validation"}
# A split word that starts a file name, followed by anything but a letter ("train-00000-of-00002", "test.parquet"),
# so "trainer.parquet" or "validated.parquet" name no split.
_SPLIT_NAME = re.compile(r"^(train|test|validation|valid)(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class _File:
    path: str  # on the filesystem
    relative: str  # to the source's root: the prefix of its items' keys
    version: str


class ParquetSource:
    """A `CollectionSource` over one Parquet file, a folder of them (recursively, hidden files ignored) or a glob,
    local or at any fsspec URL. `classes_file` (one name per line, or a JSON list) wins over the table's own
    class names; without either, classes are "0".."K-1" up to the largest label."""

    def __init__(
        self,
        source: str,
        image_column: str = "image",
        label_column: str = "label",
        classes_file: str | None = None,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        max_file_mb: float = MAX_FILE_MB,
    ):
        if not 0 < test_fraction < 1:
            raise ConfigError(f"test fraction {test_fraction} is not between 0 and 1: pass e.g. --test-fraction 0.2")
        self.source = source
        self.image_column = image_column
        self.label_column = label_column
        self.classes_file = classes_file
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.limit = file_limit(max_file_mb)
        self.fs, self._path = open_url(source)
        self._is_glob = bool(GLOB_MAGIC.search(self._path))
        self._is_dir = not self._is_glob and self.fs.isdir(self._path)
        self._root = self._find_root().rstrip("/")

    def _find_root(self) -> str:
        """The folder keys are relative to: the source folder, a glob's fixed part, or a single file's folder."""
        if self._is_glob:
            parts = self._path.split("/")
            return "/".join(parts[: next(i for i, part in enumerate(parts) if GLOB_MAGIC.search(part))])
        return self._path if self._is_dir else posixpath.dirname(self._path)

    def _relative(self, path: str) -> str:
        return path[len(self._root) :].lstrip("/") if self._root else path.lstrip("/")

    def _files(self) -> tuple[list[_File], list[str]]:
        """The table's files now, with their identities (from the listing itself, so one call per folder); and the
        local entries that are not regular files (a FIFO named like a table would block its reader), with why."""
        if self._is_glob:
            found = self.fs.glob(self._path, detail=True)
        elif self._is_dir:
            found = {path: info for path, info in self.fs.find(self._path, detail=True).items() if path.endswith(".parquet")}
        else:
            found = {self._path: self.fs.info(self._path)} if self.fs.isfile(self._path) else {}
        files, skipped = [], []
        for path, info in sorted(found.items()):
            relative = self._relative(path)
            hidden = (self._is_glob or self._is_dir) and any(part.startswith(".") for part in relative.split("/"))
            if info.get("type") == "directory" or hidden:
                continue
            if isinstance(self.fs, LocalFileSystem) and (problem := not_a_regular_file(path)):
                skipped.append(f"{relative}: {problem}")
                continue
            files.append(_File(path, relative, _file_version(info)))
        if not files:
            raise SourceError(
                f"no Parquet files at {redact(self.source)}: pass a .parquet file, a folder holding *.parquet files, or a glob"
            )
        return files, skipped

    def list_items(self) -> Listing:
        files, skipped = self._files()
        kinds = {file.relative: _split_of(file.relative) for file in files}
        named = set(kinds.values())
        by_files = "train" in named and bool(named & {"test", "validation"})
        test_kind = "test" if "test" in named else "validation"
        used = []
        for file in files:
            kind = kinds[file.relative]
            if by_files and kind not in ("train", test_kind):
                skipped.append(
                    f"{file.relative}: "
                    + (
                        "a validation split, not used: the test split comes from the test files"
                        if kind
                        else "names no split (train*, test*, validation*) while other files do"
                    )
                )
            else:
                used.append(file)
        if by_files and test_kind == "validation":
            log.info("%s has no test files: its validation files are the test split", redact(self.source))

        labels, names = {}, {}
        for file in used:
            with self.fs.open(file.path, "rb") as handle:
                parquet = open_parquet(handle, file.relative)
                self._check_schema(parquet.schema_arrow, file.relative)
                labels[file.relative] = parquet.read(columns=[self.label_column]).column(0).to_pylist()
                names[file.relative] = _hub_class_names(parquet.schema_arrow.metadata, self.label_column)
        classes = self._classes(names, labels)

        splits: dict[str, list[Item]] = {split: [] for split in SPLITS}
        unusable: dict[str, list[UnreadableItem]] = {split: [] for split in SPLITS}
        for file in used:
            for row, label in enumerate(labels[file.relative]):
                key = f"{file.relative}#{row}"
                split = ("train" if kinds[file.relative] == "train" else "test") if by_files else self._seeded_split(key)
                if label is None:
                    unusable[split].append(UnreadableItem(key=key, reason="no label"))
                elif not 0 <= label < len(classes):
                    unusable[split].append(UnreadableItem(key=key, reason=f"label {label} is not a class index 0..{len(classes) - 1}"))
                else:
                    splits[split].append(Item(key=key, label=label, version=file.version))
        for items in splits.values():
            items.sort(key=lambda item: item.key)
        identity = {
            "format": "parquet",
            "source": self._path if isinstance(self.fs, LocalFileSystem) else redact(self.source),
            "image_column": self.image_column,
            "label_column": self.label_column,
            "split": "files" if by_files else {"test_fraction": self.test_fraction, "split_seed": self.split_seed},
            "classes": classes,
        }
        return Listing(classes=classes, splits=splits, identity=identity, skipped=skipped, unusable=unusable)

    def _check_schema(self, schema: pa.Schema, relative: str) -> None:
        """Refuse a table this source cannot read, naming the option that fixes it."""
        for column, option in ((self.image_column, "--image-column"), (self.label_column, "--label-column")):
            if column not in schema.names:
                raise SourceError(f"{relative} has no column {column!r} (it has {', '.join(schema.names)}): pass {option} NAME")
        image_type = schema.field(self.image_column).type
        if not holds_encoded_images(image_type):
            raise SourceError(
                f"{relative}: column {self.image_column!r} is {image_type}, not encoded images (binary, or a struct with "
                "binary 'bytes' as datasets' Image() writes): pass --image-column NAME"
            )
        label_type = schema.field(self.label_column).type
        if not pa.types.is_integer(label_type):
            raise SourceError(
                f"{relative}: column {self.label_column!r} is {label_type}, not integer class indices: "
                "pass --label-column NAME of an integer column"
            )

    def _classes(self, names: dict[str, list[str] | None], labels: dict[str, list[int | None]]) -> list[str]:
        if self.classes_file:
            return _read_classes_file(self.classes_file)
        distinct = {tuple(found): relative for relative, found in names.items() if found}
        if len(distinct) > 1:
            first, second = list(distinct.values())[:2]
            raise SourceError(f"{first} and {second} name different classes for {self.label_column!r}: pass --classes FILE")
        if distinct:
            return list(next(iter(distinct)))
        largest = max((label for values in labels.values() for label in values if label is not None), default=-1)
        if largest < 0:
            raise SourceError(f"no row of {redact(self.source)} has a label in {self.label_column!r}: pass --label-column NAME")
        log.warning("%s names no classes: using '0'..'%d' (pass --classes FILE to name them)", redact(self.source), largest)
        return [str(index) for index in range(largest + 1)]

    def _seeded_split(self, key: str) -> str:
        """Test for a stable `test_fraction` of the keys: depends on the key and seed only, never on other rows."""
        point = int(hashlib.sha256(f"{self.split_seed}:{key}".encode()).hexdigest()[:8], 16) / 2**32
        return "test" if point < self.test_fraction else "train"

    def read_items(self, items: list[Item]) -> Iterator[tuple[Item, bytes | None, str | None]]:
        """Each item's bytes in the order given. Files are read one at a time, each needed row group once; what
        is read ahead of its turn waits (at most the requested items' bytes) until its item is due."""
        wanted: dict[str, list[tuple[int, int]]] = defaultdict(list)  # file -> (row, index into items)
        ready: dict[int, tuple[bytes | None, str | None]] = {}
        for index, item in enumerate(items):
            relative, _, row = item.key.rpartition("#")
            if relative and row.isdigit():
                wanted[relative].append((int(row), index))
            else:
                ready[index] = (None, f"key {item.key!r} is not '<file>#<row>'")
        due = 0
        for relative, rows in wanted.items():
            for index, data, reason in self._read_rows(relative, rows):
                ready[index] = (data, reason)
                while due in ready:
                    yield items[due], *ready.pop(due)
                    due += 1
        while due in ready:
            yield items[due], *ready.pop(due)
            due += 1

    def _read_rows(self, relative: str, rows: list[tuple[int, int]]) -> Iterator[tuple[int, bytes | None, str | None]]:
        """(index, bytes, reason) for the requested rows of one file, reading the image column per row group."""
        path = posixpath.join(self._root, relative) if self._root else relative
        try:
            handle = self.fs.open(path, "rb")
        except FileNotFoundError:
            yield from ((index, None, f"{relative} is gone (deleted since listing)") for _, index in rows)
            return
        with handle:
            try:
                parquet = open_parquet(handle, relative)
            except SourceError as error:
                yield from ((index, None, str(error)) for _, index in rows)
                return
            if self.image_column not in parquet.schema_arrow.names:
                yield from ((index, None, f"{relative} has no column {self.image_column!r} any more") for _, index in rows)
                return
            ends = list(accumulate(parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups)))
            by_group: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for row, index in rows:
                group = bisect.bisect_right(ends, row)
                if group < len(ends):
                    by_group[group].append((row, index))
                else:
                    yield (
                        index,
                        None,
                        f"row {row} is beyond the {ends[-1] if ends else 0} rows of {relative} (the file shrank since listing)",
                    )
            for group in sorted(by_group):
                if too_large := row_group_over_cap(parquet, group, self.image_column, self.limit, relative):
                    yield from ((index, None, too_large) for _, index in by_group[group])
                    continue
                yield from self._read_group(parquet, group, ends[group - 1] if group else 0, dict(by_group[group]))

    def _read_group(
        self, parquet: pq.ParquetFile, group: int, first: int, wanted: dict[int, int]
    ) -> Iterator[tuple[int, bytes | None, str | None]]:
        """(index, bytes, reason) for the wanted rows (row -> index) of one row group, converted to Python a few rows at
        a time up to the last one wanted."""
        row, last = first, max(wanted)
        for batch in parquet.iter_batches(batch_size=_ROWS_PER_READ, row_groups=[group], columns=[self.image_column]):
            column = batch.column(0)
            for offset in range(len(column)):
                if row + offset in wanted:
                    data, reason = image_bytes(column[offset].as_py())
                    if data is not None and len(data) > self.limit:
                        reason = over_limit(len(data), self.limit)
                        data = None
                    yield wanted[row + offset], data, reason
            row += len(column)
            if row > last:
                return


class TableImages:
    """Parquet tables of encoded images without labels, for predict and similar: each `.parquet` file SOURCE names
    (a local one that is not a regular file is logged and left out), its rows in order, a row group at a time."""

    wanted = "Parquet tables"
    what = "Parquet files"

    @staticmethod
    def select(named: NamedFiles) -> list[str]:
        return [name for name in named.files if name.lower().endswith(".parquet") and not (named.local and _unreadable_table(name))]

    def __init__(self, named: NamedFiles, files: list[str], image_column: str | None, limit: int):
        self.named, self.image_column, self.limit = named, image_column, limit
        self.tables = [(name, self._table_rows(name)) for name in files]
        self.total = sum(rows for _, rows in self.tables)
        self.path_width = max(len(printable(named.shown(name))) + 1 + len(str(max(rows - 1, 0))) for name, rows in self.tables)

    def _table_rows(self, name: str) -> int:
        """The table's row count (from its footer), after checking it holds encoded images in the image column."""
        with self.named.fs.open(name, "rb") as handle:
            parquet = open_parquet(handle, self.named.shown(name))
            schema = parquet.schema_arrow
            columns = [column.name for column in schema if holds_encoded_images(column.type)]
            if self.image_column is None:
                self.image_column = "image" if "image" in columns else (columns[0] if len(columns) == 1 else None)
            if self.image_column not in columns:
                raise SourceError(
                    f"{self.named.shown(name)}: no column {self.image_column or 'image'!r} of encoded images (binary, or a struct "
                    f"with binary 'bytes') among {', '.join(schema.names)}: pass --image-column NAME"
                )
            return parquet.metadata.num_rows

    def rows(self) -> Iterator[tuple[str, bytes | None, str | None]]:
        """Each row's image, a row group at a time; a row group over the cap is not read (its rows say why)."""
        for name, _ in self.tables:
            shown = self.named.shown(name)
            with self.named.fs.open(name, "rb") as handle:
                parquet = open_parquet(handle, shown)
                row = 0
                for group in range(parquet.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    column = self.image_column or "image"  # set from the first table's columns
                    if too_large := row_group_over_cap(parquet, group, column, self.limit, shown):
                        yield from ((f"{shown}#{number}", None, too_large) for number in range(row, row + rows))
                        row += rows
                        continue
                    for batch in parquet.iter_batches(batch_size=READ_BATCH, row_groups=[group], columns=[column]):
                        for cell in batch.column(0).to_pylist():
                            yield f"{shown}#{row}", *image_bytes(cell)
                            row += 1


def _unreadable_table(name: str) -> bool:
    """A local table that is not a regular file (a FIFO would block its reader): logged and left out."""
    if problem := not_a_regular_file(name):
        log.warning("images: skipped %s: %s", printable(name), problem)
    return problem is not None


def row_group_over_cap(parquet: pq.ParquetFile, group: int, image_column: str, limit: int, shown: str) -> str | None:
    """Why the row group's images cannot be read within `limit` bytes, or None. Parquet writers put a row group's
    cells in a few pages (pyarrow: one page per 1,024 values), and a page is read whole, so the column chunk is
    what a read of one row may hold, twice (read, then decoded)."""
    metadata = parquet.metadata.row_group(group)
    size = sum(
        metadata.column(number).total_uncompressed_size
        for number in range(metadata.num_columns)
        if metadata.column(number).path_in_schema.split(".")[0] == image_column
    )
    if size <= limit:
        return None
    return (
        f"{shown}: row group {group} holds {size / 2**20:,.0f} MiB of images, over the cap of {limit / 2**20:,.0f} MiB "
        "read at once: rewrite the table with smaller row groups (pq.write_table(..., row_group_size=100)), or raise --max-file-mb"
    )


def _file_version(info: dict) -> str:
    """size-ETag (or size-mtime): changes whenever the file is rewritten."""
    return f"{info.get('size')}-{file_stamp(info).strip(chr(34))}"


def _split_of(relative: str) -> str | None:
    """The split a file's name, or else its nearest folder named like a split, says it holds."""
    *folders, name = relative.split("/")
    match = _SPLIT_NAME.match(name)
    if match:
        return _SPLIT_WORDS[match.group(1).lower()]
    return next((_SPLIT_WORDS[folder.lower()] for folder in reversed(folders) if folder.lower() in _SPLIT_WORDS), None)


def open_parquet(handle, relative: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except pa.ArrowInvalid as error:  # not OSError: a network failure is transient, retried by the task
        raise SourceError(f"{relative} is not a Parquet file ({error}): point the source at the table's .parquet files only") from error


def holds_encoded_images(data_type: pa.DataType) -> bool:
    if pa.types.is_struct(data_type):
        index = data_type.get_field_index("bytes")
        return index >= 0 and _is_binary(data_type.field(index).type)
    return _is_binary(data_type)


def _is_binary(data_type: pa.DataType) -> bool:
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type) or pa.types.is_binary_view(data_type)


def image_bytes(value: bytes | dict | None) -> tuple[bytes | None, str | None]:
    """A cell's encoded image, or why there is none (a `datasets` row may hold only the path to a file)."""
    if isinstance(value, dict):
        if not value.get("bytes") and value.get("path"):
            return None, f"no image bytes, only the path {value['path']!r}"
        value = value.get("bytes")
    return (value, None) if value else (None, "no image")


def _hub_class_names(metadata: dict[bytes, bytes] | None, label_column: str) -> list[str] | None:
    """The class names `datasets` stored for a ClassLabel column, if it did."""
    try:
        feature = json.loads((metadata or {})[HF_METADATA_KEY])["info"]["features"][label_column]
    except (TypeError, KeyError, ValueError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(name) for name in feature["names"]]
    return None


def _read_classes_file(url: str) -> list[str]:
    """Class names from a file: one per line, or a JSON list; never more than `CLASSES_FILE_BYTES` read (a FIFO or
    `/dev/zero` given as the file is refused, not read forever)."""
    fs, path = open_url(url)
    data: bytes | None
    problem: str | None
    if not (os.path.lexists(path) if isinstance(fs, LocalFileSystem) else fs.exists(path)):
        data, problem = None, "no such file"
    elif isinstance(fs, LocalFileSystem):
        data, problem = read_bounded(path, CLASSES_FILE_BYTES)
    elif (size := fs.size(path)) > CLASSES_FILE_BYTES:
        data, problem = None, over_limit(size, CLASSES_FILE_BYTES)
    else:
        data, problem = fs.cat_file(path), None
    if data is None:
        raise ConfigError(f"classes file {redact(url)}: {problem}; pass --classes FILE with one class name per line")
    text = data.decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"classes file {redact(url)} is not a JSON list ({error}): write one class name per line instead") from error
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(isinstance(name, str) and name for name in names) or len(set(names)) != len(names):
        raise ConfigError(f"classes file {redact(url)} must name each class once (one name per line, or a JSON list of strings)")
    return names
