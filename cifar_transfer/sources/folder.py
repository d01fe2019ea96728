"""An image folder tree as a collection: one folder per class, local or at any fsspec URL.

Two layouts are read:
- `ROOT/train/<class>/...` and `ROOT/test/<class>/...`: the folders give the splits;
- `ROOT/<class>/...`: each image goes to test when a hash of the split seed and its key falls below
  `test_fraction`, so its split never depends on which other files are there: a grown collection keeps
  every image it had in the split it was in, and only the new images are extracted.
Images may sit in subfolders of their class folder. Hidden files and folders (".DS_Store", ".git/") are
ignored; other files that are not images of a class are listed in `Listing.skipped` with the reason.

Listing is one recursive `find` on an object store (a few requests, no request per file) and `files.walk` on a
local disk, so it stays cheap enough to run before every extraction; reading fetches a shard's files in
concurrent batches from an object store, and reads local files with `files.read_bounded`. Only regular files
within the size cap are read; anything else (a FIFO, a device, a link loop or to a folder, an oversized or
unreadable file) is skipped and listed with the reason, like an image that does not decode.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator

from fsspec.implementations.local import LocalFileSystem

from cifar_transfer.errors import ConfigError, SourceError, is_transient
from cifar_transfer.redact import printable, redact
from cifar_transfer.sources.base import SPLITS, Item, Listing
from cifar_transfer.sources.files import GONE, MAX_FILE_MB, NamedFiles, fetch_error, file_limit, read_files, walk
from cifar_transfer.storage import file_stamp, open_url

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
LAYOUTS = "expected ROOT/<class>/<image>, or ROOT/train/<class>/<image> and ROOT/test/<class>/<image>"


class FolderSource:
    """A folder tree of images, one folder per class; see the module docstring for the layouts."""

    def __init__(self, root: str, test_fraction: float = 0.2, split_seed: int = 0, max_file_mb: float = MAX_FILE_MB):
        if not 0.0 <= test_fraction <= 1.0:
            raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
        self.root = root
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.limit = file_limit(max_file_mb)
        self._fs, path = open_url(root)
        self._local = isinstance(self._fs, LocalFileSystem)
        self._path = posixpath.normpath(path) if self._local else path.rstrip("/")  # fsspec made a local path absolute
        self._prefix = self._path.rstrip("/") + "/"
        # The root as the identity and messages show it: a local path as is, a URL without its secrets.
        self._shown_root = self._path if self._local else redact(root.rstrip("/"))

    def list_items(self) -> Listing:
        """What the tree holds now: its classes, its images in each split, and the files that are not images."""
        files, skipped = self._files()
        layout = self._layout({key.split("/", 1)[0] for key in files if "/" in key})

        placed = []  # (key, split, class)
        for key in sorted(files):
            place = self._place(key, layout)
            if place is None:
                where = "ROOT/train/<class>/ or ROOT/test/<class>/" if layout == "train-test-folders" else "a class folder"
                skipped.append(f"{key}: not in {where}")
            elif key.rpartition(".")[2].lower() not in IMAGE_EXTENSIONS:  # no dot: the whole key, never an extension
                skipped.append(f"{key}: not an image file (extension)")
            else:
                placed.append((key, *place))

        classes = sorted({name for _, _, name in placed})
        if not classes:
            raise SourceError(f"{self._shown_root} holds no images in class folders ({len(skipped)} other files): {LAYOUTS}")
        labels = {name: label for label, name in enumerate(classes)}
        splits: dict[str, list[Item]] = {split: [] for split in SPLITS}
        for key, split, name in placed:
            info = files[key]
            splits[split].append(Item(key=key, label=labels[name], version=f"{info.get('size')}-{file_stamp(info)}"))

        identity: dict[str, object] = {"format": "folder", "root": self._shown_root, "layout": layout}
        if layout == "class-folders":
            identity |= {"test_fraction": self.test_fraction, "split_seed": self.split_seed}
        return Listing(classes=classes, splits=splits, identity=identity | {"classes": classes}, skipped=skipped)

    def _files(self) -> tuple[dict[str, dict], list[str]]:
        """Every file below the root that is not hidden, by key (its path below the root), with its size and stamp;
        and the folders that could not be listed, with the reason."""
        if self._local:
            return walk(self._path)
        start = len(self._prefix)
        found = self._fs.find(self._path, detail=True)
        return {name[start:]: info for name, info in found.items() if "/." not in "/" + name[start:]}, []

    def read_items(self, items: list[Item]) -> Iterator[tuple[Item, bytes | None, str | None]]:
        """Each item with its bytes, or None and why it could not be read (gone, forbidden), in the order given.

        Errors a retry may fix (a network failure) are raised, so the shard is retried rather than thinned.
        """
        paths = [self._prefix + item.key for item in items]
        sizes = [_listed_size(item) for item in items]
        for item, data in zip(items, read_files(self._fs, self._local, paths, sizes, self.limit), strict=True):
            if isinstance(data, str):
                yield item, None, data
            elif not isinstance(data, BaseException):
                yield item, data, None
            elif is_transient(data):
                raise data
            elif isinstance(data, FileNotFoundError):
                yield item, None, GONE
            else:
                yield item, None, fetch_error(data)

    def _layout(self, top_folders: set[str]) -> str:
        """The layout: train-test-folders when ROOT holds both train/ and test/, class-folders when it holds neither."""
        present = sorted(top_folders & set(SPLITS))
        if not present:
            return "class-folders"
        if len(present) == len(SPLITS):
            return "train-test-folders"
        (missing,) = set(SPLITS) - set(present)
        raise SourceError(f"{self._shown_root} has a {present[0]}/ folder but no {missing}/ folder: {LAYOUTS}")

    def _place(self, key: str, layout: str) -> tuple[str, str] | None:
        """The split and class of `key`, or None when it is not in a class folder."""
        if layout == "class-folders":
            name, in_folder, _ = key.partition("/")
            return (("test" if self._in_test(key) else "train"), name) if in_folder else None
        split, _, below = key.partition("/")
        name, in_folder, _ = below.partition("/")
        return (split, name) if split in SPLITS and in_folder else None

    def _in_test(self, key: str) -> bool:
        """The seeded split rule: a uniform draw from the key's hash, so no other file changes the answer."""
        digest = hashlib.sha256(f"{self.split_seed}:{key}".encode()).hexdigest()
        return int(digest[:8], 16) / 2**32 < self.test_fraction


