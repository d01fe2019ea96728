"""Engines and precisions: OpenVINO computes TensorFlow's function, and `auto` only keeps a precision that earns it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_flow import tiny_config

from cifar_transfer import extractors
from cifar_transfer.config import load_config
from cifar_transfer.engines import (
    BF16_MIN_COSINE,
    INT8_MIN_COSINE,
    MAX_ACCURACY_DROP,
    ProbeReference,
    candidate_choice,
    candidate_choices,
    choose_engine,
    mean_cosine,
    precision_failure,
)
from cifar_transfer.errors import ConfigError, FeatureSetError
from cifar_transfer.extractors import INT8_CALIBRATION_IMAGES, get_extractor
from cifar_transfer.flows.pipeline import extract_features
from cifar_transfer.hardware import cpu_has_int8_acceleration, cpu_has_native_bf16
from cifar_transfer.ridge import probe_answers
from cifar_transfer.storage import Storage
from cifar_transfer.store import load_features
from conftest import MOBILENET_WEIGHTS

TINY = {"source": "x", "md5": "none", "backbone": "MobileNetV2", "weights": "none", "input_size": 32}


def features(config, images, md5="a" * 32):
    return get_extractor(config.feature_spec(md5), images.shape[1:])(images, 16)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)


@pytest.mark.slow
def test_openvino_float32_computes_the_tensorflow_model(images):
    tensorflow = features(load_config(**TINY, engine="tensorflow", precision="float32"), images)
    openvino = features(load_config(**TINY, engine="openvino", precision="float32"), images)
    assert openvino.shape == tensorflow.shape == (40, 576 + 960 + 1280) and openvino.dtype == np.float32
    assert mean_cosine(openvino, tensorflow) > 0.99999
    np.testing.assert_allclose(openvino, tensorflow, rtol=1e-3, atol=1e-3)
    # Batches of any size, the last one short, land in the right rows.
    np.testing.assert_array_equal(
        get_extractor(load_config(**TINY, engine="openvino", precision="float32").feature_spec("a" * 32), (32, 32, 3))(images[:7], 3),
        openvino[:7],
    )


def test_each_shards_engine_time_is_its_own_when_two_runs_share_the_engine(images):
    """Two task runs feed one engine: a shard's engine time must not count the other run's shards queued before
    it (the log's per-shard rate), so the times of all shards add up to no more than the engine's wall time."""
    extractor = get_extractor(load_config(**TINY, engine="openvino", precision="float32").feature_spec("a" * 32), (32, 32, 3))
    shard = np.concatenate([images] * 10)  # 400 images, 25 batches
    extractor(shard[:16], 16)
    together, futures = threading.Barrier(2), []

    def run() -> None:
        together.wait()
        futures.extend([extractor.submit(shard, 16) for _ in range(4)])

    started = time.perf_counter()
    runs = [threading.Thread(target=run) for _ in range(2)]
    for one in runs:
        one.start()
    for one in runs:
        one.join()
    for future in futures:
        future.result()
    wall = time.perf_counter() - started
    seconds = [future.engine_seconds for future in futures]
    assert len(seconds) == 8 and all(one > 0 for one in seconds)
    assert 0.5 * wall < sum(seconds) <= wall, (seconds, wall)

    # The pipeline hands a committed shard's array back to be filled again: the same memory, the same features.
    reused = futures[0].result()
    again = extractor.submit(shard[::-1].copy(), 16, into=reused).result()
    assert again is reused
    np.testing.assert_array_equal(again, extractor(shard[::-1].copy(), 16))
    assert extractor.submit(shard[:5], 16, into=reused).result() is not reused  # another shape: a new array


CONVERTED_RERUN = """
import json
import sys
import numpy as np
from cifar_transfer.config import load_config
from cifar_transfer.extractors import get_extractor
OPTIONS = json.loads(sys.argv[3])
images = np.load(sys.argv[1])
spec = load_config(**OPTIONS, engine="openvino", precision=sys.argv[4]).feature_spec("a" * 32)
np.save(sys.argv[1], get_extractor(spec, images.shape[1:], sys.argv[2])(images, 16))
print("tensorflow loaded:", "tensorflow" in sys.modules)
"""


def rerun_from_storage(images: np.ndarray, storage: Path, precision: str, scratch: Path, options: dict = TINY) -> bool:
    """Run the kept backbone on `images` in a new process (features left in scratch/images.npy); whether it loaded TensorFlow."""
    np.save(scratch / "images.npy", images)
    rerun = subprocess.run(
        [
            sys.executable,
            "-X",
            "faulthandler",
            "-c",
            CONVERTED_RERUN,
            str(scratch / "images.npy"),
            str(storage),
            json.dumps(options),
            precision,
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert rerun.returncode == 0 and "tensorflow loaded:" in rerun.stdout, (rerun.returncode, rerun.stdout + rerun.stderr[-3000:])
    return "tensorflow loaded: True" in rerun.stdout


@pytest.mark.slow
def test_a_converted_backbone_is_kept_and_a_new_process_runs_it_without_tensorflow(images, tmp_path, caplog):
    storage = tmp_path / "storage"
    spec = load_config(**TINY, engine="openvino", precision="float32").feature_spec("a" * 32)
    converted = extractors.build_engine_extractor(spec, images.shape[1:], Storage(str(storage)))(images, 16)
    [kept] = (storage / "features").glob("*/extractor/*.openvino.zip")  # in the feature set's folder: deleted with it

    assert rerun_from_storage(images, storage, "float32", tmp_path) is False
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), converted)  # the same function, bit for bit

    damaged = bytearray(kept.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the weights: only the zip's checksum can tell
    kept.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="cifar_transfer.extractors"):
        again = extractors.build_engine_extractor(spec, images.shape[1:], Storage(str(storage)))(images, 16)
    assert "is damaged" in caplog.text and "converting it again" in caplog.text
    np.testing.assert_array_equal(again, converted)
    assert zipfile.ZipFile(kept).testzip() is None  # replaced by a whole copy


def test_engine_and_precision_name_different_feature_sets():
    fingerprints = {
        load_config(**TINY, engine=engine, precision=precision).feature_spec("a" * 32).fingerprint
        for engine in ("tensorflow", "openvino")
        for precision in ("float32", "bfloat16")
    }
    assert len(fingerprints) == 4
    with pytest.raises(ValueError, match="must be resolved"):
        load_config(**TINY).feature_spec("a" * 32)


def test_auto_on_this_cpu_proposes_openvino_in_the_fastest_precision_the_cpu_runs_natively():
    choices = candidate_choices(load_config(**TINY).extraction_settings)
    native = [("int8", cpu_has_int8_acceleration()), ("bfloat16", cpu_has_native_bf16()), ("float32", True)]
    assert [(choice.engine, choice.precision) for choice in choices] == [("openvino", precision) for precision, has in native if has]
    assert candidate_choice(load_config(**TINY).extraction_settings) == choices[0]
    explicit = candidate_choice(load_config(**TINY, engine="tensorflow", precision="float16").extraction_settings)
    assert (explicit.engine, explicit.precision, explicit.reason) == ("tensorflow", "float16", "chosen in the configuration")


@pytest.mark.slow
def test_auto_precision_is_measured_once_and_remembered(images, tmp_path):
    config = load_config(**TINY, storage=str(tmp_path))
    one_class = np.zeros(len(images), np.int64)  # every head is right on it: the verdict here is the cosine's
    first = choose_engine(config.extraction_settings, config.storage, "a" * 32, lambda count: (images[:count], one_class[:count]))
    stored = list(tmp_path.glob("engine-choices/*.json"))
    if cpu_has_int8_acceleration():  # seeded weights' activations vanish below int8's step: int8 is turned down
        assert "int8 features were at cosine" in first.reason, first.reason
        assert list(tmp_path.glob("features/*")) == [], "the turned-down int8 candidate's quantized backbone was left behind"
    if not cpu_has_int8_acceleration() and not cpu_has_native_bf16():  # float32 is the only candidate: nothing measured
        assert (first.precision, stored) == ("float32", [])
        return
    if cpu_has_native_bf16():
        exact = features(config.model_copy(update={"engine": "openvino", "precision": "float32"}), images)  # the choice's reference
        reduced = features(config.model_copy(update={"engine": first.engine, "precision": "bfloat16"}), images)
        measured = mean_cosine(reduced, exact)
        assert first.precision == ("bfloat16" if measured >= BF16_MIN_COSINE else "float32")
        assert f"{measured:.6f}" in first.reason
        assert first.precision == "float32" or "probe accuracy 100.00% (float32 100.00%, noise 0.00%) on 40 images" in first.reason, (
            first.reason
        )
    assert len(stored) == 1 and json.loads(stored[0].read_text())["precision"] == first.precision
    extractors.release_extractors()

    def never(count: int) -> tuple[np.ndarray, np.ndarray]:
        pytest.fail("a remembered choice read images")

    assert choose_engine(config.extraction_settings, config.storage, "a" * 32, never) == first
    assert extractors.built_extractors() == [], "a remembered choice must not rebuild the backbone"


def test_a_reduced_precision_that_keeps_the_cosine_but_loses_the_classes_is_turned_down():
    """Cosine alone is blind to a small part of the features that carries the classes; the probe's head is not."""
    rng = np.random.default_rng(3)
    labels = np.arange(512) % 10
    shared = 40 * rng.normal(size=(1, 256))  # what every image's features have in common: most of their length
    classes = rng.normal(size=(10, 256))
    exact = shared + classes[labels] + 0.3 * rng.normal(size=(512, 256))
    rounded_away = shared + 0.3 * rng.normal(size=(512, 256))  # the class part lost, as a coarse rounding could lose it
    kept = exact + 0.01 * rng.normal(size=exact.shape)

    failure, measured = precision_failure("int8", rounded_away, ProbeReference.of(exact, labels))
    assert mean_cosine(rounded_away, exact) > INT8_MIN_COSINE, "the cosine check alone would pass it"
    assert failure is not None and failure.startswith("int8 features' probe accuracy was "), failure
    assert f"against float32's 100.00%: over {MAX_ACCURACY_DROP:.0%} and twice the noise" in failure and "on 512 images" in measured
    passed, measured = precision_failure("int8", kept, ProbeReference.of(exact, labels))
    assert passed is None and "probe accuracy 100.00% (float32 100.00%, noise 0.00%) on 512 images" in measured, measured


def test_a_drop_within_the_noise_of_the_comparison_is_not_held_against_a_precision():
    """Near ties flip both ways under any rounding: a drop no larger than that churn says nothing about the precision."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 512)
    exact = 3 + 0.35 * np.eye(10)[labels] @ rng.normal(size=(10, 64)) + rng.normal(size=(512, 64))  # three in four right
    rounded = exact + 0.25 * rng.normal(size=exact.shape)
    right, reference = probe_answers(rounded, labels), probe_answers(exact, labels)
    assert mean_cosine(rounded, exact) > INT8_MIN_COSINE and reference.mean() - right.mean() > MAX_ACCURACY_DROP, "a 1-point rule fails it"
    assert np.sum(right != reference) > 30, "many answers changed, both ways"
    failure, measured = precision_failure("int8", rounded, ProbeReference.of(exact, labels))
    assert failure is None and f"(float32 {reference.mean():.2%}, noise " in measured, (failure, measured)


def test_int8_runs_on_openvino_only():
    with pytest.raises(ConfigError, match="precision 'int8' runs on OpenVINO only: pass --engine openvino"):
        candidate_choice(load_config(**TINY, engine="tensorflow", precision="int8").extraction_settings)
    expected = ["int8"] * cpu_has_int8_acceleration() + ["bfloat16"] * cpu_has_native_bf16() + ["float32"]
    assert [choice.precision for choice in candidate_choices(load_config(**TINY).extraction_settings)] == expected


@pytest.mark.slow
def test_int8_is_quantized_once_on_training_images_and_later_processes_read_it_back(tmp_path, caplog):
    """Quantized when the run chooses its engine, then kept: a worker or a resumed run computes the same features."""
    training = np.random.default_rng(1).integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
    storage = tmp_path / "storage"
    pretrained = TINY | {"weights": str(MOBILENET_WEIGHTS)}  # seeded weights' activations vanish below int8's step
    config = load_config(**pretrained, storage=str(storage), engine="openvino", precision="int8")
    asked = []

    def read_calibration_rows(count: int) -> tuple[np.ndarray, np.ndarray]:
        asked.append(count)
        return training[:count], np.zeros(count, np.int64)

    with caplog.at_level(logging.INFO, logger="cifar_transfer.extractors"):
        choice = choose_engine(config.extraction_settings, config.storage, "a" * 32, read_calibration_rows)
    assert (choice.engine, choice.precision, asked) == ("openvino", "int8", [INT8_CALIBRATION_IMAGES])
    assert f"quantized the backbone to int8 on {INT8_CALIBRATION_IMAGES} training images" in caplog.text
    [kept] = (storage / "features").glob("*/extractor/*.openvino.zip")
    spec = config.feature_spec("a" * 32)
    assert spec.precision == "int8" and kept.parent.parent.name == spec.folder_name

    graph = zipfile.ZipFile(kept).read("model.xml").decode()
    assert graph.count('type="FakeQuantize"') >= 30, "the kept backbone is the quantized one"

    test_images = training[-40:]
    built = get_extractor(spec, (32, 32, 3))  # the one the choice built, in this process
    quantized = built(test_images, 16)
    float32 = extractors.float32_reference(spec, built, (32, 32, 3))(test_images, 16)
    assert 0.8 < mean_cosine(quantized, float32) < 0.99999, "int8 features are near float32's, and not float32's"
    assert rerun_from_storage(test_images, storage, "int8", tmp_path, pretrained) is False  # read back: no TensorFlow, no NNCF
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), quantized)

    kept.unlink()
    extractors.release_extractors()
    with pytest.raises(FeatureSetError, match="the int8 backbone of MobileNetV2 is not at .*: it is quantized when a run chooses"):
        get_extractor(spec, (32, 32, 3), str(storage))


def test_default_engine_runs_the_flow_close_to_tensorflow_float32(tiny_archive, tmp_path, reference_features):
    automatic, _ = extract_features(tiny_config(tiny_archive, tmp_path / "auto", engine="auto", precision="auto"))
    reference, _ = reference_features()
    assert automatic.spec.engine == "openvino" and reference.spec.engine == "tensorflow"
    assert automatic.fingerprint != reference.fingerprint
    for split in ("train", "test"):
        *_, ours = load_features(str(tmp_path / "auto"), split, automatic.fingerprint)
        *_, theirs = load_features(reference.storage_url, split, reference.fingerprint)
        assert mean_cosine(ours, theirs) >= (BF16_MIN_COSINE if automatic.spec.precision == "bfloat16" else 0.99999)
