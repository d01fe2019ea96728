"""Shards on a real Dask LocalCluster: run in the worker processes, same Parquet bytes as one machine."""

from __future__ import annotations

import json
import os

import pytest
from test_flow import tiny_config

from cifar_transfer.flows.pipeline import extract_features

pytestmark = pytest.mark.usefixtures("prefect_api")


def manifest_checksums(folder: str) -> dict[str, str]:
    checksums = {}
    for split in ("train", "test"):
        manifest = json.load(open(os.path.join(folder, split, "_manifest.json")))
        checksums |= {f"{split}/{shard['file']}": shard["sha256"] for shard in manifest["shards"]}
    return checksums


def test_dask_workers_compute_the_same_shards_bit_for_bit(tiny_archive, tmp_path, reference_features):
    threads, thread_stats = reference_features()
    assert len(thread_stats.processes) == 1, "the thread runner ran shards outside the flow's process"  # made in any worker

    dask, dask_stats = extract_features(tiny_config(tiny_archive, tmp_path / "dask", task_runner="dask", workers=2))
    assert dask_stats.shards_computed == 6
    assert dask_stats.processes and os.getpid() not in dask_stats.processes, "shards ran in the flow's own process"
    assert dask.fingerprint == threads.fingerprint
    assert manifest_checksums(dask.folder) == manifest_checksums(threads.folder)
