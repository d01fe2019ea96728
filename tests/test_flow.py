"""The whole flow end to end on a tiny archive, against a real Prefect API."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId, FlowRunFilterStartTime

from cifar_transfer import extractors
from cifar_transfer.catalogue import list_feature_sets
from cifar_transfer.config import load_config
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.flows.cli import main
from cifar_transfer.flows.pipeline import analyze_features, cifar_transfer, extract_features
from cifar_transfer.store import load_features
from cifar_transfer.tasks.report import METRICS_KEY, REPORT_LINK_KEY, SUMMARY_KEY
from cifar_transfer.verify import verify_feature_set
from conftest import CLI, TINY_CLI, copy_of_finished_run, http_client, this_workers_runs, wait_until

pytestmark = pytest.mark.usefixtures("prefect_api")


def tiny_config(archive, storage, **options):
    path, md5 = archive
    settings = {
        "source": str(path),
        "md5": md5,
        "storage": str(storage),
        "backbone": "MobileNetV2",
        "weights": "none",
        "input_size": 32,
        "shard_size": 50,
        "tsne_sample": 150,
        "tsne_test": True,  # the map places the test images too: every stage's every output is made
        "epochs": 3,
        "head_batch_size": 32,
        "engine": "tensorflow",
        "precision": "float32",  # the default `auto` has its own tests in test_engines.py
    }
    return load_config(**{**settings, **options})


# `tiny_config`'s settings on the command line (with --source, --md5 and --storage): `extract` takes the first list,
# `run` both.
TINY_EXTRACTION_CLI = [*TINY_CLI, "--shard-size", "50", "--engine", "tensorflow", "--precision", "float32"]
TINY_ANALYSIS_CLI = ["--tsne-sample", "150", "--tsne-test", "--epochs", "3", "--head-batch-size", "32"]


def task_states_since(started: datetime) -> dict[str, list[str]]:
    """State names of every task run of the flow runs started after `started`, grouped by task name. A task run's
    state reaches the API as an event the server records on its own time, so its runs are read again until each has
    one (a condition, not a sleep: under load a run was read before its state once)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started), tags=this_workers_runs())
        )
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in flow_runs]))

        def every_state_recorded() -> tuple[list] | None:  # a tuple: true also when there is no task run
            task_runs = client.read_task_runs(flow_run_filter=run_filter)
            return (task_runs,) if all(run.state is not None for run in task_runs) else None

        (task_runs,) = wait_until(every_state_recorded, 60, "every task run's state in the API", interval=0.2)
    states: dict[str, list[str]] = {}
    for run in task_runs:
        name = run.name if run.name.startswith("extract[") else run.name.rsplit("-", 1)[0]
        assert run.state is not None
        states.setdefault(name, []).append(run.state.name)
    return states


def heartbeats_since(started: datetime) -> tuple[set[str], set[str]]:
    """(the flow runs started after `started` that emitted a heartbeat event, the root ones among those runs), once
    every event sent before this call is stored: a sentinel event sent last is waited for (a condition, not a sleep)."""
    import uuid

    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started), tags=this_workers_runs())
        )
    sentinel = f"test.sentinel.{uuid.uuid4()}"
    EventsWorker.drain_all()
    emit_event("cifar-transfer.test.sentinel", resource={"prefect.resource.id": sentinel})
    EventsWorker.drain_all()

    def stored(names: list[str], resources: list[str]) -> list[dict]:
        query = {"filter": {"event": {"name": names}, "resource": {"id": resources}}, "limit": 50}
        response = http_client().post(f"{PREFECT_API_URL.value()}/events/filter", json=query, timeout=10)
        response.raise_for_status()
        return response.json()["events"]

    wait_until(lambda: stored(["cifar-transfer.test.sentinel"], [sentinel]), 60, "the sentinel event to be stored", interval=0.2)
    beating = stored(["prefect.flow-run.heartbeat"], [f"prefect.flow-run.{run.id}" for run in runs])
    return {event["resource"]["prefect.resource.id"].rsplit(".", 1)[1] for event in beating}, {
        str(run.id) for run in runs if run.parent_task_run_id is None
    }


