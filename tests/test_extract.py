"""Backbones by name and single-shard extraction to Parquet, with real Keras models."""

from __future__ import annotations

import collections
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cifar_transfer import extract, layout
from cifar_transfer.backbones import build_extractor, get_backbone
from cifar_transfer.backbones.base import Backbone
from cifar_transfer.config import load_config
from cifar_transfer.dataset import decode_archive
from cifar_transfer.errors import ConfigError
from cifar_transfer.extract import extract_shard
from cifar_transfer.extractors import get_extractor
from cifar_transfer.pause import PAUSE_AT
from cifar_transfer.shard_files import METADATA_KEY, shard_path, shard_problem
from cifar_transfer.shards import plan_shards
from cifar_transfer.storage import Storage
from conftest import MOBILENET_WEIGHTS

IMAGES = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


def features_of(backbone, **options):
    options = {"weights": "none", "pooling": "avg", "precision": "float32", "seed": 0, **options}
    return build_extractor(backbone, **options).predict(IMAGES, verbose=0)


def differ(first, second) -> bool:
    """Relative comparison: random-init activations can be tiny (1e-12) yet different."""
    return not np.allclose(first, second, rtol=1e-3, atol=0)


def test_registry_knows_every_keras_application_with_its_preprocessing():
    inception = get_backbone("inceptionv3")
    assert (inception.name, inception.min_input_size, inception.default_input_size) == ("InceptionV3", 75, 139)
    assert get_backbone("ResNet50").preprocess_input.__module__.endswith("resnet")
    assert get_backbone("EfficientNetB3").default_input_size == 300
    with pytest.raises(ConfigError, match="unknown backbone 'AlexNet'"):
        get_backbone("AlexNet")


class TinyFamily:
    """A second backbone family, as a Keras Hub family would register: names "tiny:<width>", a two-stage CNN."""

    prefix = "tiny"
    naming = "tiny:<width>"

    def resolve(self, name):
        width = name.removeprefix("tiny:")
        return Backbone(f"tiny:{width}", self, min_input_size=8, default_input_size=16) if width.isdigit() else None

    def valid_names(self):
        return "tiny:<width>"

    def build(self, backbone, *, weights, input_size, pooling):
        import keras

        from cifar_transfer.backbones.stages import pooled_stages

        width = int(backbone.name.removeprefix("tiny:"))
        pixels = keras.Input((input_size, input_size, 3))
        early = keras.layers.Conv2D(width, 3, strides=2, activation="relu", name="early")(pixels)
        late = keras.layers.Conv2D(2 * width, 3, strides=2, activation="relu", name="late")(early)
        base = keras.Model(pixels, late, name="tiny")
        return {"stages": pooled_stages, "avg": lambda model: keras.Model(pixels, keras.ops.mean(late, axis=(1, 2)))}.get(
            pooling, lambda model: model
        )(base)

    def preprocessing(self, backbone):
        return lambda pixels: pixels / 255.0


def test_a_second_backbone_family_is_one_registration(monkeypatch):
    from cifar_transfer import backbones

    monkeypatch.setattr(backbones, "FAMILIES", (*backbones.FAMILIES, TinyFamily()))
    config = load_config(backbone="tiny:4", weights="none", source="/data/c.tar.gz", md5="none")
    assert (config.extraction_settings.backbone_name, config.extraction_settings.resolved_input_size) == ("tiny:4", 16)
    with pytest.raises(ConfigError, match="input_size 4 is below tiny:4's minimum of 8"):
        load_config(backbone="tiny:4", input_size=4, source="/data/c.tar.gz", md5="none")
    with pytest.raises(ConfigError, match=r"unknown backbone 'tiny:x': use a keras.applications model name, one of .* or tiny:<width>"):
        get_backbone("tiny:x")
    assert get_backbone("mobilenetv2").name == "MobileNetV2"  # plain names stay keras.applications'
    shapes = {pooling: features_of("tiny:4", input_size=16, pooling=pooling).shape for pooling in ("avg", "stages", "none")}
    assert shapes == {"avg": (6, 8), "stages": (6, 4 + 8), "none": (6, 3, 3, 8)}
    assert features_of("tiny:4", input_size=16, seed=1).tolist() != features_of("tiny:4", input_size=16, seed=2).tolist()


@pytest.mark.slow
def test_inception_pooled_and_spatial_features_have_the_posts_shapes():
    assert features_of("InceptionV3", input_size=75).shape == (6, 2048)
    assert features_of("InceptionV3", input_size=139, pooling="none").shape == (6, 3, 3, 2048)


