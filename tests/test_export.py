"""`export`: a finished run as one model (images in, probabilities out) that gives the run's own test answers in every
format, in a process that has nothing but the exported folder, for images of any size."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_flow import tiny_config

from cifar_transfer.errors import ConfigError, FeatureSetError
from cifar_transfer.export import OPENVINO_CLASSES_KEY, OPENVINO_COMPILE_CONFIG, export_model
from cifar_transfer.flows.cli import add_export_arguments, export_command
from cifar_transfer.flows.pipeline import cifar_transfer
from cifar_transfer.native import load_keras, load_tensorflow
from conftest import MOBILENET_WEIGHTS, cifar_members, write_archive

SAME_CLASS = 0.999  # share of test images that must get the run's class
PROBABILITY_TOLERANCE = 1e-4  # |export's probability of the run's class - the run's confidence|

# What a consumer without this library runs: Keras, the exported folder, nothing else.
FRESH_PROCESS = """
import json, sys
sys.modules["cifar_transfer"] = None  # importing this library would fail: the export must not need it
import keras, numpy as np
folder, images, out = sys.argv[1:]
model = keras.models.load_model(folder + "/model.keras")
classes = json.load(open(folder + "/export.json"))["classes"]
probabilities = model.predict(np.load(images), verbose=0)
np.save(out, probabilities)
print(json.dumps([classes[best] for best in probabilities.argmax(axis=1)]))
"""


@pytest.fixture(scope="module")
def run(prefect_api, tmp_path_factory):
    """One finished run on the tiny archive (the default `auto` head), its test images and the run's test predictions.

    ImageNet weights, not 'none': a seeded random MobileNetV2 gives features of ~1e-13 and one class for every
    image, so agreeing with its run would prove nothing."""
    if not MOBILENET_WEIGHTS.exists():
        pytest.skip("../shared/data weights not present")
    folder = tmp_path_factory.mktemp("export")
    archive = folder / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, cifar_members())
    config = tiny_config((archive, md5), folder / "storage", tsne_sample=0, weights=str(MOBILENET_WEIGHTS))
    summary = cifar_transfer(config)
    images = np.load(folder / "storage" / "datasets" / f"cifar10-{md5}" / "test_images.npy")
    expected = run_answers(summary)
    assert expected["predicted"].nunique() > 3, "the run's answers are too uniform to check an export against"
    return {"config": config, "archive": (archive, md5), "folder": folder, "summary": summary, "images": images, "expected": expected}


@pytest.fixture(scope="module")
def exported(run):
    return export_model(run["config"].storage, str(run["folder"] / "exported"))


def run_answers(summary) -> pd.DataFrame:
    """The run's test predictions, one row per test image in order."""
    return pd.read_parquet(summary.head.files.predictions).query("split == 'test'").sort_values("index")


def agreement(probabilities: np.ndarray, expected: pd.DataFrame) -> tuple[float, float]:
    """(share of images given the run's class, max |probability of the run's class - the run's confidence|)."""
    predicted = expected["predicted"].to_numpy()
    assert probabilities.shape[0] == len(predicted) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    same = float(np.mean(probabilities.argmax(axis=1) == predicted))
    return same, float(np.max(np.abs(probabilities[np.arange(len(predicted)), predicted] - expected["confidence"].to_numpy())))


def assert_agrees(probabilities: np.ndarray, expected: pd.DataFrame, tolerance: float = PROBABILITY_TOLERANCE) -> None:
    same, delta = agreement(probabilities, expected)
    assert same >= SAME_CLASS and delta <= tolerance, f"same class for {same:.2%}, max |delta p| {delta:.2e}"


