"""Reading the archive safely, storing it decoded, and planning shards (no Prefect needed)."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifar_transfer import layout
from cifar_transfer.cifar import ARCHIVE_FORMATS, CLASS_NAMES, SPLIT_MEMBERS, archive_format_of, detect_archive_format, read_archive
from cifar_transfer.dataset import dataset_id, decode_archive, finished_dataset, read_marker, read_rows, shard_images
from cifar_transfer.errors import ArchiveError, ConfigError
from cifar_transfer.shards import plan_shards
from cifar_transfer.storage import Storage
from conftest import (
    BATCH_DIR,
    batch_pickle,
    cifar100_batch_pickle,
    cifar100_class_names,
    cifar100_members,
    cifar_images,
    cifar_members,
    write_archive,
)

C100 = "cifar-100-python"


def read_content(path, archive_format="cifar10", label_mode=None):
    with open(path, "rb") as stream:
        return read_archive(stream, archive_format, label_mode)


def read(path):
    return read_content(path).splits


def test_reads_official_layout_into_hwc_images(tiny_archive):
    path, _ = tiny_archive
    splits = read(path)
    assert {split: images.shape for split, (images, _) in splits.items()} == {"train": (200, 32, 32, 3), "test": (100, 32, 32, 3)}
    data, labels = cifar_images(40, 1)  # data_batch_1 is built from seed 0 + 1
    images, train_labels = splits["train"]
    assert list(train_labels[:40]) == labels
    # Channel-major rows: the first 1024 bytes are the red plane, row by row.
    assert images[0, 0, 1, 0] == data[0, 1]
    assert images[0, 1, 0, 2] == data[0, 2048 + 32]


def test_refuses_a_pickle_that_would_run_a_command(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    members = cifar_members()
    members[f"{BATCH_DIR}/data_batch_3"] = pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2)
    path = tmp_path / "evil.tar.gz"
    write_archive(path, members)
    with pytest.raises(ArchiveError, match=r"data_batch_3 is not a CIFAR-10 batch .*system is not allowed"):
        read(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) // 2], "truncated or not a tar.gz"),
        (lambda data: b"this is not a tar file at all" * 100, "truncated or not a tar.gz"),
    ],
)
def test_damaged_archive_gives_one_clear_line(tiny_archive, tmp_path, damage, message):
    path, _ = tiny_archive
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ArchiveError, match=message) as error:
        read(damaged)
    assert "\n" not in str(error.value)


def _archive_with(tmp_path, change):
    members = cifar_members()
    change(members)
    path = tmp_path / "changed.tar.gz"
    write_archive(path, members)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop(f"{BATCH_DIR}/data_batch_4"), "lacks cifar-10-batches-py/data_batch_4"),
        (
            lambda m: m.update({f"{BATCH_DIR}/test_batch": batch_pickle(np.zeros((3, 100), np.uint8), [0, 1, 2], "x")}),
            r"test_batch: 'data' is uint8 \(3, 100\)",
        ),
        (
            lambda m: m.update({f"{BATCH_DIR}/test_batch": batch_pickle(np.zeros((3, 3072), np.float32), [0, 1, 2], "x")}),
            "test_batch: 'data' is float32",
        ),
        (
            lambda m: m.update({f"{BATCH_DIR}/test_batch": batch_pickle(np.zeros((3, 3072), np.uint8), [0, 1, 12], "x")}),
            r"labels range 0..12, expected 0..9",
        ),
        (lambda m: m.update({f"{BATCH_DIR}/test_batch": pickle.dumps([1, 2, 3], protocol=2)}), "holds a list, not a dict"),
    ],
)
def test_wrong_content_names_the_member_and_problem(tmp_path, change, message):
    with pytest.raises(ArchiveError, match=message):
        read(_archive_with(tmp_path, change))


def test_duplicate_member_is_refused(tmp_path):
    path = tmp_path / "dup.tar.gz"
    members = cifar_members()
    write_archive(path, [*members.items(), (f"{BATCH_DIR}/data_batch_2", members[f"{BATCH_DIR}/data_batch_2"])])
    with pytest.raises(ArchiveError, match="data_batch_2 appears twice"):
        read(path)


def test_decode_once_then_read_any_rows(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    storage_url = str(tmp_path / "storage")
    info = decode_archive(storage_url, str(path), md5)
    assert info.sizes == {"train": 200, "test": 100}
    images_path = f"{info.folder}/train_images.npy"
    stamp = os.stat(images_path).st_mtime_ns
    assert decode_archive(storage_url, str(path), md5) == info
    assert os.stat(images_path).st_mtime_ns == stamp
    everything = np.load(images_path)
    np.testing.assert_array_equal(read_rows(Storage(storage_url), images_path, 37, 91), everything[37:91])


def test_mirrored_views_are_planned_after_the_originals_and_read_mirrored(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    info = decode_archive(str(tmp_path / "storage"), str(path), md5)
    plan = plan_shards(info.sizes, 60, flip=True)
    assert [shard.split for shard in plan] == ["train"] * 4 + ["test"] * 2 + ["train-flipped"] * 4 + ["test-flipped"] * 2
    original, mirrored = plan[1], plan[7]
    assert (mirrored.source_split, mirrored.flipped, mirrored.start, mirrored.file_name) == ("train", True, 60, "part-00001.parquet")
    images, labels = shard_images(str(tmp_path / "storage"), info, original)
    flipped_images, flipped_labels = shard_images(str(tmp_path / "storage"), info, mirrored)
    np.testing.assert_array_equal(flipped_labels, labels)
    np.testing.assert_array_equal(flipped_images[:, :, 0], images[:, :, 31])  # column 0 of the mirror is the last column
    np.testing.assert_array_equal(flipped_images[:, :, ::-1], images)


def test_shard_plan_is_deterministic_and_covers_each_split_once():
    plan = plan_shards({"train": 50_000, "test": 10_000}, 1000)
    assert plan == plan_shards({"train": 50_000, "test": 10_000}, 1000)
    assert len(plan) == 60
    assert [shard.name for shard in plan[:2]] == ["train/00000", "train/00001"]
    uneven = plan_shards({"train": 250, "test": 100}, 60)
    assert [(s.split, s.start, s.stop) for s in uneven if s.split == "train"][-1] == ("train", 240, 250)
    for split, size in {"train": 250, "test": 100}.items():
        rows = np.concatenate([np.arange(s.start, s.stop) for s in uneven if s.split == split])
        np.testing.assert_array_equal(rows, np.arange(size))


def test_traversal_members_are_never_written_and_a_linked_batch_is_refused(tmp_path):
    outside = tmp_path / "outside"
    members = cifar_members()
    path = tmp_path / "hostile.tar.gz"
    write_archive(path, [(f"../{outside.name}", b"x"), (str(outside), b"x"), *members.items()])
    assert read(path)["train"][0].shape == (200, 32, 32, 3)
    assert not outside.exists() and not (tmp_path.parent / outside.name).exists()

    linked = tmp_path / "linked.tar.gz"
    link = tarfile.TarInfo(f"{BATCH_DIR}/data_batch_1")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    write_archive(linked, [(link.name, link), *((name, payload) for name, payload in members.items() if name != link.name)])
    with pytest.raises(ArchiveError, match="data_batch_1 is not a regular file"):
        read(linked)


# Crafted archives. Each is refused with one line that names the member; the ones that used to crash the
# process or allocate gigabytes are read in a child process, which shows a crash as a signal and has its own peak memory.

REPO = Path(__file__).resolve().parents[1]
_reconstruct = np._core.multiarray._reconstruct


class Reduce:
    """Pickles as `func(*args)`, then BUILD with `state` when one is given: any call a crafted batch can ask for."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def pickled_array(shape, dtype, raw, is_fortran=False):
    """An array as numpy pickles one, with whatever state the test chooses."""
    return Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, is_fortran, raw))