@pytest.mark.parametrize(
    "backbone, input_size, taps",
    [
        ("MobileNetV2", 224, ["block_13_expand_relu", "block_16_expand_relu", "out_relu"]),
        ("InceptionV3", 139, ["mixed7", "mixed8", "mixed10"]),
        ("ResNet50", 64, ["conv4_block6_out", "conv5_block1_out", "conv5_block3_out"]),
        ("EfficientNetB0", 64, ["block6a_expand_activation", "block7a_expand_activation", "top_activation"]),
    ],
)
def test_stage_taps_are_the_stage_end_before_the_last_the_last_stages_widest_point_and_the_output(backbone, input_size, taps):
    import keras

    from cifar_transfer.backbones.stages import stage_taps

    model = getattr(keras.applications, backbone)(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    found = stage_taps(model)
    assert [tap._keras_history.operation.name for tap in found] == taps and found[-1] is model.output
    assert found[0].shape[1] in (2 * found[1].shape[1], 2 * found[1].shape[1] + 1) and found[1].shape[1:3] == found[2].shape[1:3]


@pytest.mark.slow
@pytest.mark.skipif(not MOBILENET_WEIGHTS.exists(), reason="../shared/data weights not present")
def test_stages_pooling_is_the_pooled_stage_end_then_the_pooled_final_features():
    import keras

    options = {"weights": str(MOBILENET_WEIGHTS), "input_size": 96}
    stages, final = features_of("MobileNetV2", pooling="stages", **options), features_of("MobileNetV2", pooling="avg", **options)
    assert stages.shape == (6, 576 + 960 + 1280)
    np.testing.assert_allclose(stages[:, 576 + 960 :], final, rtol=1e-5, atol=1e-5)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3))
    base.load_weights(str(MOBILENET_WEIGHTS))
    pixels = keras.applications.mobilenet_v2.preprocess_input(keras.layers.Resizing(96, 96)(IMAGES.astype("float32")))
    for name, columns in (("block_13_expand_relu", slice(0, 576)), ("block_16_expand_relu", slice(576, 576 + 960))):
        inner = keras.Model(base.input, base.get_layer(name).output)
        np.testing.assert_allclose(stages[:, columns], np.asarray(inner(pixels, training=False)).mean(axis=(1, 2)), rtol=1e-4, atol=1e-4)
        assert stages[:, columns].std() > 0.01  # real activations, not batch-statistics noise


@pytest.mark.parametrize(
    "backbone, input_size, width",
    [("EfficientNetB0", 32, 1280), ("MobileNetV3Small", 32, 576), ("Xception", 71, 2048), ("DenseNet121", 32, 1024)],
)
@pytest.mark.slow
def test_other_families_work_by_name_with_their_own_preprocessing(backbone, input_size, width):
    assert features_of(backbone, input_size=input_size).shape == (6, width)


@pytest.mark.slow
def test_random_weights_are_a_function_of_the_seed_even_while_other_threads_use_random():
    import random
    import threading

    stop = threading.Event()

    def busy():
        while not stop.is_set():
            random.random()

    first = features_of("MobileNetV2", input_size=32)
    noise = threading.Thread(target=busy, daemon=True)
    noise.start()
    try:
        again = features_of("MobileNetV2", input_size=32)
    finally:
        stop.set()
        noise.join()
    np.testing.assert_array_equal(first, again)
    assert differ(first, features_of("MobileNetV2", input_size=32, seed=1))


def test_preprocessing_is_the_backbones_own():
    """ResNet50 uses caffe-style BGR mean subtraction: swapping channels must change its features."""
    swapped = IMAGES[..., ::-1]
    model = build_extractor("ResNet50", weights="none", input_size=32, pooling="avg", precision="float32", seed=0)
    assert differ(model.predict(IMAGES, verbose=0), model.predict(swapped, verbose=0))


@pytest.mark.slow
@pytest.mark.skipif(not MOBILENET_WEIGHTS.exists(), reason="../shared/data weights not present")
def test_weights_file_loads_at_any_input_size_and_a_foreign_one_is_refused():
    trained = features_of("MobileNetV2", input_size=64, weights=str(MOBILENET_WEIGHTS))
    assert trained.shape == (6, 1280)
    assert differ(trained, features_of("MobileNetV2", input_size=64))
    with pytest.raises(ConfigError, match=r"does not fit InceptionV3\(include_top=False\)"):
        features_of("InceptionV3", input_size=75, weights=str(MOBILENET_WEIGHTS))


