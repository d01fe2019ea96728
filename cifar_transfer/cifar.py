"""Read the CIFAR-10 and CIFAR-100 python archives safely.

The batches are Python pickles, and unpickling runs whatever a pickle asks
for. So the unpickler never hands a pickle anything real: the few globals the
format names (numpy's array reconstruction, numpy.dtype, _codecs.encode) are
stand-ins that accept only the exact calls the official files make, and the
arrays are built here, from bytes whose length matches the shape they claim.
Members are read from the tar stream, never extracted, so no member path can
write anywhere. Sizes are bounded before anything is read or built (members,
tar headers, pickle operations, rows), so a crafted archive costs at most
about what an official one does. The bounds are per format (`ARCHIVE_FORMATS`):
CIFAR-100 holds its 50,000 training images in one member, CIFAR-10 in five.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import pickletools
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from cifar_transfer.errors import ArchiveError, ConfigError

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLIT_MEMBERS = {
    "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
    "test": ["cifar-10-batches-py/test_batch"],
}
META_MEMBER = "cifar-10-batches-py/batches.meta"
IMAGE_SHAPE = (32, 32, 3)
_ROW_BYTES = 32 * 32 * 3
# tarfile reads pax and GNU long-name headers whole; real ones hold a path or two.
_MAX_HEADER_BYTES = 16 * 2**10
# The official archives hold 8 members (CIFAR-10) and 5 (CIFAR-100); tarfile keeps every header it has read.
_MAX_MEMBERS = 1_000
# A meta member holds a few lists of class names: about 150 bytes in CIFAR-10, 1.5 KB in CIFAR-100.
_MAX_META_BYTES = 2**20
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
# Plain numeric dtypes, by the name numpy pickles them under (byte order travels in the dtype's state).
_NUMERIC_DTYPES = frozenset({"i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f4", "f8"})
# Class names end up in reports and plots: printable ASCII, as the official ones are.
_CLASS_NAME = re.compile(rb"[ -~]{1,64}")


@dataclass(frozen=True)
class LabelSet:
    """One way an archive labels its images: the batch key of the labels, the meta key of their names."""

    labels_key: str
    names_key: str
    class_count: int


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per registered format
class ArchiveFormat:
    """An official archive's layout and the bounds its members keep; looked up by name in `ARCHIVE_FORMATS`."""

    name: str  # the registry key; also names the decoded dataset's folder
    title: str
    folder: str  # every member lies under it, so it tells the format from the first header
    split_members: dict[str, list[str]]
    meta_member: str
    label_modes: dict[str, LabelSet]  # the first is the default
    max_rows_per_member: int
    # Room for a member re-pickled by Python 3, which stores bytes as latin-1 text and so up to two bytes a pixel.
    max_member_bytes: int
    official_url: str
    official_md5: str
    class_names: tuple[str, ...] | None = None  # names the meta must list, where the pipeline has long fixed them

    @property
    def max_pickle_operations(self) -> int:
        """A batch pickles in a few operations a row (labels, a file name): 2 (CIFAR-10) or 3 (CIFAR-100) in the
        official files, about 10 from Python 3. Each operation makes at most one object, so this bounds what
        unpickling allocates beyond the payload itself."""
        return 25 * self.max_rows_per_member

    @property
    def official_name(self) -> str:
        return self.official_url.rsplit("/", 1)[-1]

    @property
    def use_official(self) -> str:
        return f"use the official {self.official_name}"

    @property
    def members(self) -> frozenset[str]:
        """Every member read: the batches of each split and the meta member."""
        return frozenset([*(member for members in self.split_members.values() for member in members), self.meta_member])

    def label_set(self, label_mode: str | None) -> tuple[str, LabelSet]:
        """The label mode asked for (None: the format's default) and its label set."""
        mode = next(iter(self.label_modes)) if label_mode is None else label_mode
        if mode not in self.label_modes:
            raise ConfigError(f"label mode {label_mode!r} is not one of {self.title}'s: {', '.join(self.label_modes)}")
        return mode, self.label_modes[mode]

    def label_mode_name(self, label_mode: str | None) -> str | None:
        """The label mode where the format has several (it then names the decoded dataset), else None."""
        mode, _ = self.label_set(label_mode)
        return mode if len(self.label_modes) > 1 else None


