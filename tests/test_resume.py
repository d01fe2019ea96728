"""A real SIGKILL in the middle of extraction: the rerun redoes only unfinished shards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from prefect.settings import PREFECT_API_URL
from test_flow import TINY_ANALYSIS_CLI, TINY_EXTRACTION_CLI, tiny_config

from cifar_transfer.config import load_config
from cifar_transfer.flows.pipeline import extract_features
from cifar_transfer.pause import PAUSE_AT
from cifar_transfer.store import load_features
from conftest import CLI, TINY_CLI, copy_of_finished_run

pytestmark = pytest.mark.usefixtures("prefect_api")

SHARDS = 6  # 200 train + 100 test images in shards of 50 (tiny_config's)
PAUSED = "train/00003"  # the extraction is killed while this shard is in flight


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


def cli_command(command: str, config, names) -> list[str]:
    """`cifar-transfer COMMAND` with the config's values of `names` as options."""
    arguments = [*CLI, command]
    for name in names:
        arguments += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    return arguments


EXTRACTION_OPTIONS = ("source", "md5", "storage", "backbone", "weights", "input_size", "shard_size", "engine", "precision")


def kill_while_paused(command: list[str], point: str, marker: Path, also=lambda: True) -> None:
    """Run `command` in a process group of its own, held by the pause hook (`cifar_transfer.pause`) at `point` (a
    shard, before computing it; `tsne` or `head`, once begun), and SIGKILL the group there once `also()` holds too:
    the kill lands while that work is in flight, whatever the machine's speed."""
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), PAUSE_AT: f"{point}={marker}"}
    process = subprocess.Popen(command, env=environment, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: marker.exists() and also(), process)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert int(marker.read_text()) == process.pid, "the pause was not reached in the killed command"


def test_sigkill_mid_extraction_then_resume_gives_identical_features(tiny_archive, tmp_path, reference_features):
    storage = tmp_path / "storage"
    config = tiny_config(tiny_archive, storage)
    kill_while_paused(cli_command("extract", config, EXTRACTION_OPTIONS), PAUSED, tmp_path / "paused")
    survivors = finished_shards(storage)
    assert 2 <= len(survivors) < SHARDS, "the kill did not land mid-extraction"
    assert not [name for name in survivors if name.endswith(f"/{PAUSED.replace('/', '/part-')}.parquet")], "the paused shard finished"
    assert not list(storage.glob("features/*/*/_manifest.json"))

    features, stats = extract_features(config)
    assert stats.shards_computed == SHARDS - len(survivors)
    after = finished_shards(storage)
    assert {name: after[name] for name in survivors} == survivors, "a shard finished before the kill was rewritten"
    assert len(after) == SHARDS

    reference, _ = reference_features()
    assert reference.fingerprint == features.fingerprint
    for split in ("train", "test"):
        resumed = load_features(config.storage, split, features.fingerprint)
        uninterrupted = load_features(reference.storage_url, split, features.fingerprint)
        for resumed_part, reference_part in zip(resumed, uninterrupted, strict=True):
            np.testing.assert_array_equal(resumed_part, reference_part)


def outputs(storage: Path, stage: str) -> dict[str, tuple[int, int]]:
    """Each file of the feature set's maps (`tsne`) or heads (`heads`) with its inode and modification time (but the
    HTML reports and map explorers, which every run renders)."""
    found = {}
    for path in storage.glob(f"features/*/{stage}/*/*"):
        if not path.name.startswith(("report-", "explorer-")):
            found[str(path.relative_to(storage))] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return found


@pytest.mark.parametrize("stage, folder, other", [("tsne", "tsne", "heads"), ("head", "heads", "tsne")])
def test_sigkill_during_tsne_or_head_then_rerun_recomputes_only_that_stage(stage, folder, other, finished_run, tiny_archive, tmp_path):
    """A copy of a finished run without its map (or head): the run is killed while it makes it again (its settings
    written, held by the pause hook); the rerun makes just that and reuses every shard and the other stage's files."""
    path, md5 = tiny_archive
    storage = tmp_path / "storage"
    copy_of_finished_run(finished_run, tiny_archive, storage)
    (made,) = storage.glob(f"features/*/{folder}/*")
    shutil.rmtree(made)
    options = ["--source", str(path), "--md5", md5, "--storage", str(storage), *TINY_EXTRACTION_CLI, *TINY_ANALYSIS_CLI]
    shards_before, other_before = finished_shards(storage), outputs(storage, other)
    kill_while_paused([*CLI, "run", *options], stage, tmp_path / "paused")
    assert finished_shards(storage) == shards_before and outputs(storage, other) == other_before
    assert sorted(outputs(storage, folder)) == [f"{made.relative_to(storage)}/settings.json"], "the kill missed the stage"

    from cifar_transfer.flows.cli import main

    assert main(["run", *options]) == 0
    assert finished_shards(storage) == shards_before
    assert outputs(storage, other) == other_before, f"the finished {other} was made again"
    finished = Path(finished_run.config.storage) / made.relative_to(storage)
    assert sorted(path.name for path in made.iterdir()) == sorted(path.name for path in finished.iterdir())


def test_sigkill_during_download_leaves_no_result_and_the_rerun_fetches_cleanly(tiny_archive, tmp_path):
    import http.server
    import threading

    path, md5 = tiny_archive
    payload = path.read_bytes()
    release = threading.Event()

    class HalfThenWait(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            release.wait(timeout=120)  # the first client is killed mid-body; later ones get everything at once
            self.wfile.write(payload[len(payload) // 2 :])

        def log_message(self, *args):
            """Keep the test output quiet."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HalfThenWait)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
    storage = tmp_path / "storage"
    command = [
        *CLI,
        "extract",
        "--source",
        url,
        "--md5",
        md5,
        "--storage",
        str(storage),
        *TINY_CLI,
        "--shard-size",
        "100",
    ]
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    process = subprocess.Popen(command, env=environment, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The stream is open and blocked mid-body: the archive's own temporary file, not the claim's (made just before,
        # `..cifar-10-python.tar.gz.claim.<id>.tmp`), which a kill can also catch being made.
        wait_for(lambda: any(storage.glob("raw/.cifar-10-python.tar.gz.*.tmp")), process)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        release.set()
    assert not (storage / "raw" / "cifar-10-python.tar.gz").exists(), "a partial download took the final name"
    try:
        features, _ = extract_features(
            load_config(source=url, md5=md5, storage=str(storage), backbone="MobileNetV2", weights="none", input_size=32, shard_size=100)
        )
    finally:
        server.shutdown()
        server.server_close()
    assert features.splits == {"train": 200, "test": 100}
    assert sorted(p.name for p in (storage / "raw").iterdir()) == ["cifar-10-python.tar.gz", "cifar-10-python.tar.gz.source.json"]