@pytest.fixture
def one_shard(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    storage_url = str(tmp_path / "storage")
    dataset = decode_archive(storage_url, str(path), md5)
    config = load_config(source=str(path), md5=md5, storage=storage_url, backbone="MobileNetV2", weights="none", input_size=32)
    spec = config.feature_spec(md5, "tensorflow", "float32")
    shard = plan_shards(dataset.sizes, 64)[1]
    return storage_url, spec, dataset, shard


def test_shard_parquet_follows_the_contract(one_shard):
    storage_url, spec, dataset, shard = one_shard
    record = extract_shard(storage_url, spec, dataset, shard, batch_size=16).record
    path = shard_path(Storage(storage_url), spec, shard)
    table = pq.read_table(path)
    assert table.schema.field("index").type == pa.int64()
    assert table.schema.field("features").type == pa.list_(pa.float32(), 576 + 960 + 1280)
    assert table.column("index").to_pylist() == list(range(64, 128))
    metadata = json.loads(table.schema.metadata[METADATA_KEY])
    assert metadata["fingerprint"] == spec.fingerprint
    assert metadata["feature_shape"] == [576 + 960 + 1280]
    assert set(metadata["versions"]) >= {"tensorflow", "keras", "pyarrow", "numpy", "python"}
    images = np.load(f"{dataset.folder}/train_images.npy")[64:128]
    expected = get_extractor(spec, (32, 32, 3))(images, 16)
    np.testing.assert_allclose(np.stack(table.column("features").to_numpy(zero_copy_only=False)), expected, rtol=1e-5, atol=1e-5)
    assert (record.rows, record.start, record.file) == (64, 64, "part-00001.parquet")
    again = extract_shard(storage_url, spec, dataset, shard, batch_size=16)
    assert again.record == record and again.inference_seconds is None


def test_features_that_repeat_as_quantized_ones_do_get_a_dictionary_and_float_ones_are_written_plain():
    """A dictionary where the features take few values (an int8 backbone's), none where they do not; either way the
    file reads back the same features, and the same table is the same bytes."""
    from cifar_transfer.shard_files import parquet_bytes

    rng = np.random.default_rng(0)
    floats = rng.normal(size=(200, 2048)).astype(np.float32)
    quantized = np.round(floats * 8) / 8  # about a hundred distinct values
    for values, dictionary in ((floats, False), (quantized, True)):
        table = pa.table({"index": np.arange(200), "features": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 2048)})
        payload = parquet_bytes(table)
        encodings = pq.ParquetFile(pa.BufferReader(payload)).metadata.row_group(0).column(1).encodings
        assert ("RLE_DICTIONARY" in encodings) == dictionary, encodings
        back = pq.read_table(pa.BufferReader(payload)).column("features").combine_chunks().flatten().to_numpy()
        assert np.array_equal(back.reshape(200, 2048), values) and parquet_bytes(table) == payload