def python2_batch_pickle(data: np.ndarray, labels: dict[bytes, list[int]], name: str) -> bytes:
    """A batch byte for byte as Python 2 cPickle wrote the official files (str as BINSTRING, numpy.core globals);
    `labels` maps each label key (CIFAR-10: b"labels"; CIFAR-100: b"fine_labels", b"coarse_labels") to its list."""

    def text(raw: bytes) -> bytes:
        return b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw

    def small(number: int) -> bytes:
        return b"K" + bytes([number]) if number < 256 else b"M" + struct.pack("<H", number)

    rows, width = data.shape
    return b"".join(
        [
            b"\x80\x02}(",
            text(b"batch_label"),
            text(name.encode()),
            *(part for key, values in labels.items() for part in (text(key), b"](", *map(small, values), b"e")),
            text(b"data"),
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85",
            text(b"b"),
            b"\x87R(",
            small(1),
            small(rows),
            small(width),
            b"\x86cnumpy\ndtype\n",
            text(b"u1"),
            b"K\x00K\x01\x87R(K\x03",
            text(b"|"),
            b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89",
            text(data.tobytes()),
            b"tb",
            text(b"filenames"),
            b"](",
            *(text(f"img_{i}.png".encode()) for i in range(rows)),
            b"eu.",
        ]
    )


def crafted_test_batch(tmp_path, data, labels=None):
    """The tiny archive with test_batch replaced by a batch holding `data` (and three labels unless told)."""
    batch = {b"data": data, b"labels": [0, 0, 0] if labels is None else labels}
    return _archive_with(tmp_path, lambda m: m.update({f"{BATCH_DIR}/test_batch": pickle.dumps(batch, protocol=2)}))


def tar_blocks(*infos: tarfile.TarInfo) -> bytes:
    """Tar header blocks alone, so a header can declare data that is not there."""
    return b"".join(info.tobuf(tarfile.USTAR_FORMAT) for info in infos)


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info


