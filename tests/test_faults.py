"""Faults injected for real: a full disk, and bad parameters thrown at the config by hypothesis."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_flow import tiny_config

from cifar_transfer.config import PipelineConfig, load_config
from cifar_transfer.errors import ConfigError, StorageFull
from cifar_transfer.flows.pipeline import extract_features
from cifar_transfer.shard_files import shard_path, shard_problem
from cifar_transfer.shards import plan_shards
from cifar_transfer.storage import Storage
from cifar_transfer.store import load_features


@contextlib.contextmanager
def small_filesystem(folder: Path, size_kb: int):
    """A size-limited tmpfs mounted at `folder` (needs root, as in CI)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): run as root to test a full disk")
    try:
        yield lambda new_size_kb: subprocess.run(["mount", "-o", f"remount,size={new_size_kb}k", str(folder)], check=True)
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.usefixtures("prefect_api")
def test_full_disk_fails_in_one_line_keeps_finished_shards_and_resumes(tiny_archive, tmp_path, reference_features):
    path, _ = tiny_archive
    # Room for the archive, its decoded copy and a few 100 KB shards, not for all 15.
    size_kb = (2 * path.stat().st_size + 500_000) // 1024
    with small_filesystem(tmp_path / "small", size_kb) as resize:
        config = tiny_config(tiny_archive, tmp_path / "small", shard_size=20)
        with pytest.raises(StorageFull) as error:
            extract_features(config)
        message = str(error.value)
        assert "\n" not in message and f"storage {config.storage} is full" in message and "MB" in message
        storage = Storage(config.storage)
        assert not list((tmp_path / "small").glob("features/*/*/.*.tmp")), "a temporary file was left behind"
        spec = config.feature_spec(tiny_archive[1])
        plan = plan_shards({"train": 200, "test": 100}, 20)
        finished = [shard for shard in plan if Path(shard_path(storage, spec, shard)).exists()]
        assert 0 < len(finished) < len(plan)
        assert all(shard_problem(storage, shard_path(storage, spec, shard), spec, shard) is None for shard in finished)

        resize(50_000)
        _, stats = extract_features(config)
        assert stats.shards_computed == len(plan) - len(finished)
        resumed = load_features(config.storage, "train", spec.fingerprint)[2]
    reference, _ = reference_features(shard_size=20)
    np.testing.assert_array_equal(resumed, load_features(reference.storage_url, "train", reference.fingerprint)[2])


NUMERIC_LIMITS = {
    "shard_size": (1, 100_000),
    "batch_size": (1, 4096),
    "epochs": (1, 10_000),
    "head_batch_size": (1, 65_536),
    "patience": (1, None),
    "tsne_sample": (0, None),
    "seed": (0, 2**31 - 1),
}
LOCAL = {"source": "/data/cifar-10-python.tar.gz", "md5": "none"}


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(sorted(NUMERIC_LIMITS)), value=st.integers(min_value=-(2**40), max_value=2**40))
def test_every_numeric_option_is_accepted_exactly_within_its_range(field, value):
    low, high = NUMERIC_LIMITS[field]
    valid = value >= low and (high is None or value <= high)
    if valid:
        assert getattr(load_config(**LOCAL, **{field: value}), field) == value
    else:
        with pytest.raises(ConfigError) as error:
            load_config(**LOCAL, **{field: value})
        assert str(error.value).startswith(f"invalid configuration: {field}:") and "\n" not in str(error.value)


@settings(max_examples=40, deadline=None)
@given(input_size=st.integers(min_value=-10, max_value=400), backbone=st.sampled_from(["InceptionV3", "MobileNetV2", "Xception"]))
def test_input_size_is_checked_against_each_backbones_minimum(input_size, backbone):
    minimum = {"InceptionV3": 75, "MobileNetV2": 32, "Xception": 71}[backbone]
    if input_size >= minimum:
        assert load_config(**LOCAL, backbone=backbone, input_size=input_size).extraction_settings.resolved_input_size == input_size
    else:
        with pytest.raises(ConfigError, match=f"below {backbone}'s minimum of {minimum}"):
            load_config(**LOCAL, backbone=backbone, input_size=input_size)


@settings(max_examples=40, deadline=None)
@given(name=st.text(min_size=1, max_size=20))
def test_any_backbone_name_is_either_a_keras_application_or_refused_in_one_line(name):
    from cifar_transfer.backbones.applications import available_models

    known = {known.lower(): known for known in available_models()}
    if name.lower() in known:
        assert load_config(**LOCAL, backbone=name).extraction_settings.backbone_name == known[name.lower()]
    else:
        with pytest.raises(ConfigError, match="unknown backbone") as error:
            load_config(**LOCAL, backbone=name)
        assert "\n" not in str(error.value).replace(name, "")


def test_every_option_has_a_description_for_help():
    assert all(field.description for field in PipelineConfig.model_fields.values())