def shard_files(features_folder: str) -> dict[str, tuple[int, int]]:
    """Each finished shard file with its inode and modification time, to see what was rewritten."""
    found = {}
    for split in ("train", "test"):
        for name in sorted(os.listdir(os.path.join(features_folder, split))):
            if name.endswith(".parquet") and not name.startswith("."):
                stat = os.stat(os.path.join(features_folder, split, name))
                found[f"{split}/{name}"] = (stat.st_ino, stat.st_mtime_ns)
    return found


def test_end_to_end_outputs_follow_the_contract(finished_run):
    """The session's one whole run from an empty storage (`finished_run`, which other tests copy) keeps every contract."""
    summary = finished_run
    config = summary.config
    folder = summary.features.folder
    assert summary.features.splits == {"train": 200, "test": 100}
    assert summary.extraction.shards_computed == 6

    manifest = json.load(open(os.path.join(folder, "train", "_manifest.json")))
    assert [shard["file"] for shard in manifest["shards"]] == [f"part-{n:05d}.parquet" for n in range(4)]
    assert manifest["rows"] == 200 and manifest["feature_shape"] == [576 + 960 + 1280]

    table = ds.dataset(os.path.join(folder, "train"), format="parquet").to_table()
    assert sorted(table.column("index").to_pylist()) == list(range(200))
    frame = pd.read_parquet(os.path.join(folder, "test"))
    assert len(frame) == 100 and len(frame["features"].iloc[0]) == 576 + 960 + 1280
    counts = duckdb.sql(f"SELECT label, count(*) AS n FROM '{folder}/train/*.parquet' GROUP BY label").fetchall()
    assert sum(n for _, n in counts) == 200

    index, labels, features = load_features(config.storage, "train")
    assert features.shape == (200, 576 + 960 + 1280) and list(index) == list(range(200))
    assert list_feature_sets(config.storage)[0].splits == {"train": 200, "test": 100}

    embedding = pd.read_parquet(summary.tsne.embedding)
    assert list(embedding.columns) == ["split", "index", "label", "x", "y", "neighbours", "neighbour_similarity"]
    assert embedding["split"].value_counts().to_dict() == {"train": 150, "test": 100}
    neighbours = np.stack(embedding["neighbours"].to_numpy())  # the explorer's: other points of the map, by position
    assert neighbours.shape == (250, 8) and neighbours.min() >= 0 and neighbours.max() < 250
    assert not (neighbours == np.arange(250)[:, None]).any()
    train_points, test_points = embedding[embedding["split"] == "train"], embedding[embedding["split"] == "test"]
    assert test_points["x"].between(train_points["x"].min() - 1, train_points["x"].max() + 1).all()
    assert 0 <= summary.tsne.map_knn_accuracy <= 1 and 0 <= summary.tsne.feature_knn_accuracy <= 1
    metrics = json.load(open(summary.head.files.metrics))
    assert metrics["sizes"] == {"train": 180, "validation": 20, "test": 100}
    assert np.array(metrics["confusion_matrix"]).sum() == 100
    assert set(metrics["per_class_accuracy"]) == set(metrics["classes"])
    for picture in (summary.tsne.picture, summary.head.files.confusion_picture):
        assert open(picture, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(summary.head.files.model)
    assert (
        metrics["chosen"]["head"] == summary.head.kind
        and [c["head"] for c in metrics["candidates"]] == ["softmax"]
        and metrics["chosen"]["refit"]
    )
    assert metrics["validation_accuracy"] == max(c["validation_accuracy"] for c in metrics["candidates"])
    predictions = pd.read_parquet(summary.head.files.predictions)
    assert len(predictions) == 300 and set(predictions["split"]) == {"train", "test"}
    test_rows = predictions[predictions["split"] == "test"]
    assert (test_rows["predicted"] == test_rows["label"]).mean() == pytest.approx(summary.test_accuracy)
    with open(summary.html_report) as page:
        html = page.read()
    assert summary.features.fingerprint in html and 'id="tsne-canvas"' in html and "<script src" not in html

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[METRICS_KEY, SUMMARY_KEY, REPORT_LINK_KEY]))
        )
    assert {artifact.key for artifact in artifacts} == {METRICS_KEY, SUMMARY_KEY, REPORT_LINK_KEY}
    assert any(summary.html_report_url in str(artifact.data) for artifact in artifacts if artifact.key == SUMMARY_KEY)
    assert summary.features.spec.backbone == "MobileNetV2"


