"""Any labelled image collection through the real flow: a folder tree and a Parquet table, kept current incrementally."""

from __future__ import annotations

import json
import os
import zlib
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_flow import task_states_since

from cifar_transfer.catalogue import find_feature_set
from cifar_transfer.config import load_config
from cifar_transfer.feature_records import read_manifest
from cifar_transfer.flows.pipeline import cifar_transfer, extract_features
from cifar_transfer.storage import Storage
from cifar_transfer.store import load_features, read_keys
from cifar_transfer.verify import verify_feature_set
from conftest import cifar_images

pytestmark = pytest.mark.usefixtures("prefect_api")

CLASSES = ["cat", "dog", "ship"]


def picture(label: int, seed: int) -> Image.Image:
    """A 32x32 image whose colour depends on its class, so a head can learn it."""
    data, _ = cifar_images(1, seed)
    rows = data.reshape(3, 32, 32).transpose(1, 2, 0).astype(np.int16)
    tint = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label], np.int16)
    return Image.fromarray(np.clip(rows // 3 + tint, 0, 255).astype(np.uint8))


def write_tree(root, per_class: dict[str, int], start: int = 0) -> list[str]:
    """ROOT/<split>/<class>/<n>.png files; returns the keys written."""
    keys = []
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            os.makedirs(root / split / name, exist_ok=True)
            for number in range(start, start + count):
                key = f"{split}/{name}/{number:04d}.png"
                picture(label, zlib.crc32(key.encode()) % 10_000).save(root / key)
                keys.append(key)
    return keys


def folder_config(root, storage, **options):
    settings = {
        "source": str(root),
        "storage": str(storage),
        "backbone": "MobileNetV2",
        "weights": "none",
        "input_size": 32,
        "shard_size": 10,
        "tsne_sample": 0,
        "epochs": 3,
        "head_batch_size": 32,
        "head": "ridge",
        "engine": "tensorflow",
        "precision": "float32",
    }
    return load_config(**{**settings, **options})


def shard_stamps(folder: str, split: str) -> dict[str, tuple[int, int]]:
    found = {}
    for name in sorted(os.listdir(os.path.join(folder, split))):
        if name.endswith(".parquet") and not name.startswith("."):
            stat = os.stat(os.path.join(folder, split, name))
            found[name] = (stat.st_ino, stat.st_mtime_ns)
    return found


def features_by_key(storage: str, split: str) -> dict[str, np.ndarray]:
    keys = read_keys(Storage(storage), find_feature_set(storage, splits=(split,)).folder, split)
    index, _, features = load_features(storage, split)
    return {keys[int(number)]: row for number, row in zip(index, features, strict=True)}


def test_a_folder_grows_shrinks_and_changes_touching_only_the_shards_that_hold_what_changed(tmp_path):
    root, storage = tmp_path / "photos", tmp_path / "storage"
    write_tree(root, {"train": 10, "test": 4})  # 30 train images: 3 shards of 10; 12 test: 2 shards
    first, stats = extract_features(folder_config(root, storage))
    assert first.splits == {"train": 30, "test": 12} and first.classes == CLASSES and stats.shards_computed == 5
    assert first.collection is not None and first.content_version
    before = features_by_key(str(storage), "train")
    stamps = shard_stamps(first.folder, "train")

    added = write_tree(root, {"train": 1}, start=100)  # 3 new train images: one new shard
    started = datetime.now(timezone.utc)
    grown, stats = extract_features(folder_config(root, storage))
    states = task_states_since(started)
    assert grown.folder == first.folder and grown.fingerprint == first.fingerprint
    assert stats.shards_computed == 1 and sorted(name for name in states if name.startswith("extract[")) == ["extract[train/00003]"]
    assert shard_stamps(first.folder, "train").items() >= stamps.items(), "an existing shard was rewritten"
    after = features_by_key(str(storage), "train")
    assert set(after) == set(before) | set(added) and all(np.array_equal(after[key], before[key]) for key in before)
    manifest = read_manifest(Storage(str(storage)), first.folder, "train")
    assert (manifest.version, manifest.rows, manifest.retired) == (2, 33, [])
    assert grown.content_version != first.content_version

    os.remove(root / "train" / "cat" / "0000.png")  # held by shard 0
    picture(2, 99).save(root / "train" / "ship" / "0009.png")  # held by shard 2, now another image
    changed, stats = extract_features(folder_config(root, storage))
    assert stats.shards_computed == 2
    manifest = read_manifest(Storage(str(storage)), first.folder, "train")
    assert manifest.version == 3 and sorted(manifest.retired) == ["part-00000.parquet", "part-00002.parquet"]
    assert [record.number for record in manifest.shards] == [1, 3, 4, 5] and manifest.rows == 32
    current = features_by_key(str(storage), "train")
    assert "train/cat/0000.png" not in current and not np.array_equal(current["train/ship/0009.png"], before["train/ship/0009.png"])
    # An unchanged image keeps its features: a kept shard is not rewritten; where its shard was recomputed with other
    # neighbours in its batches, within float rounding (oneDNN on this AVX2 CPU rounds by batch: 8e-17 on 1e-9 features).
    for key in set(before) - {"train/cat/0000.png", "train/ship/0009.png"}:
        np.testing.assert_allclose(current[key], before[key], rtol=1e-5, atol=1e-5 * np.abs(before[key]).max(), err_msg=key)
    assert os.path.exists(os.path.join(first.folder, "train", "part-00000.parquet")), "a reader of version 2 may still need it"
    assert verify_feature_set(str(storage), first.folder) == {
        "train/part-00000.parquet": ["not listed in the manifest"],
        "train/part-00002.parquet": ["not listed in the manifest"],
    }

    write_tree(root, {"train": 1}, start=200)  # the next version deletes what version 3 retired
    extract_features(folder_config(root, storage))
    assert not os.path.exists(os.path.join(first.folder, "train", "part-00000.parquet"))
    assert verify_feature_set(str(storage), first.folder) == {}


def test_a_mixed_folder_runs_end_to_end_skips_what_it_cannot_decode_and_reruns_as_a_no_op(tmp_path):
    root, storage = tmp_path / "photos", tmp_path / "storage"
    for label, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for number in range(12):
            image = picture(label, number).resize((40 + number, 30))
            form = ("JPEG", "PNG", "WEBP", "BMP")[number % 4]
            image.convert("L" if number == 5 else "RGB").save(root / name / f"{number:03d}.{form.lower()}", form)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    config = folder_config(root, storage, test_fraction=0.25)
    summary = cifar_transfer(config)
    total = summary.features.splits["train"] + summary.features.splits["test"]
    predictions = pd.read_parquet(summary.head.files.predictions)
    assert total == 36 and (predictions["split"] == "test").sum() == summary.features.splits["test"] >= 1
    skipped = [json.load(open(os.path.join(summary.features.folder, split, "_skipped.json")))["skipped"] for split in ("train", "test")]
    assert [entry["key"] for entries in skipped for entry in entries] == ["cat/broken.jpg"]
    with open(summary.html_report) as page:
        assert 'id="tsne-skipped"' in page.read()
    assert verify_feature_set(config.storage, summary.features.folder) == {}, "a shard short of its skipped image is whole"

    started = datetime.now(timezone.utc)
    again = cifar_transfer(config)
    states = task_states_since(started)
    assert again.extraction.shards_computed == 0 and states["head"] == ["Cached"]
    assert again.head.files.folder == summary.head.files.folder


def test_a_parquet_table_of_images_is_a_source_too(tmp_path):
    import io

    storage = tmp_path / "storage"
    os.makedirs(tmp_path / "table" / "data")
    for split, count in (("train", 30), ("test", 12)):
        labels = [number % 3 for number in range(count)]
        encoded = []
        for number, label in enumerate(labels):
            buffer = io.BytesIO()
            picture(label, number + (0 if split == "train" else 500)).save(buffer, "PNG")
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        table = pa.table({"image": encoded, "label": labels})
        names = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(names).encode()})
        pq.write_table(table, tmp_path / "table" / "data" / f"{split}-00000-of-00001.parquet")
    features, stats = extract_features(folder_config(tmp_path / "table", storage))
    assert features.splits == {"train": 30, "test": 12} and features.classes == CLASSES and stats.shards_computed == 5
    frame = pd.read_parquet(os.path.join(features.folder, "test"))
    assert frame["key"].str.startswith("data/test-00000-of-00001.parquet#").all() and sorted(frame["label"]) == sorted(
        n % 3 for n in range(12)
    )