def read_in_child(path, *read_args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Read the archive in a fresh Python (`read_args`: the format and label mode); return the run and its peak
    resident memory in bytes.

    The peak is VmHWM: ru_maxrss keeps, across exec, the resident size of the pytest process the child forked from.
    """
    script = (
        "import sys\n"
        "from cifar_transfer.cifar import read_archive\n"
        "from cifar_transfer.errors import ArchiveError\n"
        "try:\n"
        "    content = read_archive(open(sys.argv[1], 'rb'), *sys.argv[2:])\n"
        "    print('read', content.format, {split: len(labels) for split, (_, labels) in content.splits.items()})\n"
        "except ArchiveError as error:\n"
        "    print('ArchiveError:', error)\n"
        "print('peak KiB', next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(path), *read_args], cwd=REPO, capture_output=True, text=True, timeout=300)
    peak = re.search(r"^peak KiB (\d+)$", run.stdout, re.M)
    return run, int(peak.group(1)) * 1024 if peak else -1


def test_python2_and_python3_pickles_of_the_same_batches_read_the_same(tmp_path):
    members = cifar_members()
    python2_members = dict(members)
    for name in SPLIT_MEMBERS["train"] + SPLIT_MEMBERS["test"]:
        batch = pickle.loads(members[name], encoding="bytes")
        python2_members[name] = python2_batch_pickle(batch[b"data"], {b"labels": batch[b"labels"]}, batch[b"batch_label"].decode())
    write_archive(tmp_path / "python2.tar.gz", python2_members)
    write_archive(tmp_path / "python3.tar.gz", members)
    python2, python3 = read(tmp_path / "python2.tar.gz"), read(tmp_path / "python3.tar.gz")
    for split in ("train", "test"):
        for mine, theirs in zip(python2[split], python3[split], strict=True):
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and mine.tobytes() == theirs.tobytes()


def test_forged_object_pointer_used_as_a_shape_is_refused_without_a_signal(tmp_path):
    # ndarray((1,), dtype('O'), b'AAAAAAAA') holds a pointer to address 0x4141414141414141; as a shape, numpy reads it.
    forged = Reduce(np.ndarray, ((1,), np.dtype("O"), b"AAAAAAAA"))
    run, _ = read_in_child(crafted_test_batch(tmp_path, Reduce(np.ndarray, (forged, np.dtype("u1")))))
    assert run.returncode == 0, run.stderr  # a segfault shows as -11
    assert (
        "ArchiveError: member cifar-10-batches-py/test_batch is not a CIFAR-10 batch (dtype 'O8' is not a plain numeric dtype)"
        in run.stdout
    )


@pytest.mark.parametrize(
    "data, problem",
    [
        # Zero row stride: 5,000,000 rows over one row of bytes, 15 GB once concatenated.
        (Reduce(np.ndarray, ((5_000_000, 3072), np.dtype("u1"), bytes(3072), 0, (0, 1))), "numpy.ndarray may not be called"),
        (pickled_array((5_000_000, 3072), np.dtype("u1"), bytes(3072)), r"array of shape \(5000000, 3072\) \(uint8\) does not match"),
    ],
    ids=["zero-stride", "shape-beyond-bytes"],
)
def test_rows_claimed_beyond_the_bytes_present_are_refused_in_bounded_memory(tmp_path, data, problem):
    # As many labels as rows claimed, so the rows would pass the batch checks; an array, as a list would be too many operations.
    run, peak = read_in_child(crafted_test_batch(tmp_path, data, labels=np.zeros(5_000_000, np.uint8)))
    assert run.returncode == 0, run.stderr
    assert re.search(rf"^ArchiveError: member cifar-10-batches-py/test_batch is not a CIFAR-10 batch \({problem}", run.stdout, re.M)
    assert 0 < peak < 2 * 2**30


BOMB_BYTES = 256 * 2**20


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """Archives whose data_batch_1 inflates to 256 MiB of zeros (about 250 KiB compressed): once declared, once hidden."""
    folder = tmp_path_factory.mktemp("bombs")
    first = f"{BATCH_DIR}/data_batch_1"
    declared = folder / "declared.tar.gz"
    with tarfile.open(declared, "w:gz") as archive, open("/dev/zero", "rb") as zeros:
        archive.addfile(header(first, BOMB_BYTES), zeros)
    # The header says 1 KiB of a real batch; the rest of the batch and the zeros follow where headers should be.
    hidden = folder / "hidden.tar.gz"
    payload = cifar_members()[first]
    with gzip.open(hidden, "wb") as stream, open("/dev/zero", "rb") as zeros:
        stream.write(tar_blocks(header(first, 1024)) + payload)
        for _ in range(BOMB_BYTES // 2**20):
            stream.write(zeros.read(2**20))
    return {"declared": declared, "hidden": hidden}


@pytest.mark.parametrize(
    "bomb, problem",
    [
        ("declared", rf"data_batch_1 declares {BOMB_BYTES} bytes, more than a CIFAR-10 batch can be"),
        ("hidden", r"data_batch_1 is not a CIFAR-10 batch \(expected \d+ bytes in a unicodestring4, but only \d+ remain\)"),
    ],
    ids=["declared", "hidden"],
)
def test_a_member_inflating_beyond_a_batch_is_never_read_whole(bombs, bomb, problem):
    run, peak = read_in_child(bombs[bomb])
    assert run.returncode == 0, run.stderr
    assert re.search(rf"^ArchiveError: member cifar-10-batches-py/{problem}", run.stdout, re.M)
    assert 0 < peak < BOMB_BYTES / 2  # the zeros never sat in memory


UINT8 = np.dtype("u1")


@pytest.mark.parametrize(
    "data, problem",
    [
        (pickled_array((1,), np.dtype("O"), b"A" * 8), "dtype 'O8' is not a plain numeric dtype"),
        (pickled_array((3, 3072), np.dtype("V8"), bytes(8)), "dtype 'V8' is not a plain numeric dtype"),
        (pickled_array((3,), np.dtype([("red", "u1")]), bytes(3)), "dtype 'V1' is not a plain numeric dtype"),
        (
            pickled_array((3,), Reduce(np.dtype, ("u1", False, True), (3, "|", None, ("red",), {"red": (UINT8, 0)}, 1, 1, 16)), bytes(3)),
            "dtype u1 has the state of a structured or object dtype",
        ),
        (
            pickled_array((3,), Reduce(np.dtype, ("i8", False, True), (3, "|", None, None, None, -1, -1, 0)), bytes(24)),
            "dtype i8 has byte order '|'",
        ),
        (pickled_array((3,), Reduce(np.dtype, ("u1", True, True)), bytes(3)), r"numpy.dtype is allowed only as dtype\(name, 0, 1\)"),
        (pickled_array((3, 3072), UINT8, bytes(3 * 3072), is_fortran=True), "array is not in C order"),
        (pickled_array((-3, 3072), UINT8, bytes(3 * 3072)), "array shape is not one or two sizes a batch can hold"),
        (pickled_array((True, 3072), UINT8, bytes(3072)), "array shape is not one or two sizes a batch can hold"),
        (pickled_array((3, 3072, 1), UINT8, bytes(3 * 3072)), "array shape is not one or two sizes a batch can hold"),
        (pickled_array((2**40, 0), UINT8, b"\0"), "array shape is not one or two sizes a batch can hold"),
        (pickled_array((3, 3072), UINT8, "\0" * 3 * 3072), r"array of shape \(3, 3072\) \(uint8\) does not match"),
        (Reduce(_reconstruct, (np.ndarray, (3, 3072), b"b")), r"numpy _reconstruct is allowed only as"),
        (Reduce(_reconstruct, (np.ndarray, (0,), b"b")), "holds an array that was never given its data"),
    ],
)
def test_arrays_other_than_plain_numeric_c_order_ones_are_refused(tmp_path, data, problem):
    with pytest.raises(ArchiveError, match=rf"^member cifar-10-batches-py/test_batch (is not a CIFAR-10 batch \()?{problem}") as error:
        read(crafted_test_batch(tmp_path, data))
    assert "\n" not in str(error.value) and str(error.value).endswith("use the official cifar-10-python.tar.gz")


@pytest.mark.parametrize(
    "labels, problem",
    [
        ([0, 1.0, 2], "'labels' is a list holding other than 64-bit integers"),
        ([0, True, 2], "'labels' is a list holding other"),
        ([0, 1, 2**70], "'labels' is a list holding other"),
        ([0, 1, 2**62], r"labels range 0..4611686018427387904, expected 0..9"),
        ([0, 1], "'labels' has 2 entries, expected 3"),
        (np.zeros((3, 1), np.int64), r"'labels' is int64 \(3, 1\)"),
    ],
)
def test_labels_must_be_a_list_of_small_integers(tmp_path, labels, problem):
    with pytest.raises(ArchiveError, match=f"test_batch: {problem}"):
        read(crafted_test_batch(tmp_path, np.zeros((3, 3072), np.uint8), labels))


def test_a_pickle_cannot_change_the_stand_ins_it_is_given(tmp_path):
    # BUILD on numpy.dtype with slot state {'name': 'O8'} would set an attribute on the object every load shares.
    build_on_global = b"\x80\x02cnumpy\ndtype\nN}X\x04\x00\x00\x00nameX\x02\x00\x00\x00O8s\x86b."
    with pytest.raises(ArchiveError, match=r"test_batch is not a CIFAR-10 batch \(a global may not be given a state\)"):
        read(_archive_with(tmp_path, lambda m: m.update({f"{BATCH_DIR}/test_batch": build_on_global})))
    assert read(_archive_with(tmp_path, lambda m: None))["test"][0].shape == (100, 32, 32, 3)


def _tar_gz(tmp_path, body: bytes) -> Path:
    path = tmp_path / "crafted.tar.gz"
    path.write_bytes(gzip.compress(body + bytes(1024)))
    return path


def _pax(name: str, records: dict[str, str]) -> bytes:
    info = tarfile.TarInfo(name)
    info.pax_headers = records
    return info.tobuf(tarfile.PAX_FORMAT)


def _global_pax_header() -> bytes:
    buffer = io.BytesIO()
    tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}).close()  # the header alone
    return buffer.getvalue()


@pytest.mark.parametrize(
    "body, problem",
    [
        # tarfile reads a pax header whole: this one declares 1 GiB.
        (tar_blocks(header("././@PaxHeader", 2**30, tarfile.XHDTYPE)), r"member ././@PaxHeader is a tar header of 1073741824 bytes"),
        (tar_blocks(header("././@LongLink", 2**30, tarfile.GNUTYPE_LONGNAME)), r"member ././@LongLink is a tar header of 1073741824 bytes"),
        (_global_pax_header(), "is a global pax header or a sparse file"),
        (
            tar_blocks(header(f"{BATCH_DIR}/data_batch_1", 0, tarfile.GNUTYPE_SPARSE)),
            "data_batch_1 is a global pax header or a sparse file",
        ),
        # A GNU 1.0 sparse map follows the header; tarfile would read any number of entries.
        (
            _pax(f"{BATCH_DIR}/data_batch_1", {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}) + b"99999999\n" + b"0\n" * 256,
            "data_batch_1 is a sparse file",
        ),
        (tar_blocks(*(header(f"junk_{i}", 0) for i in range(1001))), "archive holds more than 1000 members"),
        # Each pax header nests tarfile one call deeper.
        (
            tar_blocks(*(header("././@PaxHeader", 0, tarfile.XHDTYPE) for _ in range(2000))),
            r"truncated or not a tar.gz \(maximum recursion",
        ),
    ],
    ids=["pax-header", "long-name", "global-pax", "old-sparse", "sparse-map", "members", "nested-headers"],
)
def test_tar_headers_that_would_make_tarfile_allocate_much_are_refused(tmp_path, body, problem):
    with pytest.raises(ArchiveError, match=problem) as error:
        read(_tar_gz(tmp_path, body))
    assert "\n" not in str(error.value)


def _repeated_encode(text_bytes: int, copies: int) -> bytes:
    """A pickle that encodes one memoized text `copies` times: each copy costs it 13 bytes."""
    text = b"X" + struct.pack("<I", text_bytes) + b"a" * text_bytes + b"q\x01"
    first = b"c_codecs\nencode\nq\x00" + text + b"X\x06\x00\x00\x00latin1q\x02\x86R"
    return b"\x80\x02](" + first + b"h\x00h\x01h\x02\x86R" * (copies - 1) + b"e."


@pytest.mark.parametrize(
    "payload, problem",
    [
        # The unpickler sizes its memo to the highest slot: 2**31 slots are 16 GiB.
        (b"\x80\x02Nr\xff\xff\xff\x7f.", "memo slot 2147483647 is beyond what a batch uses"),
        # One byte an operation, eight bytes a list entry, more again on the unpickler's stack.
        (b"\x80\x02](" + b"N" * (60 * 2**20) + b"e.", "more than 250000 pickle operations"),
        (_repeated_encode(16 * 2**20, 64), "_codecs.encode makes more bytes than the pickle holds"),
    ],
    ids=["memo-slot", "operations", "repeated-encode"],
)
def test_pickles_that_would_allocate_far_beyond_their_size_are_refused(tmp_path, payload, problem):
    run, peak = read_in_child(_archive_with(tmp_path, lambda m: m.update({f"{BATCH_DIR}/test_batch": payload})))
    assert run.returncode == 0, run.stderr
    assert re.search(rf"^ArchiveError: member cifar-10-batches-py/test_batch is not a CIFAR-10 batch \({problem}\)", run.stdout, re.M)
    assert 0 < peak < 512 * 2**20


# CIFAR-100: the same reader with its own layout, label sets and bounds; CIFAR-10 reads as it always has.


def cifar100_archive(tmp_path, change=None) -> tuple[Path, str, dict[str, bytes]]:
    """A 60 train + 20 test image CIFAR-100 archive, changed as the test says: (path, md5, members)."""
    members = cifar100_members()
    if change is not None:
        change(members)
    path = tmp_path / "cifar-100-python.tar.gz"
    return path, write_archive(path, members), members


def unpickled(members: dict[str, bytes], name: str) -> dict:
    return pickle.loads(members[name], encoding="bytes")


def hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def python2_meta_pickle(meta: dict[bytes, list[bytes]]) -> bytes:
    """A meta member as Python 2 cPickle wrote the official ones: a dict of lists of short strings."""

    def text(raw: bytes) -> bytes:
        return b"U" + bytes([len(raw)]) + raw

    entries = (part for key, names in meta.items() for part in (text(key), b"](", *map(text, names), b"e"))
    return b"".join([b"\x80\x02}(", *entries, b"u."])


@pytest.mark.parametrize(
    "label_mode, key, names", [(None, b"fine_labels", 0), ("fine", b"fine_labels", 0), ("coarse", b"coarse_labels", 1)]
)
def test_reads_cifar100_with_fine_labels_by_default_and_coarse_on_request(tmp_path, label_mode, key, names):
    path, _, members = cifar100_archive(tmp_path)
    content = read_content(path, "cifar100", label_mode)
    assert (content.format, content.label_mode, content.classes) == ("cifar100", label_mode or "fine", cifar100_class_names()[names])
    for split, count in (("train", 60), ("test", 20)):
        batch = unpickled(members, f"{C100}/{split}")
        images, labels = content.splits[split]
        assert images.shape == (count, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
        assert list(labels) == batch[key]
        np.testing.assert_array_equal(images, hwc(batch[b"data"]))


def test_cifar10_class_names_come_from_its_meta_and_must_be_the_known_ones(tiny_archive, tmp_path):
    content = read_content(tiny_archive[0])
    assert (content.format, content.label_mode, content.classes) == ("cifar10", None, CLASS_NAMES)
    assert read_content(tiny_archive[0], "auto", "default").classes == CLASS_NAMES
    swapped = pickle.dumps({b"label_names": [name.encode() for name in CLASS_NAMES[::-1]]}, protocol=2)
    with pytest.raises(ArchiveError, match=r"^member cifar-10-batches-py/batches.meta: 'label_names' differ from CIFAR-10's \(airplane, "):
        read(_archive_with(tmp_path, lambda m: m.update({f"{BATCH_DIR}/batches.meta": swapped})))
    with pytest.raises(ArchiveError, match="lacks cifar-10-batches-py/batches.meta: it is not a complete CIFAR-10 python archive"):
        read(_archive_with(tmp_path, lambda m: m.pop(f"{BATCH_DIR}/batches.meta")))


def test_the_format_is_told_by_member_names(tiny_archive, tmp_path):
    cifar10, _ = tiny_archive
    cifar100, _, _ = cifar100_archive(tmp_path)
    assert detect_archive_format(["README", C100, f"{C100}/train"]) == "cifar100"
    assert detect_archive_format([f"{BATCH_DIR}/batches.meta"]) == "cifar10"
    for path, name in ((cifar10, "cifar10"), (cifar100, "cifar100")):
        with open(path, "rb") as stream:
            assert archive_format_of(stream) == name
        assert read_content(path, "auto").format == name

    neither = tmp_path / "neither.tar.gz"
    write_archive(neither, {f"{BATCH_DIR}.old/data_batch_1": b"x", "cifar-100/train": b"x"})
    expected = (
        r"^archive holds no member under cifar-10-batches-py/ or cifar-100-python/: "
        r"use the official cifar-10-python.tar.gz or cifar-100-python.tar.gz$"
    )
    for attempt in (lambda: read_content(neither, "auto"), lambda: archive_format_of(open(neither, "rb"))):
        with pytest.raises(ArchiveError, match=expected):
            attempt()
    with pytest.raises(ArchiveError, match="^archive lacks cifar-10-batches-py/batches.meta, cifar-10-batches-py/data_batch_1, "):
        read(neither)


@pytest.mark.parametrize(
    "read_as, members_of, message",
    [
        ("cifar10", "cifar100", rf"^member {C100}/train is from a CIFAR-100 archive, not CIFAR-10: read it as 'cifar100' or 'auto'$"),
        (
            "cifar100",
            "cifar10",
            rf"^member {BATCH_DIR}/data_batch_1 is from a CIFAR-10 archive, not CIFAR-100: read it as 'cifar10' or 'auto'$",
        ),
        ("auto", "both", rf"^member {C100}/train is from a CIFAR-100 archive, not CIFAR-10: earlier members are CIFAR-10$"),
    ],
)
def test_an_archive_of_another_format_is_refused_at_its_first_member(tmp_path, read_as, members_of, message):
    members = {"cifar10": cifar_members(), "cifar100": cifar100_members(), "both": cifar_members() | cifar100_members()}[members_of]
    path = tmp_path / "other.tar.gz"
    write_archive(path, members)
    with pytest.raises(ArchiveError, match=message):
        read_content(path, read_as)


def _meta(fine: list, coarse: list | None = None) -> dict[str, bytes]:
    coarse = [name.encode() for name in cifar100_class_names()[1]] if coarse is None else coarse
    return {f"{C100}/meta": pickle.dumps({b"fine_label_names": fine, b"coarse_label_names": coarse}, protocol=2)}


def _test_member(fine: list[int], coarse: list[int] | None = None, rows: int | None = None) -> dict[str, bytes]:
    data = np.zeros((len(fine) if rows is None else rows, 3072), np.uint8)
    return {f"{C100}/test": cifar100_batch_pickle(data, fine, [0] * len(fine) if coarse is None else coarse, "x")}


FINE = [name.encode() for name in cifar100_class_names()[0]]


@pytest.mark.parametrize(
    "change, label_mode, message",
    [
        (lambda m: m.update(_test_member([0, 100, 5])), None, rf"^member {C100}/test: fine_labels range 0..100, expected 0..99: "),
        (
            lambda m: m.update(_test_member([0, 1, 2], [0, 20, 1])),
            "coarse",
            rf"^member {C100}/test: coarse_labels range 0..20, expected 0..19: ",
        ),
        (lambda m: m.update(_test_member([0, 1], rows=3)), None, rf"^member {C100}/test: 'fine_labels' has 2 entries, expected 3: "),
        (
            lambda m: m.update({f"{C100}/test": pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}, protocol=2)}),
            "coarse",
            rf"^member {C100}/test: 'coarse_labels' is NoneType, expected a list of integers: ",
        ),
        (lambda m: m.pop(f"{C100}/meta"), None, rf"^archive lacks {C100}/meta: it is not a complete CIFAR-100 python archive$"),
        (lambda m: m.pop(f"{C100}/test"), None, rf"^archive lacks {C100}/test: it is not a complete CIFAR-100 python archive$"),
        (
            lambda m: m.update(_meta(FINE[:99])),
            None,
            rf"^member {C100}/meta: 'fine_label_names' is not a list of 100 printable byte strings: ",
        ),
        (lambda m: m.update(_meta(FINE, [b"x"] * 20)), "coarse", rf"^member {C100}/meta: 'coarse_label_names' names a class twice: "),
        (
            lambda m: m.update(_meta([name.decode() for name in FINE])),
            None,
            "'fine_label_names' is not a list of 100 printable byte strings",
        ),
        (lambda m: m.update(_meta([b"bad\nname", *FINE[1:]])), None, "'fine_label_names' is not a list of 100 printable byte strings"),
        # A meta member holds names and numbers only, so it is given no numpy stand-in.
        (
            lambda m: m.update(_meta(np.array(FINE))),
            None,
            rf"^member {C100}/meta is not a CIFAR-100 meta member "
            r"\(global numpy\.(_)?core\.multiarray\._reconstruct is not allowed in a CIFAR-100 meta member\)",
        ),
    ],
    ids=[
        "fine-range",
        "coarse-range",
        "label-count",
        "no-coarse",
        "no-meta",
        "no-test",
        "99-names",
        "twice",
        "str-names",
        "newline",
        "array",
    ],
)
def test_a_cifar100_archive_with_wrong_content_is_refused_in_one_line(tmp_path, change, label_mode, message):
    path, _, _ = cifar100_archive(tmp_path, change)
    with pytest.raises(ArchiveError, match=message) as error:
        read_content(path, "cifar100", label_mode)
    assert "\n" not in str(error.value)


def test_unknown_formats_and_label_modes_are_refused_before_reading(tiny_archive):
    for archive_format, label_mode, message in [
        ("cifar100", "medium", "label mode 'medium' is not one of CIFAR-100's: fine, coarse"),
        ("cifar10", "fine", "label mode 'fine' is not one of CIFAR-10's: default"),
        ("cifar1000", None, "archive format 'cifar1000' is not one of cifar10, cifar100"),
    ]:
        with pytest.raises(ConfigError, match=message):
            read_content(tiny_archive[0], archive_format, label_mode)


def test_python2_and_python3_pickles_of_cifar100_read_the_same(tmp_path):
    members = cifar100_members()
    python2_members = dict(members)
    for split in ("train", "test"):
        batch = unpickled(members, f"{C100}/{split}")
        labels = {key: batch[key] for key in (b"fine_labels", b"coarse_labels")}
        python2_members[f"{C100}/{split}"] = python2_batch_pickle(batch[b"data"], labels, batch[b"batch_label"].decode())
    python2_members[f"{C100}/meta"] = python2_meta_pickle(unpickled(members, f"{C100}/meta"))
    write_archive(tmp_path / "python2.tar.gz", python2_members)
    write_archive(tmp_path / "python3.tar.gz", members)
    for label_mode in ("fine", "coarse"):
        python2, python3 = (read_content(tmp_path / f"{name}.tar.gz", "cifar100", label_mode) for name in ("python2", "python3"))
        assert python2.classes == python3.classes and len(python2.classes) == {"fine": 100, "coarse": 20}[label_mode]
        for split in ("train", "test"):
            for mine, theirs in zip(python2.splits[split], python3.splits[split], strict=True):
                assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and mine.tobytes() == theirs.tobytes()


def test_row_bounds_are_per_format(tmp_path):
    rows = np.zeros((10_001, 3072), np.uint8)
    cifar10 = _archive_with(tmp_path, lambda m: m.update({f"{BATCH_DIR}/test_batch": batch_pickle(rows, [0] * 10_001, "x")}))
    with pytest.raises(ArchiveError, match=r"test_batch: 'data' has 10001 rows, more than a CIFAR-10 batch's 10000"):
        read(cifar10)
    cifar100, _, _ = cifar100_archive(tmp_path, lambda m: m.update(_test_member([0] * 10_001)))
    assert read_content(cifar100, "cifar100").splits["test"][0].shape == (10_001, 32, 32, 3)


@pytest.mark.parametrize(
    "read_as, member, size, problem",
    [
        ("cifar10", f"{BATCH_DIR}/data_batch_1", 64 * 2**20 + 1, "more than a CIFAR-10 batch can be (67108864)"),
        ("cifar100", f"{C100}/train", 320 * 2**20 + 1, "more than a CIFAR-100 batch can be (335544320)"),
        ("cifar100", f"{C100}/meta", 2**20 + 1, "more than a meta member can be (1048576)"),
    ],
)
def test_member_size_bounds_are_per_format(tmp_path, read_as, member, size, problem):
    with pytest.raises(ArchiveError, match=rf"^member {member} declares {size} bytes, {re.escape(problem)}: use the official "):
        read_content(_tar_gz(tmp_path, tar_blocks(header(member, size))), read_as)


@pytest.mark.slow
def test_a_full_size_cifar100_train_member_is_read_in_bounded_memory(tmp_path):
    # 50,000 rows pickled as the official file is: 154 MB, beyond CIFAR-10's bound on a member.
    fine = [row % 100 for row in range(50_000)]
    labels = {b"fine_labels": fine, b"coarse_labels": [label // 5 for label in fine]}
    train = python2_batch_pickle(np.zeros((50_000, 3072), np.uint8), labels, "training batch 1 of 1")
    path = tmp_path / "full.tar.gz"
    write_archive(path, cifar100_members() | {f"{C100}/train": train})
    del train
    run, peak = read_in_child(path, "cifar100", "coarse")
    assert run.returncode == 0, run.stderr
    assert "read cifar100 {'train': 50000, 'test': 20}" in run.stdout, run.stdout
    assert 0 < peak < 2**30  # about 470 MiB: the member, its pixels, the split built from them


def test_decode_stores_each_cifar100_label_mode_in_its_own_folder(tmp_path):
    path, md5, members = cifar100_archive(tmp_path)
    storage_url = str(tmp_path / "storage")
    fine = decode_archive(storage_url, str(path), md5, "cifar100")
    coarse = decode_archive(storage_url, str(path), md5, "cifar100", "coarse")
    assert fine.folder.endswith(f"/datasets/cifar100-fine-{md5}") and coarse.folder.endswith(f"/datasets/cifar100-coarse-{md5}")
    assert (fine.format, fine.label_mode, fine.classes, fine.sizes) == (
        "cifar100",
        "fine",
        cifar100_class_names()[0],
        {"train": 60, "test": 20},
    )
    assert (coarse.format, coarse.label_mode, coarse.classes) == ("cifar100", "coarse", cifar100_class_names()[1])
    for info, key in ((fine, b"fine_labels"), (coarse, b"coarse_labels")):
        files = layout.dataset_files_in(info.folder)
        for split in ("train", "test"):
            batch = unpickled(members, f"{C100}/{split}")
            assert list(np.load(files.array(split, "labels"))) == batch[key]
            np.testing.assert_array_equal(np.load(files.array(split, "images")), hwc(batch[b"data"]))
    stamp = os.stat(f"{fine.folder}/train_images.npy").st_mtime_ns
    assert decode_archive(storage_url, str(path), md5, "auto") == fine  # found by its format's folder, not decoded again
    assert os.stat(f"{fine.folder}/train_images.npy").st_mtime_ns == stamp
    assert finished_dataset(storage_url, md5, "cifar100", "coarse") == coarse
    assert finished_dataset(storage_url, md5) is None  # a CIFAR-10 dataset of that checksum was never decoded
    with pytest.raises(ArchiveError, match="is from a CIFAR-100 archive, not CIFAR-10"):
        decode_archive(storage_url, str(path), md5)


def test_cifar10_keeps_its_folder_and_markers_written_before_formats_still_load(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    storage_url = str(tmp_path / "storage")
    info = decode_archive(storage_url, str(path), md5, "auto")
    files = layout.dataset_files(Storage(storage_url), md5)
    assert info.folder == files.folder and info.id == dataset_id(md5) == md5 and files.folder.endswith(f"cifar10-{md5}")
    assert (info.format, info.label_mode, info.classes) == ("cifar10", None, CLASS_NAMES)
    written_before = {  # as markers were written before CIFAR-100 and before format versions: the folder's full path
        name: value
        for name, value in json.loads(Path(files.marker).read_text()).items()
        if name not in ("format", "label_mode", "format_version")
    }
    assert written_before["folder"] == f"datasets/cifar10-{md5}"  # stored relative to the storage root since version 3
    written_before["folder"] = files.folder
    Path(files.marker).write_text(json.dumps(written_before))
    assert read_marker(Storage(storage_url), files.marker) == info
    assert finished_dataset(storage_url, md5) == info


def test_the_registry_names_the_official_archives():
    assert {name: (f.official_name, f.official_md5) for name, f in ARCHIVE_FORMATS.items()} == {
        "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    }


@pytest.mark.parametrize("archive_format, label_mode", [("cifar10", None), ("cifar100", "fine"), ("cifar100", "coarse")])
def test_a_dataset_id_reads_back_as_what_made_it(archive_format, label_mode):
    from cifar_transfer.dataset import dataset_id, parse_dataset_id

    parsed = parse_dataset_id(dataset_id("0123456789abcdef0123456789abcdef", archive_format, label_mode))
    assert parsed == (archive_format, label_mode or "fine", "0123456789abcdef0123456789abcdef")
