"""Damaged outputs are found by content, and `cifar-transfer verify --repair` restores them exactly."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_flow import shard_files, tiny_config

from flows.cifar_transfer import extract_features
from flows.cli import main
from tasks.errors import FeatureSetError
from tasks.store import load_features
from tasks.verify import verify_feature_set

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_verify_finds_each_kind_of_damage_and_repair_restores_the_features(tiny_archive, tmp_path, capsys):
    config = tiny_config(tiny_archive, tmp_path / "storage")
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
    open(os.path.join(train, ".part-00003.parquet.claim"), "wb").write(b"{}")  # left by a run killed mid-shard

    problems = verify_feature_set(config.storage, folder)
    assert problems["train/part-00000.parquet"][0].startswith("500 bytes, the manifest says")
    assert problems["train/part-00001.parquet"] == ["SHA-256 differs from the manifest"]
    assert any("written by another configuration" in p for p in problems["train/part-00002.parquet"])
    assert problems["test/_manifest.json"] == ["missing: the split is incomplete"]
    assert problems["train/.part-00003.parquet.feedfacecafe.tmp"] == ["leftover temporary file of an interrupted write"]
    assert problems["train/part-00099.parquet"] == ["not listed in the manifest"]
    assert problems["train/.part-00003.parquet.claim"] == ["claim of a run in progress, or of a killed one", "not listed in the manifest"]
    assert set(problems) == {"train/part-00000.parquet", "train/part-00001.parquet", "train/part-00002.parquet", "test/_manifest.json",
                             "train/.part-00003.parquet.feedfacecafe.tmp", "train/part-00099.parquet", "train/.part-00003.parquet.claim"}
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


def test_another_shard_size_on_the_same_features_is_refused_and_nothing_is_overwritten(tiny_archive, tmp_path):
    config = tiny_config(tiny_archive, tmp_path / "storage")
    features, _ = extract_features(config)
    before = shard_files(features.folder)
    with pytest.raises(FeatureSetError, match="cut with another shard size: pass --shard-size 50"):
        extract_features(tiny_config(tiny_archive, tmp_path / "storage", shard_size=80))
    assert shard_files(features.folder) == before
