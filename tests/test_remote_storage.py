"""The whole flow on S3: a real S3 API (moto's server in its own process) reached through s3fs.

Credentials and the endpoint come only from the environment, as on a real deployment.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import boto3
import numpy as np
import pytest
from test_concurrency import assert_same_features, run_twice_at_once
from test_flow import task_states_since, tiny_config

from cifar_transfer import layout
from cifar_transfer.catalogue import find_feature_set
from cifar_transfer.commit import commit_feature_set
from cifar_transfer.download import fetch_archive
from cifar_transfer.errors import ChecksumMismatch
from cifar_transfer.feature_records import ExtractionRecord, split_manifest
from cifar_transfer.flows.pipeline import cifar_transfer, extract_features
from cifar_transfer.storage import Storage
from cifar_transfer.store import load_features

pytestmark = pytest.mark.usefixtures("prefect_api")

BUCKET = "bucket"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def s3(monkeypatch):
    """An empty bucket on a moto S3 server process; the AWS environment points at it."""
    from s3fs import S3FileSystem

    endpoint = f"http://127.0.0.1:{free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not answers(endpoint):
            assert server.poll() is None, f"moto server exited with code {server.returncode}"
            assert time.monotonic() < deadline, f"moto server did not answer on {endpoint} within 30 s"
            time.sleep(0.05)
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        S3FileSystem.clear_instance_cache()  # an instance cached by an earlier test would keep its old endpoint
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        server.terminate()
        server.wait()
        S3FileSystem.clear_instance_cache()


def object_sizes(client) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def test_whole_flow_on_s3_commits_whole_objects_and_resumes_by_object(tiny_archive, s3):
    config = tiny_config(tiny_archive, f"s3://{BUCKET}/prefix")
    summary = cifar_transfer(config)
    assert summary.extraction.shards_computed == 6

    listing = object_sizes(s3)
    print("\n".join(f"{size:>10}  s3://{BUCKET}/{key}" for key, size in sorted(listing.items())))
    (folder,) = {key.split("/")[2] for key in listing if key.startswith("prefix/features/")}
    features = f"prefix/features/{folder}"
    expected = {
        "prefix/raw/cifar-10-python.tar.gz",
        "prefix/raw/cifar-10-python.tar.gz.source.json",
        f"{features}/feature_set.json",
        f"{features}/train/_manifest.json",
        f"{features}/test/_manifest.json",
        *(f"{features}/train/part-{number:05d}.parquet" for number in range(4)),
        *(f"{features}/test/part-{number:05d}.parquet" for number in range(2)),
        *(
            f"prefix/datasets/cifar10-{tiny_archive[1]}/{name}"
            for name in ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy", "_SUCCESS.json")
        ),
    }
    assert expected <= listing.keys()
    assert {key.rsplit("/", 1)[1] for key in listing if key.startswith(f"{features}/tsne/")} == {
        "settings.json",
        "embedding.parquet",
        "tsne.png",
    }
    assert any(key.startswith(f"{features}/heads/") and key.endswith("/metrics.json") for key in listing)
    assert [key for key in listing if key.rsplit("/", 1)[1].startswith(".")] == [], "temporary or claim objects were left behind"

    index, labels, values = load_features(config.storage, "train")
    assert values.shape == (200, 576 + 960 + 1280) and list(index) == list(range(200))

    _, rerun = extract_features(config)
    assert rerun.shards_computed == 0

    victim = f"{features}/train/part-00002.parquet"
    original = s3.get_object(Bucket=BUCKET, Key=victim)["Body"].read()
    s3.delete_object(Bucket=BUCKET, Key=victim)
    started = datetime.now(timezone.utc)
    _, repaired = extract_features(config)
    states = task_states_since(started)
    assert repaired.shards_computed == 1
    assert states["extract[train/00002]"] == ["Completed"]
    assert [name for name in states if name.startswith("extract[")] == ["extract[train/00002]"], "finished shards get no task run"
    assert s3.get_object(Bucket=BUCKET, Key=victim)["Body"].read() == original
    after = object_sizes(s3)  # feature_set.json now names the run that recomputed the shard (its lineage)
    assert after.keys() == listing.keys()
    assert {key: size for key, size in after.items() if not key.endswith("feature_set.json")} == {
        key: size for key, size in listing.items() if not key.endswith("feature_set.json")
    }


def test_two_runs_at_once_on_s3_compute_each_shard_once(tiny_archive, s3, reference_features):
    config = tiny_config(tiny_archive, f"s3://{BUCKET}/prefix")
    run_twice_at_once(config)
    assert [key for key in object_sizes(s3) if key.rsplit("/", 1)[1].startswith(".")] == [], "claim or temporary objects were left behind"
    alone, _ = reference_features()
    assert_same_features(config.storage, alone.storage_url)


def test_a_run_that_commits_nothing_while_another_commits_reports_every_split(reference_features, s3):
    """Two runs commit the same finished shards at once; the one that computed nothing only checks what is committed.
    It once described the set, read the manifests again to compare, and reported a split whose manifest appeared in
    between as missing (CI saw `{'test': 100}`). On S3, where each read takes milliseconds, a start up to 0.15 s
    behind the other run's lands in that window in about one round of five on the old code: 25 rounds explore it."""
    reference, _ = reference_features()
    storage = Storage(f"s3://{BUCKET}/prefix")
    storage.fs.put(Storage(reference.storage_url).path("features"), storage.path("features"), recursive=True)
    info = find_feature_set(storage.url)
    records = [record for split in ("train", "test") for record in split_manifest(storage, info.folder, split).shards]
    computed = ExtractionRecord(seconds=1.0, images=300, images_per_second=300.0)
    offsets = np.random.default_rng(0).uniform(0, 0.15, 25)
    for offset in offsets:
        for split in ("train", "test"):
            storage.fs.rm(layout.manifest(info.folder, split))
        both = threading.Barrier(2)

        def commit(extraction: ExtractionRecord | None, delay: float, both: threading.Barrier = both):
            both.wait()
            time.sleep(delay)  # where in the other run's commit this one starts: not a synchronization
            return commit_feature_set(storage.url, info.spec, records, info.classes, extraction=extraction)

        with ThreadPoolExecutor(2) as pool:
            writer, checker = pool.submit(commit, computed, 0.0), pool.submit(commit, None, offset)
            assert writer.result().splits == checker.result().splits == {"train": 200, "test": 100}


def test_a_failed_download_to_s3_leaves_no_object_and_no_pending_upload(tiny_archive, s3):
    path, md5 = tiny_archive
    with pytest.raises(ChecksumMismatch):
        fetch_archive(str(path), "0" * 32, f"s3://{BUCKET}/prefix")
    assert object_sizes(s3) == {}
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    archive = fetch_archive(str(path), md5, f"s3://{BUCKET}/prefix")
    assert s3.get_object(Bucket=BUCKET, Key="prefix/raw/cifar-10-python.tar.gz")["Body"].read() == path.read_bytes()
    assert archive.md5 == md5 and set(object_sizes(s3)) == {
        "prefix/raw/cifar-10-python.tar.gz",
        "prefix/raw/cifar-10-python.tar.gz.source.json",
    }
