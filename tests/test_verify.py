"""Damaged outputs are found by content, and `cifar-transfer verify --repair` restores them exactly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_flow import shard_files, tiny_config

from cifar_transfer.errors import FeatureSetError
from cifar_transfer.flows.cli import main
from cifar_transfer.flows.pipeline import cifar_transfer, extract_features
from cifar_transfer.store import load_features
from cifar_transfer.verify import verify_feature_set
from conftest import copy_of_finished_run

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_verify_finds_each_kind_of_damage_and_repair_restores_the_features(finished_run, tiny_archive, tmp_path, capsys):
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    features, _ = extract_features(config)
    folder = features.folder
    reference = {split: load_features(config.storage, split)[2] for split in ("train", "test")}
    assert verify_feature_set(config.storage, folder) == {}
    assert main(["verify", "--storage", config.storage]) == 0
    assert capsys.readouterr().out.startswith("OK ")

    train, test = os.path.join(folder, "train"), os.path.join(folder, "test")
    with open(os.path.join(train, "part-00000.parquet"), "r+b") as stream:
        stream.truncate(500)
    flipped = os.path.join(train, "part-00001.parquet")
    payload = bytearray(open(flipped, "rb").read())
    payload[200] ^= 0xFF
    open(flipped, "wb").write(bytes(payload))
    other, _ = extract_features(tiny_config(tiny_archive, tmp_path / "other", seed=9))
    shutil.copy(os.path.join(other.folder, "train", "part-00002.parquet"), os.path.join(train, "part-00002.parquet"))
    os.remove(os.path.join(test, "_manifest.json"))
    open(os.path.join(train, ".part-00003.parquet.feedfacecafe.tmp"), "wb").write(b"half")
    shutil.copy(os.path.join(other.folder, "train", "part-00003.parquet"), os.path.join(train, "part-00099.parquet"))
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    held = {"id": "killed-run", "host": socket.gethostname(), "pid": int(killed), "deadline": time.time() + 3600, "beat": 3}
    open(os.path.join(train, ".part-00003.parquet.claim"), "w").write(json.dumps(held))  # left by a run killed mid-shard

    problems = verify_feature_set(config.storage, folder)
    assert problems["train/part-00000.parquet"][0].startswith("500 bytes, the manifest says")
    assert problems["train/part-00001.parquet"] == ["SHA-256 differs from the manifest"]
    assert any("written by another configuration" in p for p in problems["train/part-00002.parquet"])
    assert problems["test/_manifest.json"] == ["missing: the split is incomplete"]
    assert problems["train/.part-00003.parquet.feedfacecafe.tmp"] == ["leftover temporary file of an interrupted write"]
    assert problems["train/part-00099.parquet"] == ["not listed in the manifest"]
    assert problems["train/.part-00003.parquet.claim"] == ["claim of a run in progress, or of a killed one", "not listed in the manifest"]
    assert set(problems) == {
        "train/part-00000.parquet",
        "train/part-00001.parquet",
        "train/part-00002.parquet",
        "test/_manifest.json",
        "train/.part-00003.parquet.feedfacecafe.tmp",
        "train/part-00099.parquet",
        "train/.part-00003.parquet.claim",
    }
    with pytest.raises(FeatureSetError, match="no complete test features"):
        load_features(config.storage, "test", features.fingerprint)

    assert main(["verify", "--storage", config.storage, "--fingerprint", features.fingerprint, "--repair"]) == 1
    output = capsys.readouterr().out
    assert "part-00099.parquet: not listed in the manifest" in output
    assert set(verify_feature_set(config.storage, folder)) == {"train/part-00099.parquet", "train/.part-00003.parquet.claim"}
    os.remove(os.path.join(train, "part-00099.parquet"))
    os.remove(os.path.join(train, ".part-00003.parquet.claim"))
    assert main(["verify", "--storage", config.storage, "--fingerprint", features.fingerprint]) == 0
    for split in ("train", "test"):
        np.testing.assert_array_equal(load_features(config.storage, split, features.fingerprint)[2], reference[split])
    assert json.load(open(os.path.join(test, "_manifest.json")))["rows"] == 100


def test_another_shard_size_on_the_same_features_is_refused_and_nothing_is_overwritten(finished_run, tiny_archive, tmp_path):
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    features, _ = extract_features(config)
    before = shard_files(features.folder)
    with pytest.raises(FeatureSetError, match="cut with another shard size: pass --shard-size 50"):
        extract_features(tiny_config(tiny_archive, tmp_path / "storage", shard_size=80))
    assert shard_files(features.folder) == before


def test_repair_rebuilds_a_damaged_mirrored_shard_bit_for_bit(finished_run, tiny_archive, tmp_path):
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage", flip=True)
    features, _ = extract_features(config)
    shard = os.path.join(features.folder, "train-flipped", "part-00001.parquet")
    original = open(shard, "rb").read()
    damaged = bytearray(original)
    damaged[300] ^= 0x01
    open(shard, "wb").write(bytes(damaged))
    assert verify_feature_set(config.storage, features.folder) == {
        "train-flipped/part-00001.parquet": ["SHA-256 differs from the manifest"]
    }
    assert main(["verify", "--storage", config.storage, "--repair"]) == 0
    assert open(shard, "rb").read() == original
    assert verify_feature_set(config.storage, features.folder) == {}


def test_verify_covers_the_decoded_dataset_maps_and_heads_and_repair_rebuilds_them(finished_run, tiny_archive, tmp_path, capsys):
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    summary = cifar_transfer(config)
    dataset = os.path.join(config.storage, "datasets", f"cifar10-{tiny_archive[1]}")
    os.remove(summary.head.files.model)
    os.remove(summary.tsne.embedding)
    with open(os.path.join(dataset, "train_labels.npy"), "r+b") as stream:
        stream.truncate(100)
    folder = summary.features.folder
    head, tsne = os.path.relpath(summary.head.files.folder, folder), os.path.relpath(summary.tsne.embedding, folder)
    problems = verify_feature_set(config.storage, folder)
    assert set(problems) == {f"{head}/model.keras", tsne}
    assert main(["verify", "--storage", config.storage]) == 1
    report = capsys.readouterr().out
    assert f"datasets/cifar10-{tiny_archive[1]}/train_labels.npy: 100 bytes, decoded it had" in report and "model.keras: missing" in report

    assert main(["verify", "--storage", config.storage, "--repair"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"OK {folder}"
    assert os.path.getsize(os.path.join(dataset, "train_labels.npy")) > 100
    rebuilt = cifar_transfer(config)
    assert rebuilt.test_accuracy == summary.test_accuracy and rebuilt.head.files.folder == summary.head.files.folder


def test_a_crafted_manifest_never_makes_repair_touch_anything_outside_the_set(finished_run, tiny_archive, tmp_path):
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    features, _ = extract_features(config)
    outside = tmp_path / "precious.parquet"
    outside.write_bytes(b"not yours")
    manifest_path = os.path.join(features.folder, "train", "_manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["shards"][0]["file"] = os.path.relpath(outside, os.path.join(features.folder, "train"))
    json.dump(manifest, open(manifest_path, "w"))
    assert verify_feature_set(config.storage, features.folder) == {"train/_manifest.json": ["unreadable or not a valid manifest"]}
    assert main(["verify", "--storage", config.storage, "--repair"]) == 0
    assert outside.read_bytes() == b"not yours"
    assert json.load(open(manifest_path))["shards"][0]["file"] == "part-00000.parquet"


def test_a_shard_whose_size_differs_from_its_manifest_is_not_reused(finished_run, tiny_archive, tmp_path):
    """Bytes slipped in before the footer leave it readable: only the manifest's size gives the shard away."""
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    features, _ = extract_features(config)
    shard = os.path.join(features.folder, "test", "part-00000.parquet")
    original = open(shard, "rb").read()
    open(shard, "wb").write(b"PAR1" + b"\0" * 64 + original[4:])
    from cifar_transfer.shard_files import shard_problem
    from cifar_transfer.shards import Shard
    from cifar_transfer.storage import Storage

    assert shard_problem(Storage(config.storage), shard, features.spec, Shard(split="test", number=0, start=0, stop=50)) is None
    _, stats = extract_features(config)
    assert stats.shards_computed == 1 and open(shard, "rb").read() == original


def test_repair_leaves_the_files_of_a_live_writer_alone(finished_run, tiny_archive, tmp_path):
    """A temporary file whose shard a live run is writing (its claim is fresh) is not a leftover: repair must not delete it."""
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    features, _ = extract_features(config)
    train = os.path.join(features.folder, "train")
    writing = os.path.join(train, ".part-00001.parquet.0a1b2c3d4e5f.tmp")
    open(writing, "wb").write(b"PAR1 being written")
    held = {"id": "live-run", "host": socket.gethostname(), "pid": os.getpid(), "deadline": time.time() + 3600, "beat": 0}
    open(os.path.join(train, ".part-00001.parquet.claim"), "w").write(json.dumps(held))
    problems = verify_feature_set(config.storage, features.folder)
    assert problems["train/.part-00001.parquet.0a1b2c3d4e5f.tmp"] == ["leftover temporary file of an interrupted write"]
    assert main(["verify", "--storage", config.storage, "--repair"]) == 1
    assert os.path.exists(writing), "repair deleted the file a live writer holds"
