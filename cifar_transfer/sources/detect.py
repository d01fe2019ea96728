"""What a `--source` is, decided in one place: a CIFAR archive, an image folder tree, or a Parquet table.

The config asks only "an archive or a collection?", which the name answers without any I/O; telling a folder
from a table looks at the folder's top (and its split folders) for `.parquet` files.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from cifar_transfer.errors import SourceError
from cifar_transfer.redact import redact
from cifar_transfer.storage import open_url

ARCHIVE_FORMATS = ("cifar10", "cifar100")
COLLECTION_FORMATS = ("folder", "parquet")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
TABLE_FOLDERS = ("data", "train", "test", "validation")  # where a Hub-style table keeps its files


def is_archive(source: str, source_format: str, official: frozenset[str] | set[str] = frozenset()) -> bool:
    """A CIFAR python archive (decoded once), as opposed to a collection read image by image: by the format given,
    else by the name (an official URL, an archive suffix, a URL of one file, a local file)."""
    if source_format != "auto":
        return source_format in ARCHIVE_FORMATS
    path = source.split("?", 1)[0].rstrip("/").lower()
    if source in official or path.endswith(ARCHIVE_SUFFIXES):
        return True
    if _names_a_table(path):
        return False
    return path.startswith(("http://", "https://")) or Path(source).is_file()  # one file: an archive


def collection_format(source: str, source_format: str) -> str:
    """'folder' or 'parquet': as given, else a table when .parquet files sit at the top (or in its split folders)."""
    if source_format in COLLECTION_FORMATS:
        return source_format
    if _names_a_table(source.split("?", 1)[0].rstrip("/").lower()):
        return "parquet"
    fs, root = open_url(source)
    if not fs.isdir(root):
        raise SourceError(f"source {redact(source)!r} is neither a folder nor a .parquet table: check --source")
    top = fs.ls(root, detail=True)
    folders = [entry["name"] for entry in top if entry["type"] == "directory" and posixpath.basename(entry["name"]) in TABLE_FOLDERS]
    names = [entry["name"] for entry in top] + [name for folder in folders for name in fs.ls(folder, detail=False)]
    return "parquet" if any(name.endswith(".parquet") for name in names) else "folder"


def unlabelled_format(selected: dict[str, list[str]], single: bool) -> str | None:
    """Which format reads a SOURCE of images without labels, from the files each format would read of it (in
    `sources.unlabelled.UNLABELLED_FORMATS`'s order, images first): a file named on its own goes to the last format
    that reads it, the first one being the catch-all that decodes any file named (a table is a table, anything else
    an image); files found in a folder or by a glob go to the first format that reads any (the images, else the
    tables). None when no format reads any."""
    order = list(reversed(selected)) if single else list(selected)
    return next((name for name in order if selected[name]), None)


def _names_a_table(path: str) -> bool:
    return path.endswith(".parquet") or any(mark in path for mark in "*?[")