def test_a_watch_says_changed_only_when_the_listing_changed(tmp_path):
    from cifar_transfer.collection import watch_collection

    root, storage = tmp_path / "photos", str(tmp_path / "storage")
    write_tree(root, {"train": 2, "test": 1})
    settings = folder_config(root, storage).collection_settings
    first = watch_collection(settings, storage)
    assert first.changed and first.previous_digest is None and first.dataset.sizes == {"train": 6, "test": 3}
    assert not watch_collection(settings, storage).changed
    write_tree(root, {"test": 1}, start=50)
    again = watch_collection(settings, storage)
    assert again.changed and again.previous_digest == first.dataset.listing_digest and again.dataset.sizes["test"] == 6


@pytest.mark.long
def test_a_kill_during_an_incremental_run_resumes_to_the_features_of_an_uninterrupted_one(tmp_path):
    """SIGKILL while a grown folder's new shards are computed: readers still see the old version whole, and the
    rerun computes only the new shards the kill left undone, ending bit for bit where a clean run ends."""
    from test_resume import EXTRACTION_OPTIONS, cli_command, finished_shards, kill_while_paused

    root, storage = tmp_path / "photos", tmp_path / "storage"
    write_tree(root, {"train": 10, "test": 4})
    first, _ = extract_features(folder_config(root, storage))
    old_version = read_manifest(Storage(str(storage)), first.folder, "train")
    old_shards = finished_shards(storage)
    write_tree(root, {"train": 20}, start=100)  # 60 new train images: six new shards, numbers 3 to 8
    command = cli_command("extract", folder_config(root, storage), [name for name in EXTRACTION_OPTIONS if name != "md5"])
    kill_while_paused(command, "train/00006", tmp_path / "paused")
    survivors = finished_shards(storage)
    new_done = len(survivors) - len(old_shards)
    assert 2 <= new_done < 6 and not any(name.endswith("/part-00006.parquet") for name in survivors), "the kill did not land mid-run"
    assert read_manifest(Storage(str(storage)), first.folder, "train") == old_version, "readers must see the old version whole"
    assert len(load_features(str(storage), "train")[0]) == 30  # the old version, read whole

    resumed, stats = extract_features(folder_config(root, storage))
    assert stats.shards_computed == 6 - new_done
    after = finished_shards(storage)
    assert {name: after[name] for name in survivors} == survivors, "a shard finished before the kill was rewritten"
    assert read_manifest(Storage(str(storage)), first.folder, "train").version == 2
    reference, _ = extract_features(folder_config(root, tmp_path / "reference"))
    assert reference.fingerprint == resumed.fingerprint
    resumed_rows, clean_rows = features_by_key(str(storage), "train"), features_by_key(str(tmp_path / "reference"), "train")
    assert resumed_rows.keys() == clean_rows.keys() and len(clean_rows) == 90
    for key, row in clean_rows.items():
        np.testing.assert_array_equal(resumed_rows[key], row)