ARCHIVE_FORMATS = {
    "cifar10": ArchiveFormat(
        name="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        split_members=SPLIT_MEMBERS,
        meta_member=META_MEMBER,
        label_modes={"default": LabelSet("labels", "label_names", len(CLASS_NAMES))},
        # An official batch is about 31 MB (10,000 rows, labels, file names).
        max_rows_per_member=10_000,
        max_member_bytes=64 * 2**20,
        official_url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        official_md5="c58f30108f718f92721af3b95e74349a",
        class_names=tuple(CLASS_NAMES),
    ),
    "cifar100": ArchiveFormat(
        name="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        split_members={"train": ["cifar-100-python/train"], "test": ["cifar-100-python/test"]},
        meta_member="cifar-100-python/meta",
        label_modes={
            "fine": LabelSet("fine_labels", "fine_label_names", 100),
            "coarse": LabelSet("coarse_labels", "coarse_label_names", 20),
        },
        # The train member is about 155 MB (50,000 rows, two label lists, file names): CIFAR-10's bound per row.
        max_rows_per_member=50_000,
        max_member_bytes=320 * 2**20,
        official_url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        official_md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}
_FORMAT_OF_FOLDER = {archive_format.folder: archive_format for archive_format in ARCHIVE_FORMATS.values()}
_USE_AN_OFFICIAL = "use the official " + " or ".join(archive_format.official_name for archive_format in ARCHIVE_FORMATS.values())


def archive_format_named(name: str) -> ArchiveFormat:
    archive_format = ARCHIVE_FORMATS.get(name)
    if archive_format is None:
        raise ConfigError(f"archive format {name!r} is not one of {', '.join(ARCHIVE_FORMATS)}")
    return archive_format


@dataclass(frozen=True)
class ArchiveContent:
    """What an archive holds: its format, the label mode read (None where the format has one), the class names
    its meta lists, and images (N, 32, 32, 3) uint8 with int64 labels per split."""

    format: str
    label_mode: str | None
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]


class _StandIn:
    """What the unpickler gets instead of a real global; no pickle may change one, whether shared or per load."""

    def __setstate__(self, state) -> None:
        raise pickle.UnpicklingError("a global may not be given a state")


class _NdarrayStandIn(_StandIn):
    """Stands for numpy.ndarray, which a batch may only pass to _reconstruct: its constructor takes raw strides."""

    def __call__(self, *args):
        raise pickle.UnpicklingError("numpy.ndarray may not be called; arrays come only from _reconstruct(ndarray, (0,), b'b')")


_NDARRAY = _NdarrayStandIn()