def records_point_into(storage: str, original: str) -> None:
    """Every record of a copied run names its own storage's places: no stored file holds the original storage's path."""
    for folder, _, names in os.walk(storage):
        for name in names:
            if name.endswith((".json", ".parquet")):
                with open(os.path.join(folder, name), "rb") as stream:
                    assert original.encode() not in stream.read(), f"{name} names a place in the storage it was copied from"


def test_rerun_recomputes_nothing_and_never_builds_the_backbone(finished_run, tiny_archive, tmp_path):
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    records_point_into(config.storage, finished_run.config.storage)
    first = cifar_transfer(config)
    assert first.extraction.shards_computed == 0 and first.features.folder.startswith(config.storage)
    assert first.tsne.embedding.startswith(config.storage) and first.head.metrics.features == first.features.folder
    before = shard_files(first.features.folder)
    extractors.release_extractors()
    started = datetime.now(timezone.utc)
    second = cifar_transfer(config)
    states = task_states_since(started)
    assert extractors.built_extractors() == []
    assert second.extraction.shards_computed == 0
    assert states["plan-extraction"] == ["Completed"] and not [name for name in states if name.startswith("extract[")]
    assert second.extraction.shards == first.extraction.shards
    assert states["tsne"] == ["Cached"] and states["head"] == ["Cached"] and states["decode-archive"] == ["Cached"]
    assert shard_files(second.features.folder) == before
    assert second.test_accuracy == first.test_accuracy
    beating, roots = heartbeats_since(started)
    assert len(roots) == 1 and beating == roots, "a subflow in its parent's process beat on its own (each costs a second)"