def test_the_keras_export_gives_the_runs_test_answers(run, exported):
    assert set(exported.files) == {"keras", "savedmodel", "openvino"}
    described = json.load(open(exported.description))
    summary = run["summary"]
    assert described["classes"] == summary.head.metrics.classes == exported.classes
    assert described["fingerprint"] == summary.features.fingerprint and described["head_key"] == os.path.basename(summary.head.files.folder)
    assert described["head_kind"] == summary.head.kind and described["spec"]["backbone"] == "MobileNetV2"
    assert all(os.path.exists(exported.location(fmt)) for fmt in exported.files)
    assert all(size > 1_000_000 for size in exported.sizes.values()), exported.sizes  # the backbone's weights are inside

    model = load_keras().models.load_model(exported.location("keras"))
    assert_agrees(model.predict(run["images"], verbose=0), run["expected"])


def test_a_fresh_process_with_only_the_folder_gives_the_same_answers(run, exported, tmp_path):
    images, out = tmp_path / "images.npy", tmp_path / "probabilities.npy"
    np.save(images, run["images"])
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, exported.destination, str(images), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert_agrees(np.load(out), run["expected"])
    classes = exported.classes
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [classes[best] for best in run["expected"]["predicted"]]


def test_the_savedmodel_serves_probabilities_and_class_names(run, exported):
    tf = load_tensorflow()
    serve = tf.saved_model.load(exported.location("savedmodel")).signatures["serving_default"]
    outputs = serve(images=tf.constant(run["images"]))
    assert_agrees(outputs["probabilities"].numpy(), run["expected"])
    named = [name.decode() for name in outputs["class_name"].numpy()]
    assert named == [exported.classes[best] for best in outputs["class_index"].numpy()]


def test_the_openvino_ir_gives_the_same_classes_and_carries_the_names(run, exported):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(exported.location("openvino"))
    assert json.loads(model.get_rt_info(OPENVINO_CLASSES_KEY).astype(str)) == exported.classes
    config = json.load(open(exported.description))["openvino_compile_config"]
    assert config == {"INFERENCE_PRECISION_HINT": "f32"}  # without it, CPUs with native bf16 compute in bf16
    compiled = core.compile_model(model, "CPU", config)
    assert_agrees(compiled(run["images"])["probabilities"], run["expected"])