class _PendingDtype:
    """A numeric dtype named by the pickle, usable once its state (the byte order) is set."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype: np.dtype | None = None

    def __setstate__(self, state) -> None:
        if self.dtype is not None:
            raise pickle.UnpicklingError("a dtype's state is set twice")
        # (version, byte order, subarray, names, fields, element size, alignment, flags) of a plain numeric dtype.
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[2:] == (None, None, None, -1, -1, 0)):
            raise pickle.UnpicklingError(f"dtype {self.name} has the state of a structured or object dtype")
        byte_order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]  # bytes in Python 2 pickles
        dtype = np.dtype(self.name)
        if byte_order not in (("|",) if dtype.itemsize == 1 else ("<", ">")):
            raise pickle.UnpicklingError(f"dtype {self.name} has byte order {_shown(byte_order)}")
        self.dtype = dtype.newbyteorder(cast(Literal["<", ">", "|"], byte_order))  # one of these, checked above


class _PendingArray:
    """An array _reconstruct promised; BUILD hands it the state, from which it is built here."""

    __slots__ = ("array", "max_size")

    def __init__(self, max_size: int):
        self.array: np.ndarray | None = None
        self.max_size = max_size

    def __setstate__(self, state) -> None:
        if self.array is not None:
            raise pickle.UnpicklingError("an array's state is set twice")
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise pickle.UnpicklingError("array state is not (1, shape, dtype, is_fortran, bytes)")
        _, shape, dtype, is_fortran, rawdata = state
        if not (isinstance(shape, tuple) and len(shape) <= 2 and all(type(size) is int and 0 <= size <= self.max_size for size in shape)):
            raise pickle.UnpicklingError("array shape is not one or two sizes a batch can hold")
        if not isinstance(dtype, _PendingDtype) or dtype.dtype is None:
            raise pickle.UnpicklingError("array dtype is not a plain numeric numpy.dtype")
        if is_fortran is not False:
            raise pickle.UnpicklingError("array is not in C order")
        if type(rawdata) is not bytes or math.prod(shape) * dtype.dtype.itemsize != len(rawdata):
            raise pickle.UnpicklingError(f"array of shape {shape} ({dtype.dtype}) does not match the bytes it holds")
        self.array = np.frombuffer(rawdata, dtype.dtype).reshape(shape)


class _Reconstruct(_StandIn):
    """Stands for numpy's _reconstruct, allowed only as the official _reconstruct(ndarray, (0,), b'b').

    Made per load, as it hands its arrays the size bound of the member's format.
    """

    def __init__(self, max_size: int):
        self.max_size = max_size

    def __call__(self, *args) -> _PendingArray:
        if args != (_NDARRAY, (0,), b"b"):
            raise pickle.UnpicklingError("numpy _reconstruct is allowed only as _reconstruct(ndarray, (0,), b'b')")
        return _PendingArray(self.max_size)


class _Dtype(_StandIn):
    """Stands for numpy.dtype, allowed only as dtype(name, 0, 1) for a plain numeric name."""

    def __call__(self, *args) -> _PendingDtype:
        if len(args) != 3 or args[1:] != (0, 1):
            raise pickle.UnpicklingError("numpy.dtype is allowed only as dtype(name, 0, 1)")
        name = args[0].decode("latin1") if isinstance(args[0], bytes) else args[0]
        if not (isinstance(name, str) and name in _NUMERIC_DTYPES):
            raise pickle.UnpicklingError(f"dtype {_shown(name)} is not a plain numeric dtype")
        return _PendingDtype(name)


class _Latin1Encode(_StandIn):
    """Stands for _codecs.encode: Python 3 writes bytes into protocol-2 pickles as encode(text, 'latin1').

    Each call copies its text, so all calls together may make no more bytes than the pickle holds;
    otherwise one memoized text could be encoded over and over.
    """

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, *args) -> bytes:
        if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
            raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
        self.budget -= len(args[0])
        if self.budget < 0:
            raise pickle.UnpicklingError("_codecs.encode makes more bytes than the pickle holds")
        return args[0].encode("latin1")


_DTYPE = _Dtype()


def _shown(value: object) -> str:
    """A pickle-chosen value for an error message: short text as it is, anything else by its type."""
    return repr(value) if isinstance(value, (str, bytes)) and len(value) <= 16 else type(value).__name__


def _check_operations(payload: bytes, max_operations: int) -> None:
    """Refuse, before unpickling, a pickle that would allocate far beyond its size: one with too many operations,
    or with a far memo slot (the unpickler sizes its memo to the highest slot)."""
    for count, (opcode, argument, _) in enumerate(pickletools.genops(payload), 1):
        if count > max_operations:
            raise pickle.UnpicklingError(f"more than {max_operations} pickle operations")
        if opcode.name in _MEMO_PUTS and isinstance(argument, int) and argument >= max_operations:
            raise pickle.UnpicklingError(f"memo slot {argument} is beyond what a batch uses")


class RestrictedUnpickler(pickle.Unpickler):
    """Loads one member; every global is a stand-in, and any outside the member's needs is refused.

    A batch may hold arrays of at most `max_array_size` rows or columns; a meta member (`max_array_size` None)
    holds only lists of names and numbers, so it gets no numpy stand-in at all.
    """

    def __init__(self, payload: bytes, max_array_size: int | None, what: str):
        super().__init__(io.BytesIO(payload), encoding="bytes")
        self._what = what
        self._stand_ins: dict[tuple[str, str], _StandIn] = {("_codecs", "encode"): _Latin1Encode(budget=len(payload))}
        if max_array_size is not None:
            reconstruct = _Reconstruct(max_array_size)
            self._stand_ins |= {
                ("numpy.core.multiarray", "_reconstruct"): reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): reconstruct,
                ("numpy", "ndarray"): _NDARRAY,
                ("numpy", "dtype"): _DTYPE,
            }

    def find_class(self, module: str, name: str):
        stand_in = self._stand_ins.get((module, name))
        if stand_in is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in {self._what}")
        return stand_in


def _load(payload: bytes, member: str, archive_format: ArchiveFormat, *, meta: bool = False) -> dict:
    """A member's dict with str keys; its arrays were built by this module, never by the pickle."""
    kind = "meta member" if meta else "batch"
    try:
        _check_operations(payload, archive_format.max_pickle_operations)
        max_array_size = None if meta else archive_format.max_member_bytes
        loaded = RestrictedUnpickler(payload, max_array_size, f"a {archive_format.title} {kind}").load()
    except Exception as exc:
        problem = " ".join(str(exc).split())[:200]
        raise ArchiveError(f"member {member} is not a {archive_format.title} {kind} ({problem}): {archive_format.use_official}") from None
    if not isinstance(loaded, dict):
        raise ArchiveError(f"member {member} holds a {type(loaded).__name__}, not a dict: {archive_format.use_official}")
    content = {}
    for key, value in loaded.items():
        if isinstance(value, _PendingArray):
            if value.array is None:
                raise ArchiveError(f"member {member} holds an array that was never given its data: {archive_format.use_official}")
            value = value.array
        content[key.decode("latin1") if isinstance(key, bytes) else key] = value
    return content


