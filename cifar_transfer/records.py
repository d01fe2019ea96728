"""Every record the project stores carries `format_version`; this is the one place that writes it and reads older ones.

A record is a JSON object: a file (`feature_set.json`, a manifest, a head's `metrics.json`, ...) or a Parquet footer's
metadata (a shard, a t-SNE map, a predictions file). Writing one puts the current version first (`RecordFormat.dump`).
Reading one (`RecordFormat.read`, `RecordFormat.load`) takes the version out, refuses a version newer than this
code knows in one line (`NewerFormatError`, never read as "unreadable", so nothing newer is overwritten), and
upgrades an older record step by step to the current form before its model validates it.

Records written before versions existed have none: they are version 1, and their upgrade to version 2 fills in what
they may lack (what used to be defaults on the models, "absent in records written before ..."). A version never enters
a fingerprint, a key or a shard check: those hash specs and settings, never the records around them. So a feature set,
map or head written before is found and reused as it is, and never rewritten only to upgrade its records.

A few records name places in the storage they live in (a decoded dataset's folder, a map's files, the feature set a
head was trained on): their `StoredPaths`. From version 3 on these are written relative to the storage root and read
back as full paths under the root they are read from, so a copied or moved storage's records point into the copy.
Older records hold full paths: read as written, as before.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel

from cifar_transfer.errors import NewerFormatError

FORMAT_VERSION = "format_version"
UNVERSIONED = 1  # the version of a record written before records carried one

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class StoredPaths:
    """The fields of a record that hold a path under the storage root, and the version from which they are stored
    relative to it (before: the full path, as the writer's storage root had it)."""

    fields: tuple[str, ...]
    relative_since: int

    def relative(self, content: dict, root: str | None) -> dict:
        """`content` with its path fields relative to `root`; `ValueError` for one outside it."""
        if root is None:
            raise ValueError("a record that names paths is written with its storage root")
        relative = dict(content)
        for name in self.fields:
            path = content.get(name)
            if isinstance(path, str):
                if not path.startswith(root.rstrip("/") + "/"):
                    raise ValueError(f"{name} {path!r} is not under the storage root {root!r}")
                relative[name] = posixpath.relpath(path, root)
        return relative

    def resolved(self, content: dict, root: str | None, version: int) -> dict:
        """`content` (of stored `version`) with its path fields as full paths under `root`."""
        if version < self.relative_since:
            return content  # full paths, read as written
        if root is None:
            raise ValueError("a record that names paths is read with its storage root")
        return {
            name: posixpath.join(root, value) if name in self.fields and isinstance(value, str) else value
            for name, value in content.items()
        }


@dataclass(frozen=True)
class RecordFormat:
    """One kind of stored record: its name in messages, the version this code writes, and how each older one upgrades."""

    name: str
    version: int
    upgrades: Mapping[int, Callable[[object], object]] = field(default_factory=dict)  # version n's content -> version n + 1's
    # (a version without an entry changed nothing but the stamp)
    paths: StoredPaths | None = None  # fields naming places in the storage: dumped and read with its root

    def dump(self, content: BaseModel | dict, indent: int | None = 2, root: str | None = None, **options) -> bytes:
        """The record as this version writes it: JSON of `content` (a model dumped with `options`, as by `model_dump`)
        with the version first; its `paths` relative to the storage `root`."""
        if isinstance(content, BaseModel):
            content = content.model_dump(mode="json", **options)
        if self.paths is not None:
            content = self.paths.relative(content, root)
        return json.dumps({FORMAT_VERSION: self.version, **content}, indent=indent, ensure_ascii=False).encode()

    def read(self, raw: bytes | str, where: str, root: str | None = None) -> dict:
        """The record in `raw` (its JSON) in the current form, without its version, its `paths` full paths under the
        storage `root`. `NewerFormatError` for a version this code does not know; `ValueError` for a record that is
        not one (the caller's "unreadable")."""
        content = json.loads(raw)
        version = content.get(FORMAT_VERSION, UNVERSIONED) if isinstance(content, dict) else UNVERSIONED
        if isinstance(version, bool) or not isinstance(version, int) or version < UNVERSIONED:
            raise ValueError(f"{FORMAT_VERSION} {version!r} is not a version")
        if version > self.version:
            raise NewerFormatError(
                f"{where} is a {self.name} of format version {version}, newer than this cifar-transfer reads "
                f"(up to {self.version}): upgrade cifar-transfer (pip install -U cifar-transfer) to use it"
            )
        if isinstance(content, dict):
            content = {name: value for name, value in content.items() if name != FORMAT_VERSION}
        for step in range(version, self.version):
            content = self.upgrades.get(step, _unchanged)(content)
        if not isinstance(content, dict):
            raise ValueError(f"not a {self.name} (a JSON {type(content).__name__}, not an object)")
        return content if self.paths is None else self.paths.resolved(content, root, version)

    def load(self, model: type[Model], raw: bytes | str, where: str, root: str | None = None) -> Model:
        """The record in `raw` (JSON), upgraded and validated; `ValueError` when it is not one."""
        return model.model_validate(self.read(raw, where, root))


def _unchanged(content: object) -> object:
    return content


def _defaults(**values) -> Callable[[object], object]:
    """An upgrade that fills in fields a version-1 record may lack, as they were read before they were recorded."""
    return lambda content: {**values, **content} if isinstance(content, dict) else content


def _rebuild_defaults(content: object) -> object:
    """A set's rebuild record before `flip` was recorded had no mirrored views made with it; before collections, it
    was an archive's."""
    if isinstance(content, dict) and isinstance(content.get("rebuild"), dict):
        return {**content, "rebuild": {"flip": False, "collection": None, **content["rebuild"]}}
    return content


def _wrapped_list(key: str) -> Callable[[object], object]:
    """An upgrade for a record that was a bare JSON list: the list becomes the field `key` of an object."""
    return lambda content: {key: content} if isinstance(content, list) else content


# A feature set (`commit`, `feature_records`, `shard_files`)
FEATURE_SET = RecordFormat(
    "feature set description (feature_set.json)",
    2,
    {1: lambda content: _defaults(extraction=None, made_by=None)(_rebuild_defaults(content))},
)
MANIFEST = RecordFormat("view manifest (_manifest.json)", 2, {1: _defaults(version=1, retired=[])})
SHARD = RecordFormat("feature shard's footer metadata", 2)
SKIPPED = RecordFormat("list of skipped images (_skipped.json)", 2, {1: _wrapped_list("skipped")})
# What a set is made from (`download`, `dataset`, `collection`, `engines`)
SOURCE = RecordFormat("archive source record (.source.json)", 2)
DATASET = RecordFormat(
    "decoded dataset marker (_SUCCESS.json)",
    3,
    {1: _defaults(bytes={}, format="cifar10", label_mode=None)},
    StoredPaths(("folder",), relative_since=3),
)
WATCH = RecordFormat("collection watch record", 2)
ENGINE_CHOICE = RecordFormat("engine choice", 2)
# What is made from a set (`tsne`, `head`, `export`, `predict`)
TSNE_SETTINGS = RecordFormat("t-SNE map's settings.json", 2)
TSNE_RESULT = RecordFormat(
    "t-SNE map's embedding metadata", 3, {1: _defaults(made_by=None)}, StoredPaths(("embedding", "picture"), relative_since=3)
)
HEAD_SETTINGS = RecordFormat("head's settings.json", 2)
HEAD_METRICS = RecordFormat("head's metrics.json", 3, paths=StoredPaths(("features",), relative_since=3))
EXPORT = RecordFormat("export description (export.json)", 2)
PREDICTIONS = RecordFormat("predictions file's metadata", 2)
# What the audit keeps of a set (`audit`). New formats start at 2: version 1 is what a record without a version is.
AUDIT_INDEX = RecordFormat("nearest-neighbour index record (audit/index/index.json)", 2)
AUDIT = RecordFormat("audit record (audit/audit.json)", 2)