def test_the_command_in_a_fresh_process_exports_the_openvino_ir(run, tmp_path):
    """`cifar-transfer export` as a user runs it, after the run and in a process of its own: the run's process had
    converted a backbone already, which readies OpenVINO's converter for Python 3.13; this one converts first."""
    command = "import sys; from cifar_transfer.flows.cli import main; sys.exit(main(sys.argv[1:]))"
    output = tmp_path / "fresh"
    arguments = ["export", "--storage", run["config"].storage, "--output", str(output), "--format", "openvino"]
    finished = subprocess.run([sys.executable, "-c", command, *arguments], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"openvino: {output / 'openvino' / 'model.xml'}" in finished.stdout.splitlines()
    assert "The structure of `inputs`" not in finished.stderr, "Keras's note on the converter's tuple reached the user"
    import openvino as ov

    compiled = ov.Core().compile_model(str(output / "openvino" / "model.xml"), "CPU", OPENVINO_COMPILE_CONFIG)
    assert_agrees(compiled(run["images"])["probabilities"], run["expected"])


def test_any_image_size_and_a_batch_of_one(run, exported):
    import openvino as ov

    tf = load_tensorflow()
    keras_model = load_keras().models.load_model(exported.location("keras"))
    serve = tf.saved_model.load(exported.location("savedmodel")).signatures["serving_default"]
    ir = ov.Core().compile_model(exported.location("openvino"), "CPU", OPENVINO_COMPILE_CONFIG)
    photo = np.random.default_rng(0).integers(0, 256, size=(1, 64, 48, 3), dtype=np.uint8)
    answers = [keras_model.predict(photo, verbose=0), serve(images=tf.constant(photo))["probabilities"].numpy(), ir(photo)["probabilities"]]
    for probabilities in answers:
        assert probabilities.shape == (1, len(exported.classes)) and probabilities.sum() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(answers[1], answers[0], atol=1e-5)
    np.testing.assert_allclose(answers[2], answers[0], atol=1e-4)
    one = keras_model.predict(run["images"][:1], verbose=0)
    np.testing.assert_allclose(one[0], keras_model.predict(run["images"][:8], verbose=0)[0], atol=1e-5)


@pytest.mark.long
def test_spatial_maps_and_mirrored_views_are_exported_as_the_run_used_them(run, tmp_path):
    """A 2x2 map (flattened in the run's order) at 64 px (resized inside the model) and a --flip head (the mirrored
    image's probabilities averaged in): the export still gives the run's test answers."""
    config = tiny_config(
        run["archive"],
        tmp_path / "storage",
        tsne_sample=0,
        weights=str(MOBILENET_WEIGHTS),
        input_size=64,
        pooling="none",
        head="conv",
        flip=True,
    )
    summary = cifar_transfer(config)
    assert summary.features.feature_shape == [2, 2, 1280]
    result = export_model(
        config.storage,
        str(tmp_path / "exported"),
        formats=["keras"],
        fingerprint=summary.features.fingerprint,
        head_key=os.path.basename(summary.head.files.folder),
    )
    assert result.mirrored_average and result.head_kind == "conv" and list(result.files) == ["keras"]
    model = load_keras().models.load_model(result.location("keras"))
    assert_agrees(model.predict(run["images"], verbose=0), run_answers(summary))


def test_the_command_prints_where_each_format_went(run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    fingerprint = run["summary"].features.fingerprint
    arguments = parser.parse_args(
        [
            "--storage",
            run["config"].storage,
            "--fingerprint",
            fingerprint,
            "--output",
            str(tmp_path / "out"),
            "--format",
            "keras",
            "--format",
            "keras",
        ]
    )
    assert export_command(arguments) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"keras: {tmp_path / 'out' / 'model.keras'}", f"classes: 10 names in {tmp_path / 'out' / 'export.json'}"]
    assert parser.parse_args(["--output", "x"]).formats is None  # every available format
    with pytest.raises(SystemExit):
        parser.parse_args(["--format", "keras"])  # --output is required


def test_nothing_to_export_says_what_to_run_in_one_line(tmp_path):
    with pytest.raises(FeatureSetError, match=r"^no finished head under .*: run `cifar-transfer run` first, or check --storage"):
        export_model(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(FeatureSetError, match=r"no finished head for fingerprint 0123 under"):
        export_model(str(tmp_path / "empty"), str(tmp_path / "out"), fingerprint="0123")
    with pytest.raises(ConfigError, match=r"unknown export format 'onnx': use keras, savedmodel, openvino"):
        export_model(str(tmp_path / "empty"), str(tmp_path / "out"), formats=["onnx"])
    assert not (tmp_path / "out").exists()


def test_an_export_never_replaces_files_it_did_not_write(run, tmp_path):
    storage = run["config"].storage
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.keras").write_bytes(b"someone's model")
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"theirs holds other files \(.*\): name a new or empty folder"):
        export_model(storage, str(theirs), formats=["keras"])
    assert (theirs / "model.keras").read_bytes() == b"someone's model" and (theirs / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match=r"is a file: name a new or empty folder"):
        export_model(storage, str(theirs / "notes.txt"), formats=["keras"])
    with pytest.raises(ConfigError, match=r"^cannot write the export to /proc/cifar-transfer-test \(.*\): choose a place"):
        export_model(storage, "/proc/cifar-transfer-test", formats=["keras"])

    ours = tmp_path / "ours"
    first = export_model(storage, str(ours), formats=["keras"])
    again = export_model(storage, str(ours), formats=["keras", "openvino"])  # an earlier export of its own is replaced
    assert first.files == {"keras": "model.keras"} and again.files == {"keras": "model.keras", "openvino": "openvino/model.xml"}
    assert json.loads((ours / "export.json").read_text())["files"] == again.files
    (ours / "extra.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"holds an earlier export and other files \(extra.bin\)"):
        export_model(storage, str(ours), formats=["keras"])