def test_changed_head_setting_reuses_features(finished_run, tiny_archive, tmp_path):
    first = cifar_transfer(copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage"))
    started = datetime.now(timezone.utc)
    second = cifar_transfer(tiny_config(tiny_archive, tmp_path / "storage", epochs=4, head="logistic", refit=False))
    states = task_states_since(started)
    assert second.features.folder == first.features.folder
    assert second.extraction.shards_computed == 0
    assert states["tsne"] == ["Cached"] and states["head"] == ["Completed"]
    assert second.head.files.folder != first.head.files.folder and os.path.exists(first.head.files.metrics)
    with open(second.head.files.metrics) as stream:
        chosen = json.load(stream)["chosen"]
    assert chosen["head"] == "logistic" and "refit" not in chosen


def test_flip_adds_mirrored_views_beside_the_reused_originals(finished_run, tiny_archive, tmp_path):
    plain = cifar_transfer(copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage"))
    with pytest.raises(FeatureSetError, match="no complete train-flipped view: run extraction with --flip first"):
        analyze_features(tiny_config(tiny_archive, tmp_path / "storage", flip=True), plain.features.fingerprint)
    before = shard_files(plain.features.folder)
    flipped = cifar_transfer(tiny_config(tiny_archive, tmp_path / "storage", flip=True))
    assert flipped.features.fingerprint == plain.features.fingerprint, "mirrored views must not change the features' identity"
    assert flipped.extraction.shards_computed == 6 and flipped.extraction.shards == 12
    assert shard_files(plain.features.folder) == before, "an original shard was rewritten"
    assert flipped.features.splits == {"train": 200, "test": 100, "train-flipped": 200, "test-flipped": 100}
    index, _, mirrored = load_features(str(tmp_path / "storage"), "test-flipped")
    images = np.load(os.path.join(tmp_path, "storage", "datasets", f"cifar10-{tiny_archive[1]}", "test_images.npy"))
    extractor = extractors.get_extractor(flipped.features.spec, (32, 32, 3))
    assert list(index) == list(range(100))
    np.testing.assert_allclose(mirrored, extractor(images[:, :, ::-1], 16), rtol=1e-5, atol=1e-6)
    assert flipped.head.files.folder != plain.head.files.folder
    assert verify_feature_set(str(tmp_path / "storage"), flipped.features.folder) == {}


def test_changed_backbone_writes_a_new_folder_and_keeps_the_old(finished_run, tiny_archive, tmp_path):
    first, reused = extract_features(copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage"))
    assert reused.shards_computed == 0
    before = shard_files(first.folder)
    second, stats = extract_features(tiny_config(tiny_archive, tmp_path / "storage", input_size=48))
    assert second.folder != first.folder and stats.shards_computed == 6
    assert shard_files(first.folder) == before


def test_damaged_shard_and_leftover_temp_file_are_recomputed_alone(finished_run, tiny_archive, tmp_path):
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    features, _ = extract_features(config)
    reference = load_features(config.storage, "train", features.fingerprint)[2]
    damaged = os.path.join(features.folder, "train", "part-00002.parquet")
    with open(damaged, "r+b") as stream:
        stream.truncate(1000)
    os.remove(os.path.join(features.folder, "test", "part-00001.parquet"))
    leftover = os.path.join(features.folder, "test", ".part-00001.parquet.0123456789ab.tmp")
    with open(leftover, "wb") as stream:
        stream.write(b"PAR1 not finished")
    before = shard_files(features.folder)

    started = datetime.now(timezone.utc)
    _, stats = extract_features(config)
    states = task_states_since(started)
    after = shard_files(features.folder)
    assert stats.shards_computed == 2
    assert states["extract[train/00002]"] == ["Completed"] and states["extract[test/00001]"] == ["Completed"]
    assert sorted(name for name in states if name.startswith("extract[")) == ["extract[test/00001]", "extract[train/00002]"]
    assert {name for name in after if after[name] != before.get(name)} == {"train/part-00002.parquet", "test/part-00001.parquet"}
    np.testing.assert_array_equal(load_features(config.storage, "train", features.fingerprint)[2], reference)
    assert not os.path.exists(leftover)


def test_a_failed_run_says_why_in_its_final_state_in_one_line(tiny_archive, tmp_path):
    state = cifar_transfer(tiny_config(tiny_archive, tmp_path / "storage", md5="0" * 32), return_state=True)
    assert state.is_failed()
    assert "ChecksumMismatch" in state.message and "expected 00000000" in state.message and "\n" not in state.message


def in_copy(path: str, finished_run, copy) -> str:
    """Where `path`, a place in the finished run's storage, is in `copy` of it."""
    return os.path.join(copy.storage, os.path.relpath(path, finished_run.config.storage))


def test_cli_runs_the_job_and_fails_in_one_line(finished_run, tiny_archive, tmp_path, capsys):
    """The options that spell `tiny_config`'s settings name its feature set, map and head: in a copy of the finished
    run's storage the command finds all three, computes nothing and prints where they are."""
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    path, md5 = tiny_archive
    common = [
        "--source",
        str(path),
        "--storage",
        config.storage,
        *TINY_EXTRACTION_CLI,
        *TINY_ANALYSIS_CLI,
    ]
    before = shard_files(in_copy(finished_run.features.folder, finished_run, config))
    assert main(["run", *common, "--md5", md5]) == 0
    out = capsys.readouterr().out
    assert f"features: {in_copy(finished_run.features.folder, finished_run, config)}\n" in out
    assert f"t-SNE map: {in_copy(finished_run.tsne.picture, finished_run, config)}\n" in out
    assert f"head: {in_copy(finished_run.head.files.folder, finished_run, config)}\n" in out
    assert f"test accuracy: {finished_run.test_accuracy:.4f}" in out
    assert shard_files(in_copy(finished_run.features.folder, finished_run, config)) == before
    assert len(os.listdir(os.path.join(config.storage, "features"))) == 1

    assert main(["run", *common, "--md5", "0" * 32]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("cifar-transfer: error: archive from") and f"has MD5 {md5}" in error

    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(path.read_bytes()[:5000])
    assert main(["run", *common, "--source", str(broken), "--md5", "none"]) == 2
    assert "archive is truncated or not a tar.gz" in capsys.readouterr().err.strip().splitlines()[-1]

    assert main(["run", *common, "--md5", md5, "--input-size", "8"]) == 2
    assert "input_size 8 is below MobileNetV2's minimum of 32" in capsys.readouterr().err


def test_any_deleted_output_is_rebuilt_alone_and_never_shown_cached_then_missing(finished_run, tiny_archive, tmp_path):
    """Lost files of every stage at once: the next run rebuilds exactly those stages' outputs and nothing else."""
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    first = cifar_transfer(config)
    dataset = os.path.join(config.storage, "datasets", f"cifar10-{tiny_archive[1]}")
    lost = [
        os.path.join(dataset, "test_images.npy"),
        os.path.join(first.features.folder, "train", "part-00001.parquet"),
        first.tsne.picture,
        first.head.files.predictions,
    ]
    for path in lost:
        os.remove(path)
    before = shard_files(first.features.folder)
    train_labels = os.stat(os.path.join(dataset, "train_labels.npy")).st_ino

    started = datetime.now(timezone.utc)
    second = cifar_transfer(config)
    states = task_states_since(started)
    assert all(os.path.exists(path) for path in lost)
    assert states["decode-archive"] == ["Completed"] and states["tsne"] == ["Completed"] and states["head"] == ["Completed"]
    assert sorted(name for name in states if name.startswith("extract[")) == ["extract[train/00001]"]
    after = shard_files(first.features.folder)
    assert {name for name in after if after[name] != before.get(name)} == {"train/part-00001.parquet"}
    assert os.stat(os.path.join(dataset, "train_labels.npy")).st_ino != train_labels, "the dataset was not decoded again"
    assert second.test_accuracy == first.test_accuracy and second.features.fingerprint == first.features.fingerprint
    np.testing.assert_array_equal(pd.read_parquet(second.tsne.embedding)[["x", "y"]], pd.read_parquet(first.tsne.embedding)[["x", "y"]])

    started = datetime.now(timezone.utc)
    cifar_transfer(config)
    states = task_states_since(started)
    assert states["decode-archive"] == ["Cached"] and states["tsne"] == ["Cached"] and states["head"] == ["Cached"]


def test_a_failed_command_ends_with_its_reason_and_keeps_the_traceback_in_a_log_file(tiny_archive, tmp_path):
    """Run as a user would (own process, ephemeral API): the reason is the very last line, no traceback on the console."""
    import subprocess

    path, md5 = tiny_archive
    command = [
        *CLI,
        "run",
        "--source",
        str(path),
        "--md5",
        "0" * 32,
        "--storage",
        str(tmp_path / "storage"),
        "--backbone",
        "MobileNetV2",
        "--weights",
        "none",
    ]
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    console = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2
    assert console[-1].startswith("cifar-transfer: error: archive from") and f"has MD5 {md5}" in console[-1]
    assert "Starting temporary server" in result.stderr + result.stdout, "the command did not run its own Prefect API"
    assert not any(line.startswith(("Traceback", "  File ")) for line in console)
    assert not any("Failed to send telemetry" in line or line.startswith(("I0000", "W0000", "E0000")) for line in console)
    log_file = console[-1].rsplit("(details: ", 1)[1].rstrip(")")
    with open(log_file) as details:
        assert "Traceback (most recent call last)" in details.read()
