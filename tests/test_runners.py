"""Shards on a real local Ray, and Dask workers pinned one per GPU (checked on real worker processes)."""

from __future__ import annotations

import os

import pytest
from distributed import Client, SpecCluster
from test_flow import tiny_config
from test_scaleout import manifest_checksums

from cifar_transfer.flows.pipeline import extract_features
from cifar_transfer.hardware import gpus
from cifar_transfer.tasks import runners
from cifar_transfer.tasks.runners import gpu_cluster_spec, visible_gpu_ids


@pytest.mark.long
def test_ray_workers_compute_the_same_shards_bit_for_bit(tiny_archive, tmp_path, reference_features):
    pytest.importorskip("prefect_ray", reason="Ray is optional: pip install prefect-ray")
    threads, _ = reference_features()

    ray, ray_stats = extract_features(tiny_config(tiny_archive, tmp_path / "ray", task_runner="ray", workers=2))
    assert ray_stats.shards_computed == 6
    assert ray_stats.processes and os.getpid() not in ray_stats.processes, "shards ran in the flow's own process"
    assert ray.fingerprint == threads.fingerprint
    assert manifest_checksums(ray.folder) == manifest_checksums(threads.folder)


def test_on_a_ray_cluster_with_gpus_each_shard_takes_one_and_workers_keep_their_backbone(prefect_api, tiny_archive, tmp_path):
    """Ray declares one GPU here (none is needed to schedule by it): shards then run one at a time,
    all in one worker process, though there are CPUs for four; without `num_gpus=1` they would spread
    over several workers, and without `max_calls=0` each shard would get a fresh process."""
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install prefect-ray")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        features, stats = extract_features(tiny_config(tiny_archive, tmp_path / "ray", task_runner="ray"))
    finally:
        ray.shutdown()
    assert stats.shards_computed == 6 and len(stats.processes) == 1 and os.getpid() not in stats.processes
    assert features.splits == {"train": 200, "test": 100}


def test_dask_workers_are_pinned_round_robin_to_the_gpus():
    if not gpus():
        assert visible_gpu_ids() == [], "without GPUs the Dask cluster must stay the plain CPU one"
    with SpecCluster(**gpu_cluster_spec(["0", "1"], workers=3), asynchronous=False) as cluster, Client(cluster) as client:
        pinned = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(pinned.values()) == ["0", "0", "1"]


def test_dask_with_several_gpus_runs_shards_on_the_pinned_workers(tiny_archive, tmp_path, monkeypatch, reference_features):
    """The GPU cluster spec through Prefect's DaskTaskRunner, end to end; the GPUs themselves are
    declared (TensorFlow finds none here and computes on the CPU, so the features must not change)."""
    monkeypatch.setattr(runners, "visible_gpu_ids", lambda: ["0", "1"])
    threads, _ = reference_features()
    pinned, stats = extract_features(tiny_config(tiny_archive, tmp_path / "dask", task_runner="dask", workers=1))
    assert stats.shards_computed == 6 and len(stats.processes) == 2 and os.getpid() not in stats.processes
    assert manifest_checksums(pinned.folder) == manifest_checksums(threads.folder)
