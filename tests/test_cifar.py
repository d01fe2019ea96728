"""Reading the archive safely, storing it decoded, and planning shards (no Prefect needed)."""

from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np
import pytest
from conftest import BATCH_DIR, batch_pickle, cifar_images, cifar_members, write_archive

from tasks.cifar import decode_archive, plan_shards, read_archive, read_rows, shard_images
from tasks.errors import ArchiveError
from tasks.storage import Storage


def read(path):
    with open(path, "rb") as stream:
        return read_archive(stream)


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
        (lambda m: m.update({f"{BATCH_DIR}/test_batch": batch_pickle(np.zeros((3, 100), np.uint8), [0, 1, 2], "x")}),
         r"test_batch: 'data' is uint8 \(3, 100\)"),
        (lambda m: m.update({f"{BATCH_DIR}/test_batch": batch_pickle(np.zeros((3, 3072), np.float32), [0, 1, 2], "x")}),
         "test_batch: 'data' is float32"),
        (lambda m: m.update({f"{BATCH_DIR}/test_batch": batch_pickle(np.zeros((3, 3072), np.uint8), [0, 1, 12], "x")}),
         r"labels range 0..12, expected 0..9"),
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