class FolderImages:
    """Image files without labels, for predict and similar: each file with an image's extension, or the one file
    SOURCE names, decoded whatever its extension (or reported); read as a collection's files are."""

    wanted = f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    what = "images"

    @staticmethod
    def select(named: NamedFiles) -> list[str]:
        if named.single:
            return named.files
        return [name for name in named.files if name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS]

    def __init__(self, named: NamedFiles, files: list[str], image_column: str | None, limit: int):
        self.named, self.files, self.limit = named, files, limit
        self.total = len(files)
        self.path_width = max(len(printable(named.shown(name))) for name in files)

    def rows(self) -> Iterator[tuple[str, bytes | None, str | None]]:
        named = self.named
        sizes = [named.sizes.get(name, 0) for name in self.files]
        for name, data in zip(self.files, read_files(named.fs, named.local, self.files, sizes, self.limit), strict=True):
            if isinstance(data, str):
                yield named.shown(name), None, data
            elif isinstance(data, BaseException):
                yield named.shown(name), None, fetch_error(data)
            else:
                yield named.shown(name), data, None


def _listed_size(item: Item) -> int:
    """The size the listing saw, from the version this source gives every item ("<size>-<stamp>")."""
    size = item.version.partition("-")[0]
    return int(size) if size.isdigit() else 0
