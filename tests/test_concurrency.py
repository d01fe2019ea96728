"""Runs that share a storage: each shard is computed once, by one writer, and never damaged.

Two real flow runs start together on the same storage and configuration; the claims
themselves are tested in test_claims.py.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from datetime import datetime, timezone

import numpy as np
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterStartTime
from test_flow import tiny_config

from cifar_transfer.claims import claim
from cifar_transfer.feature_records import FeatureSetInfo
from cifar_transfer.flows.pipeline import extract_features
from cifar_transfer.shard_files import shard_path
from cifar_transfer.shards import plan_shards
from cifar_transfer.storage import Storage
from cifar_transfer.store import load_features
from cifar_transfer.verify import verify_feature_set
from conftest import this_workers_runs, wait_until


def shard_flow_runs(started: datetime):
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=["shards-MobileNetV2"]),
                start_time=FlowRunFilterStartTime(after_=started),
                tags=this_workers_runs(),
            )
        )


def run_twice_at_once(config) -> FeatureSetInfo:
    """Two extract-features runs of `config` started together; checks each shard was computed once.

    The test holds the last shard's claim itself until both runs are inside their shard subflows, so
    the runs overlap whatever the timing (a stalled API call once started the second run after the
    first had finished); then it lets go and one of the runs computes that shard.
    """
    storage = Storage(config.storage)
    spec = config.feature_spec(config.expected_md5, config.engine, config.precision)
    held_path = shard_path(storage, spec, plan_shards({"train": 200, "test": 100}, config.shard_size)[-1])
    holding, release = threading.Event(), threading.Event()

    def hold_last_shard():
        with claim(storage, held_path):
            holding.set()
            release.wait()

    started = datetime.now(timezone.utc)
    with ThreadPoolExecutor(3) as pool:
        holder = pool.submit(hold_last_shard)
        assert holding.wait(30), holder.exception(timeout=0)
        runs = [pool.submit(copy_context().run, extract_features, config) for _ in range(2)]  # with this test's tags
        try:
            wait_until(
                lambda: len(shard_flow_runs(started)) == 2 or any(run.done() for run in runs), 120, "two shard flow runs", interval=0.01
            )
        finally:  # a failed wait must fail the test, not leave both runs waiting on the claim forever
            release.set()
        holder.result()
        (first, first_stats), (second, second_stats) = (run.result() for run in runs)
    spans = sorted((run.start_time, run.end_time) for run in shard_flow_runs(started))
    assert len(spans) == 2 and spans[1][0] < spans[0][1], "the runs did not overlap, so nothing was tested"
    assert first_stats.shards_computed + second_stats.shards_computed == first_stats.shards == 6
    assert first.folder == second.folder and first.splits == second.splits == {"train": 200, "test": 100}
    assert verify_feature_set(config.storage, first.folder) == {}
    return first


def assert_same_features(storage_url: str, reference_url: str) -> None:
    for split in ("train", "test"):
        for found, expected in zip(load_features(storage_url, split), load_features(reference_url, split), strict=True):
            np.testing.assert_array_equal(found, expected)


def test_two_runs_started_together_compute_each_shard_once(tiny_archive, tmp_path, reference_features):
    config = tiny_config(tiny_archive, tmp_path / "shared")
    run_twice_at_once(config)
    assert not list((tmp_path / "shared").rglob(".*")), "a claim or temporary file was left behind"
    alone, _ = reference_features()
    assert_same_features(config.storage, alone.storage_url)