def _labels(labels: object, member: str, archive_format: ArchiveFormat, label_set: LabelSet) -> np.ndarray:
    """Labels as int64; a list must hold only 64-bit ints, so numpy never converts objects a pickle chose."""
    key, use_official = label_set.labels_key, archive_format.use_official
    if isinstance(labels, list) and all(type(label) is int and -(2**63) <= label < 2**63 for label in labels):
        labels = np.array(labels, dtype=np.int64)
    if not (isinstance(labels, np.ndarray) and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)):
        if isinstance(labels, np.ndarray):
            found = f"{labels.dtype} {labels.shape}"
        else:
            found = "a list holding other than 64-bit integers" if isinstance(labels, list) else type(labels).__name__
        raise ArchiveError(f"member {member}: '{key}' is {found}, expected a list of integers: {use_official}")
    low, high = (labels.min(), labels.max()) if len(labels) else (0, 0)
    if low < 0 or high >= label_set.class_count:
        raise ArchiveError(f"member {member}: {key} range {low}..{high}, expected 0..{label_set.class_count - 1}: {use_official}")
    return np.asarray(labels, dtype=np.int64)


def _check_batch(batch: dict, member: str, archive_format: ArchiveFormat, label_set: LabelSet) -> tuple[np.ndarray, np.ndarray]:
    """The batch's image rows and int64 labels, once they are what an official batch holds."""
    use_official, max_rows = archive_format.use_official, archive_format.max_rows_per_member
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_BYTES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise ArchiveError(f"member {member}: 'data' is {dtype} {shape}, expected uint8 (N, {_ROW_BYTES}): {use_official}")
    if len(data) > max_rows:
        raise ArchiveError(
            f"member {member}: 'data' has {len(data)} rows, more than a {archive_format.title} batch's {max_rows}: {use_official}"
        )
    labels = _labels(batch.get(label_set.labels_key), member, archive_format, label_set)
    if len(labels) != len(data):
        raise ArchiveError(f"member {member}: '{label_set.labels_key}' has {len(labels)} entries, expected {len(data)}: {use_official}")
    return data, labels