@pytest.mark.slow
@pytest.mark.parametrize("commits", [1, 3])
def test_shards_through_one_pipeline_are_each_its_own_rows_features_in_order(one_shard, commits):
    """OpenVINO keeps the next shard's batches queued behind the current one's, and shards are committed on one thread or
    several (as on a machine of 4 or 12 cores); every file still holds exactly its own rows' features, a shard found
    done on the way is reused in its place, and the results come back in plan order."""
    storage_url, spec, dataset, _ = one_shard
    spec = spec.model_copy(update={"engine": "openvino"})
    shards = plan_shards({"train": dataset.sizes["train"]}, 64)
    assert len(shards) == 4
    done_before = extract_shard(storage_url, spec, dataset, shards[1], batch_size=16)

    extracted = extract.extract_shards(storage_url, spec, dataset, shards, batch_size=16, commits=commits)

    assert [one.record.start for one in extracted] == [shard.start for shard in shards]
    assert extracted[1].record == done_before.record and extracted[1].inference_seconds is None
    assert all(one.inference_seconds is not None for number, one in enumerate(extracted) if number != 1)
    images = np.load(f"{dataset.folder}/train_images.npy")
    engine = get_extractor(spec, (32, 32, 3), storage_url)
    for shard in shards:
        table = pq.read_table(shard_path(Storage(storage_url), spec, shard))
        assert table.column("index").to_pylist() == list(range(shard.start, shard.stop))
        stored = np.stack(table.column("features").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(stored, engine(images[shard.start : shard.stop], 16))


@pytest.mark.slow
def test_damaged_or_foreign_shards_are_detected_and_recomputed(one_shard, tmp_path):
    storage_url, spec, dataset, shard = one_shard
    storage = Storage(storage_url)
    path = shard_path(storage, spec, shard)
    good = extract_shard(storage_url, spec, dataset, shard, batch_size=16).record
    original = open(path, "rb").read()

    with open(path, "r+b") as stream:
        stream.truncate(len(original) // 2)
    assert shard_problem(storage, path, spec, shard).startswith("unreadable as Parquet")
    assert extract_shard(storage_url, spec, dataset, shard, batch_size=16).record == good

    other = load_config(source="x", md5="none", backbone="MobileNetV2", weights="none", input_size=32, seed=7).feature_spec(
        spec.dataset_id, "tensorflow", "float32"
    )
    foreign_dir = tmp_path / "foreign"
    extract_shard(str(foreign_dir), other, dataset, shard, batch_size=16)
    os.replace(shard_path(Storage(str(foreign_dir)), other, shard), path)
    assert shard_problem(storage, path, spec, shard).startswith("written by another configuration")
    assert extract_shard(storage_url, spec, dataset, shard, batch_size=16).record == good
    assert open(path, "rb").read() == original


def test_a_leftover_temporary_file_is_never_taken_as_a_shard(one_shard):
    storage_url, spec, dataset, shard = one_shard
    storage = Storage(storage_url)
    path = shard_path(storage, spec, shard)
    storage.fs.makedirs(os.path.dirname(path), exist_ok=True)
    leftover = layout.temp_file(path)
    with open(leftover, "wb") as stream:
        stream.write(b"PAR1 half a shard")
    assert shard_problem(storage, path, spec, shard) == "missing"
    extract_shard(storage_url, spec, dataset, shard, batch_size=16)
    assert shard_problem(storage, path, spec, shard) is None
    assert not os.path.exists(leftover)


def test_a_shards_claim_may_be_held_ten_times_its_peers_median_and_at_least_five_minutes(one_shard, tmp_path, monkeypatch):
    """The claim-deadline rule, read from the claim file other runs judge it by while the shard is in flight: with no
    shard done yet in the process, the storage's default hour; then 10x the median of its recent shards, at least 5 min."""
    storage_url, spec, dataset, shard = one_shard
    storage = Storage(storage_url)
    path = shard_path(storage, spec, shard)
    marker = tmp_path / "paused"
    monkeypatch.setenv(PAUSE_AT, f"{shard.name}={marker}")

    def hold_while_in_flight(recent_shard_seconds: list[float]) -> float:
        """Seconds from the pause to the deadline in the shard's claim, when the process's last shards took these."""
        monkeypatch.setattr(extract, "_recent_shard_seconds", collections.deque(recent_shard_seconds, maxlen=32))
        with ThreadPoolExecutor(1) as pool:
            extraction = pool.submit(extract_shard, storage_url, spec, dataset, shard, 16)
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert not extraction.done(), extraction.exception()
                assert time.monotonic() < deadline, "the extraction never reached the shard"
                time.sleep(0.01)
            paused_at = time.time()
            held = json.loads(storage.read_bytes(layout.claim_file(path)))
            marker.unlink()
            assert extraction.result().inference_seconds is not None
        os.remove(path)  # the next call computes the shard again
        return held["deadline"] - paused_at

    assert 3600 - 60 < hold_while_in_flight([]) <= 3600
    assert 300 - 60 < hold_while_in_flight([2.0, 3.0, 90.0]) <= 300  # 10 x 3 s is under the 5 min floor
    assert 500 - 60 < hold_while_in_flight([40.0, 70.0, 50.0]) <= 500  # 10 x the median, 50 s


def test_cache_keys_change_with_the_shape_of_the_result():
    """A cache written by an older version of a task (another result schema) is never handed to newer code."""
    from pydantic import BaseModel

    from cifar_transfer.progress import ExtractedShard
    from cifar_transfer.tasks.caching import output_key_fn

    class OlderResult(BaseModel):
        path: str

    def same_output(**_):
        return "committed-file-identity"

    assert output_key_fn(same_output, OlderResult)(None, {}) != output_key_fn(same_output, ExtractedShard)(None, {})
    assert output_key_fn(same_output, ExtractedShard)(None, {}) == output_key_fn(same_output, ExtractedShard)(None, {})
