"""A feature set downstream jobs can trust: every common reader opens it right (its dataset card tells `datasets` the
splits), `list` shows what it holds and weighs, and `rm` / `gc` evict sets without pulling one from under a writer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_collections import folder_config, write_tree
from test_flow import tiny_config

from cifar_transfer import layout
from cifar_transfer.catalogue import list_feature_sets
from cifar_transfer.cifar import CLASS_NAMES
from cifar_transfer.feature_records import read_manifest
from cifar_transfer.flows.cli import main
from cifar_transfer.flows.pipeline import extract_features
from cifar_transfer.storage import Storage
from cifar_transfer.store import load_features, read_keys
from conftest import cifar_members, write_archive

pytestmark = pytest.mark.usefixtures("prefect_api")

TRAIN, TEST = 200, 100  # the tiny archive's rows


@pytest.fixture(scope="module")
def made(tmp_path_factory, prefect_api):
    """Two real feature sets in one storage: `older` (originals only), then `newer` (with the mirrored views)."""
    root = tmp_path_factory.mktemp("feature-store")
    archive = root / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, cifar_members())
    storage = root / "storage"
    older, _ = extract_features(tiny_config((archive, md5), storage, seed=1))
    time.sleep(1.1)  # created_at has whole seconds: the second set must be the newer one
    newer, _ = extract_features(tiny_config((archive, md5), storage, flip=True))
    return storage, older, newer


@pytest.fixture
def store(made, tmp_path):
    """A copy of the made storage (file times kept) for a test that deletes from it: (root, older folder, newer folder)."""
    storage, older, newer = made
    copy = tmp_path / "storage"
    shutil.copytree(storage, copy)
    return str(copy), str(copy / os.path.relpath(older.folder, storage)), str(copy / os.path.relpath(newer.folder, storage))


def age(folder: str, seconds: float = 3600) -> None:
    """Make every file of a set look `seconds` old, as if no run had touched it since."""
    then = time.time() - seconds
    for parent, _, names in os.walk(folder):
        for name in names:
            os.utime(os.path.join(parent, name), (then, then))


def write_claim(path: str, pid: int) -> None:
    """The claim file a writer with `pid` on this host makes (as `storage.Claim` does), due in an hour."""
    held = {"id": f"writer-{pid}", "host": socket.gethostname(), "pid": pid, "deadline": time.time() + 3600, "beat": 0}
    with open(path, "w") as stream:
        stream.write(json.dumps(held))


def test_every_reader_opens_the_views_and_ignores_what_is_not_data(made, tmp_path):
    """pyarrow, pandas, DuckDB, Polars and `datasets` read the same rows; writes in progress, claims and manifests are no rows."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    datasets.disable_progress_bars()
    storage, _, newer = made
    train = os.path.join(newer.folder, "train")
    # What a run still writing another shard leaves beside the finished ones: neither may be read as data.
    with open(os.path.join(train, ".part-00009.parquet.0a1b2c3d4e5f.tmp"), "wb") as stream:
        stream.write(b"PAR1 half a shard")
    write_claim(os.path.join(train, ".part-00009.parquet.claim"), os.getpid())
    try:
        index, labels, features = load_features(str(storage), "train", newer.fingerprint)
        width = features.shape[1]
        assert pq.read_table(train).num_rows == TRAIN
        frame = pd.read_parquet(train)
        assert len(frame) == TRAIN and len(frame["features"].iloc[0]) == width
        assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{train}/*.parquet')").fetchall() == [(TRAIN,)]
        assert pl.read_parquet(f"{train}/*.parquet").height == TRAIN

        by_default = datasets.load_dataset(newer.folder, cache_dir=str(tmp_path / "hf"))
        assert {split: by_default[split].num_rows for split in by_default} == {"train": TRAIN, "test": TEST}
        assert by_default["train"].features["label"].names == list(CLASS_NAMES)
        read = by_default["train"].with_format("numpy")[:]
        order = np.argsort(read["index"])
        np.testing.assert_array_equal(read["index"][order], index)
        np.testing.assert_array_equal(read["label"][order], labels)
        np.testing.assert_array_equal(read["features"][order], features)

        mirrored = datasets.load_dataset(newer.folder, "mirrored", cache_dir=str(tmp_path / "hf"))
        assert {split: mirrored[split].num_rows for split in mirrored} == {"train": TRAIN, "test": TEST}
        flipped = mirrored["test"].with_format("numpy")[:]
        _, _, flipped_features = load_features(str(storage), "test-flipped", newer.fingerprint)
        np.testing.assert_array_equal(flipped["features"][np.argsort(flipped["index"])], flipped_features)
    finally:
        os.remove(os.path.join(train, ".part-00009.parquet.0a1b2c3d4e5f.tmp"))
        os.remove(os.path.join(train, ".part-00009.parquet.claim"))


def test_a_set_without_mirrored_views_has_no_mirrored_config(made, tmp_path):
    import datasets

    datasets.disable_progress_bars()
    _, older, _ = made
    with open(layout.card(older.folder)) as stream:
        card = stream.read()
    assert "config_name: mirrored" not in card and older.fingerprint in card
    loaded = datasets.load_dataset(older.folder, cache_dir=str(tmp_path / "hf"))
    assert {split: loaded[split].num_rows for split in loaded} == {"train": TRAIN, "test": TEST}
    with pytest.raises(ValueError, match="mirrored"):
        datasets.load_dataset(older.folder, "mirrored", cache_dir=str(tmp_path / "hf"))


def test_list_shows_sizes_rows_and_dates(made, capsys):
    storage, older, newer = made
    assert main(["list", "--storage", str(storage)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["FOLDER", "BACKBONE", "ROWS"]
    for info, rows in ((newer, f"{TRAIN}/{TEST} +flip"), (older, f"{TRAIN}/{TEST}")):
        shards = [
            os.path.join(info.folder, view, name)
            for view in info.splits
            for name in os.listdir(os.path.join(info.folder, view))
            if name.endswith(".parquet")
        ]
        size = sum(os.path.getsize(path) for path in shards)
        line = next(line for line in table if line.startswith(os.path.basename(info.folder)))
        assert rows in line and f"{size / 1e6:.1f}" in line and info.created_at[:10] in line
    assert table[1].startswith(os.path.basename(newer.folder)), "newest first"

    assert main(["list", "--storage", str(storage), "--json"]) == 0
    listed = {entry["fingerprint"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed[newer.fingerprint]["bytes"] == sum(
        os.path.getsize(os.path.join(newer.folder, view, name))
        for view in newer.splits
        for name in os.listdir(os.path.join(newer.folder, view))
        if name.endswith(".parquet")
    )


def test_rm_is_a_dry_run_until_yes_and_spares_fresh_sets(store, capsys):
    storage, older, newer = store
    fingerprint = os.path.basename(older).rsplit("-", 1)[1]
    age(older, seconds=0)  # as a run that just wrote it leaves it
    assert main(["rm", fingerprint, "--storage", storage, "--yes"]) == 1
    assert "grace period" in capsys.readouterr().out and os.path.exists(older), "a set just written may be in use"

    age(older)
    assert main(["rm", fingerprint, "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert f"would delete {os.path.basename(older)}" in out and "would free" in out and os.path.exists(older)

    assert main(["rm", fingerprint, "--storage", storage, "--yes"]) == 0
    assert "freed" in capsys.readouterr().out
    assert not os.path.exists(older) and os.path.exists(newer)
    assert [info.folder for info in list_feature_sets(storage)] == [newer]
    assert main(["rm", fingerprint, "--storage", storage]) == 1
    assert "no feature set" in capsys.readouterr().out


def test_rm_never_deletes_a_set_a_live_writer_holds_a_claim_in(store, capsys):
    storage, older, _ = store
    age(older)
    claim = os.path.join(older, "train", ".part-00001.parquet.claim")
    write_claim(claim, os.getpid())
    assert main(["rm", os.path.basename(older), "--storage", storage, "--yes", "--force"]) == 1
    assert "live writer holds the claim on train/part-00001.parquet" in capsys.readouterr().out
    assert os.path.exists(os.path.join(older, "train", "_manifest.json"))

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    write_claim(claim, int(finished.stdout))  # the writer died: its claim protects nothing
    assert main(["rm", os.path.basename(older), "--storage", storage, "--yes", "--force"]) == 0
    assert not os.path.exists(older)


def test_gc_never_deletes_a_set_a_live_writer_holds_a_claim_in(store, capsys):
    storage, older, newer = store
    age(older)
    age(newer)
    write_claim(os.path.join(older, "test", ".part-00000.parquet.claim"), os.getpid())
    assert main(["gc", "--keep", "0", "--storage", storage, "--yes", "--force"]) == 0
    out = capsys.readouterr().out
    assert f"keep {os.path.basename(older)}: in use: a live writer holds the claim on test/part-00000.parquet" in out
    assert f"deleted {os.path.basename(newer)}" in out
    assert os.path.exists(os.path.join(older, "test", "_manifest.json")) and not os.path.exists(newer)


def test_gc_keeps_the_newest(store, capsys):
    storage, older, newer = store
    age(older)
    age(newer)
    assert main(["gc", "--keep", "1", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert f"would delete {os.path.basename(older)}" in out and f"keep {os.path.basename(newer)}" in out
    assert os.path.exists(older)
    assert main(["gc", "--keep", "1", "--storage", storage, "--yes"]) == 0
    assert not os.path.exists(older) and os.path.exists(newer)


def test_datasets_reads_a_collection_as_its_manifest_lists_it(tmp_path):
    """A collection's view keeps the shards its previous version retired, which a glob would read twice: the card lists
    the current files only, and declares the collection's `key` and `version` columns."""
    import datasets

    datasets.disable_progress_bars()
    root, storage = tmp_path / "photos", tmp_path / "storage"
    write_tree(root, {"train": 10, "test": 4})
    extract_features(folder_config(root, storage))
    os.remove(root / "train" / "cat" / "0000.png")  # its shard is replaced; the old file stays, retired
    info, _ = extract_features(folder_config(root, storage))
    manifest = read_manifest(Storage(str(storage)), info.folder, "train")
    assert manifest.retired and info.splits == {"train": 29, "test": 12}

    loaded = datasets.load_dataset(info.folder, cache_dir=str(tmp_path / "hf"))
    assert {split: loaded[split].num_rows for split in loaded} == info.splits
    assert sorted(loaded["train"]["key"]) == sorted(read_keys(Storage(str(storage)), info.folder, "train").values())
    assert loaded["train"].features["label"].names == info.classes


def test_gc_never_follows_a_link_out_of_the_storage_root(store, tmp_path, capsys):
    storage, older, newer = store
    outside = tmp_path / "someone-else"
    shutil.copytree(older, outside)  # a folder outside the storage that looks like a feature set
    before = {path: os.path.getsize(path) for path in map(str, outside.rglob("*")) if os.path.isfile(path)}
    evil = os.path.join(storage, "features", "evil")
    os.symlink(outside, evil)
    assert any(info.folder.endswith("/evil") for info in list_feature_sets(storage)), "the link was not listed as a set"
    real = sum(
        os.path.getsize(os.path.join(parent, name)) for folder in (older, newer) for parent, _, names in os.walk(folder) for name in names
    )
    capsys.readouterr()
    assert main(["gc", "--keep", "0", "--storage", storage, "--yes", "--force"]) == 0
    out = capsys.readouterr().out
    assert "keep evil: evil is a link out of the storage root, never followed" in out
    assert {path: os.path.getsize(path) for path in map(str, outside.rglob("*")) if os.path.isfile(path)} == before
    assert os.path.islink(evil) and not os.path.exists(older) and not os.path.exists(newer)
    assert f"freed {real / 1e6:.1f} MB" in out
