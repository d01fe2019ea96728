"""A real SIGKILL in the middle of extraction: the rerun redoes only unfinished shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prefect.settings import PREFECT_API_URL

from flows.cifar_transfer import extract_features
from tasks.config import load_config
from tasks.store import load_features

pytestmark = pytest.mark.usefixtures("prefect_api")

OPTIONS = {"backbone": "InceptionV3", "weights": "none", "input_size": 139, "shard_size": 20, "batch_size": 10, "seed": 3}
SHARDS = 15  # 200 train + 100 test images in shards of 20


def finished_shards(storage: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for path in storage.glob("features/*/*/part-*.parquet"):
        stat = path.stat()
        found[str(path.relative_to(storage))] = (stat.st_ino, stat.st_mtime_ns)
    return found


def wait_for(condition, process, timeout: float = 300.0):
    """Poll a filesystem condition while the flow process runs (a condition wait, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"flow process ended early with code {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for shards")
        time.sleep(0.01)


def test_sigkill_mid_extraction_then_resume_gives_identical_features(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    storage = tmp_path / "storage"
    command = [sys.executable, "-m", "flows.cli", "extract", "--source", str(path), "--md5", md5, "--storage", str(storage)]
    for name, value in OPTIONS.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    process = subprocess.Popen(command, env=environment, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(finished_shards(storage)) >= 3, process)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    survivors = finished_shards(storage)
    assert 3 <= len(survivors) < SHARDS, "the kill came after extraction ended; the test needs slower shards"
    assert not list(storage.glob("features/*/*/_manifest.json"))

    config = load_config(source=str(path), md5=md5, storage=str(storage), **OPTIONS)
    features, stats = extract_features(config)
    assert stats.shards_computed == SHARDS - len(survivors)
    after = finished_shards(storage)
    assert {name: after[name] for name in survivors} == survivors, "a shard finished before the kill was rewritten"
    assert len(after) == SHARDS

    reference, _ = extract_features(config.model_copy(update={"storage": str(tmp_path / "reference")}))
    assert reference.fingerprint == features.fingerprint
    for split in ("train", "test"):
        resumed = load_features(config.storage, split, features.fingerprint)
        uninterrupted = load_features(str(tmp_path / "reference"), split, features.fingerprint)
        for resumed_part, reference_part in zip(resumed, uninterrupted):
            np.testing.assert_array_equal(resumed_part, reference_part)