def _class_names(meta: dict, member: str, archive_format: ArchiveFormat, label_set: LabelSet) -> list[str]:
    """The class names the meta member lists for the label set: as many as the labels may number, distinct."""
    key, count, use_official = label_set.names_key, label_set.class_count, archive_format.use_official
    names = meta.get(key)
    if not (isinstance(names, list) and len(names) == count and all(type(name) is bytes and _CLASS_NAME.fullmatch(name) for name in names)):
        raise ArchiveError(f"member {member}: '{key}' is not a list of {count} printable byte strings: {use_official}")
    classes = [name.decode("ascii") for name in names]
    if len(set(classes)) != count:
        raise ArchiveError(f"member {member}: '{key}' names a class twice: {use_official}")
    if archive_format.class_names is not None and tuple(classes) != archive_format.class_names:
        expected = ", ".join(archive_format.class_names)
        raise ArchiveError(f"member {member}: '{key}' differ from {archive_format.title}'s ({expected}): {use_official}")
    return classes


class _ArchiveMember(tarfile.TarInfo):
    """A tar header that cannot make tarfile allocate much.

    tarfile reads pax and GNU long-name headers whole, merges every global pax
    header it meets and builds sparse maps of any length, so a few compressed
    bytes could make it allocate gigabytes. CIFAR archives need neither
    large headers, nor global ones, nor sparse files.
    """

    def _proc_member(self, archive):  # tarfile's hook for TarInfo subclasses
        if self.type in (tarfile.XGLTYPE, tarfile.GNUTYPE_SPARSE):
            raise ArchiveError(f"member {self.name} is a global pax header or a sparse file: {_USE_AN_OFFICIAL}")
        extension = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
        if self.type in extension and self.size > _MAX_HEADER_BYTES:
            raise ArchiveError(
                f"member {self.name} is a tar header of {self.size} bytes, more than {_MAX_HEADER_BYTES}: {_USE_AN_OFFICIAL}"
            )
        return super()._proc_member(archive)  # type: ignore[misc]  # a private tarfile hook, not in its type stubs

    def _proc_gnusparse_10(self, member, pax_headers, archive):
        raise ArchiveError(f"member {member.name} is a sparse file: {_USE_AN_OFFICIAL}")


@contextlib.contextmanager
def _open_stream(stream) -> Iterator[tarfile.TarFile]:
    """The tar.gz stream, read in order through bounded headers; tar and gzip errors become one ArchiveError."""
    try:
        with tarfile.open(fileobj=stream, mode="r|gz", tarinfo=_ArchiveMember) as archive:
            yield archive
    except (tarfile.TarError, EOFError, zlib.error, OSError, RecursionError) as exc:
        raise ArchiveError(f"archive is truncated or not a tar.gz ({exc}): delete it from storage and fetch it again") from None


def _members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for count, member in enumerate(archive, 1):
        if count > _MAX_MEMBERS:
            raise ArchiveError(f"archive holds more than {_MAX_MEMBERS} members: {_USE_AN_OFFICIAL}")
        yield member


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int, what: str, use_official: str) -> bytes:
    """The member's bytes; one larger than `limit` is refused before it is inflated (a gzip bomb)."""
    stream = archive.extractfile(member)
    if stream is None:
        raise ArchiveError(f"member {member.name} is not a regular file: {use_official}")
    if member.size <= limit:
        payload = stream.read(limit + 1)  # bounded whatever the header says
        if len(payload) <= limit:
            return payload
    raise ArchiveError(f"member {member.name} declares {member.size} bytes, more than {what} can be ({limit}): {use_official}")


def _split_arrays(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """A split's images (N x 32 x 32 x 3) and labels from its batches' channel-first rows, each batch transposed
    straight into place: one new array, not a joined copy and then a transposed one."""
    images = np.empty((sum(len(rows) for rows, _ in batches), 32, 32, 3), np.uint8)
    start = 0
    for rows, _ in batches:
        images[start : start + len(rows)] = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        start += len(rows)
    return images, np.concatenate([labels for _, labels in batches])


def _format_of_member(name: str) -> ArchiveFormat | None:
    return _FORMAT_OF_FOLDER.get(name.split("/", 1)[0])


def _no_known_folder() -> ArchiveError:
    folders = " or ".join(f"{folder}/" for folder in _FORMAT_OF_FOLDER)
    return ArchiveError(f"archive holds no member under {folders}: {_USE_AN_OFFICIAL}")


def detect_archive_format(member_names: Iterable[str]) -> str:
    """The format of the first member under a known folder: each official archive keeps all under one folder."""
    for name in member_names:
        archive_format = _format_of_member(name)
        if archive_format is not None:
            return archive_format.name
    raise _no_known_folder()


def archive_format_of(stream) -> str:
    """The format of a tar.gz stream from its member names, reading no member's data: an official archive
    names its folder in the first header, so this costs one header where a full read costs seconds."""
    with _open_stream(stream) as archive:
        return detect_archive_format(member.name for member in _members(archive))


def read_archive(stream, archive_format: str = "cifar10", label_mode: str | None = None) -> ArchiveContent:
    """A CIFAR-10 or CIFAR-100 tar.gz stream, read as `archive_format` ("auto": as its member names say).

    `label_mode` picks the label set of a format that has several (CIFAR-100: "fine", the default, or "coarse").
    A member of another format than the archive's is refused when it is met, before any more is read.
    """
    found = None if archive_format == "auto" else archive_format_named(archive_format)  # "auto": named by the first member
    if found is not None:
        found.label_set(label_mode)  # a wrong label mode is refused before the archive is read
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    classes: list[str] | None = None
    read: set[str] = set()
    with _open_stream(stream) as archive:
        for member in _members(archive):
            member_format = _format_of_member(member.name)
            if member_format is None:
                continue
            if found is None:
                found = member_format
            if member_format is not found:
                fix = f"earlier members are {found.title}" if archive_format == "auto" else f"read it as '{member_format.name}' or 'auto'"
                raise ArchiveError(f"member {member.name} is from a {member_format.title} archive, not {found.title}: {fix}")
            if member.name not in found.members:
                continue
            if member.name in read:
                raise ArchiveError(f"member {member.name} appears twice: the archive is not a clean {found.title} archive")
            if not member.isfile():
                raise ArchiveError(f"member {member.name} is not a regular file: the archive is not a clean {found.title} archive")
            read.add(member.name)
            _, label_set = found.label_set(label_mode)
            if member.name == found.meta_member:
                payload = _read_member(archive, member, _MAX_META_BYTES, "a meta member", found.use_official)
                classes = _class_names(_load(payload, member.name, found, meta=True), member.name, found, label_set)
                continue
            payload = _read_member(archive, member, found.max_member_bytes, f"a {found.title} batch", found.use_official)
            # Checked at once, so only one batch's pickled structure is ever held.
            batches[member.name] = _check_batch(_load(payload, member.name, found), member.name, found, label_set)
    if found is None:
        raise _no_known_folder()
    missing = sorted(found.members - read)
    if missing:
        raise ArchiveError(f"archive lacks {', '.join(missing)}: it is not a complete {found.title} python archive")
    assert classes is not None, "the meta member is one of found.members, all read"
    splits = {split: _split_arrays([batches[member] for member in members]) for split, members in found.split_members.items()}
    return ArchiveContent(format=found.name, label_mode=found.label_mode_name(label_mode), classes=classes, splits=splits)
