"""Keras Hub backbones (`--backbone hub:<preset>`) on real, tiny presets: DINOv2, CLIP, SigLIP and ViT configurations
with seeded weights, written by `save_to_preset` into a folder once per session. Nothing is downloaded: the handle
tests point Kaggle's client at a closed local port."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_flow import tiny_config

from cifar_transfer import extractors
from cifar_transfer.audit.similar import similar
from cifar_transfer.backbones import build_extractor, get_backbone
from cifar_transfer.backbones.hub import keras_hub, stage_blocks
from cifar_transfer.backbones.seeded_presets import Sizes, write_seeded_preset
from cifar_transfer.config import PipelineConfig, load_config
from cifar_transfer.engines import BF16_MIN_COSINE, choose_engine, mean_cosine
from cifar_transfer.errors import ConfigError
from cifar_transfer.export import ExportResult, export_model
from cifar_transfer.flows.pipeline import audit_features, cifar_transfer
from cifar_transfer.predict import Predictor
from cifar_transfer.report import RunSummary
from cifar_transfer.trained import find_head
from conftest import CLI, cifar_members, write_archive

TINY = Sizes(image_size=24, patch_size=8, width=16, depth=3, heads=2)  # 3x3 patches, CIFAR's 32 px resized to 24
FAMILIES = ("dinov2", "clip", "siglip", "vit")
IMAGES = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
# No network for Keras Hub's clients: Kaggle's API at a closed local port, Hugging Face offline.
OFFLINE = {"KAGGLE_API_ENVIRONMENT": "TEST", "HF_HUB_OFFLINE": "1"}
HANDLE = "kaggle://keras/dinov2/keras/dinov2_small/1"


@pytest.fixture(scope="session")
def presets(tmp_path_factory) -> dict[str, str]:
    """Each family's tiny preset folder, seeded weights."""
    root = tmp_path_factory.mktemp("hub-presets")
    return {family: write_seeded_preset(str(root / family), family, TINY, seed=index) for index, family in enumerate(FAMILIES)}


def features(preset: str, pooling: str, **options) -> np.ndarray:
    options = {"weights": "imagenet", "input_size": 24, "precision": "float32", "seed": 0, **options}
    return build_extractor(f"hub:{preset}", pooling=pooling, **options).predict(IMAGES, verbose=0)


def test_a_preset_folder_gives_its_sizes_resizing_and_poolings(presets):
    dinov2, clip = get_backbone(f"hub:{presets['dinov2']}"), get_backbone(f"hub:{presets['clip']}")
    assert (dinov2.default_input_size, dinov2.min_input_size, dinov2.max_input_size, dinov2.input_step) == (24, 8, None, 8)
    assert (clip.default_input_size, clip.min_input_size, clip.max_input_size) == (24, 24, 24)
    assert (dinov2.resize, clip.resize, get_backbone(f"hub:{presets['vit']}").resize) == (
        "bicubic+antialias+crop",
        "bicubic+crop",
        "bilinear+crop",
    )
    assert "cls" in dinov2.poolings and "cls" not in get_backbone("MobileNetV2").poolings
    options = {"source": "/data/c.tar.gz", "md5": "none"}
    with pytest.raises(ConfigError, match=r"input_size 30 is not a multiple of .*'s patch size 8: pass --input-size 24$"):
        load_config(backbone=f"hub:{presets['dinov2']}", input_size=30, **options)
    with pytest.raises(ConfigError, match=r"it takes 24 px inputs only \(fixed position embeddings\): pass --input-size 24"):
        load_config(backbone=f"hub:{presets['clip']}", input_size=32, **options)
    with pytest.raises(ConfigError, match=r"pooling 'cls' does not fit MobileNetV2: use stages, avg, none"):
        load_config(backbone="MobileNetV2", pooling="cls", **options)
    spec = load_config(backbone=f"hub:{presets['dinov2']}", **options).feature_spec("a" * 32, "tensorflow", "float32")
    assert spec.backbone == f"hub:{presets['dinov2']}" and spec.input_size == 24 and spec.resize == "bicubic+antialias+crop"
    assert spec.folder_name == f"hub-dinov2-24px-stages-{spec.fingerprint}"


@pytest.mark.slow
def test_the_fingerprint_follows_the_presets_content(presets, tmp_path):
    options = {"source": "/data/c.tar.gz", "md5": "none"}

    def spec(folder, **more):
        return load_config(backbone=f"hub:{folder}", **options, **more).feature_spec("a" * 32, "tensorflow", "float32")

    folder = shutil.copytree(presets["vit"], tmp_path / "vit")
    first = spec(folder)
    assert first.weights_id.startswith("preset-") and first.weights_id == spec(presets["vit"]).weights_id  # same content
    write_seeded_preset(str(folder), "vit", TINY, seed=99)  # other weights under the same folder: other features
    again = spec(folder)
    assert again.weights_id != first.weights_id and again.fingerprint != first.fingerprint
    random = spec(folder, weights="none")
    assert random.weights_id.startswith("random-init-seed0-config-")
    assert random.weights_id == spec(presets["vit"], weights="none").weights_id  # the architecture, not the weights


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gives_keras_hubs_own_tokens_pooled(presets, family):
    """Our extractor (uint8 in, the converter's resizing and normalisation, the pooling) against Keras Hub's own
    `ImageConverter.from_preset` and `Backbone.from_preset` on the same images."""
    hub = keras_hub()
    preset = presets[family]
    pixels = hub.layers.ImageConverter.from_preset(preset)(IMAGES.astype("float32"))
    loaded = hub.models.Backbone.from_preset(preset)
    vision = loaded.vision_encoder if hasattr(loaded, "vision_encoder") else loaded
    output = np.asarray(vision(pixels))
    found = {pooling: features(preset, pooling) for pooling in ("avg", "cls", "stages", "none")}
    blocks = len(stage_blocks(TINY.depth))
    if family == "siglip":  # no class token: 'cls' is the attention-pooled embedding, the model's output
        np.testing.assert_allclose(found["cls"], output, rtol=1e-4, atol=1e-4)
        assert found["stages"].shape == (6, (blocks + 1) * TINY.width)
    else:
        np.testing.assert_allclose(found["cls"], output[:, 0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(found["avg"], output[:, 1:].mean(axis=1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(found["stages"][:, -2 * TINY.width :], np.hstack([found["cls"], found["avg"]]), rtol=1e-5, atol=1e-5)
        assert found["stages"].shape == (6, 2 * blocks * TINY.width)
    assert found["none"].shape == (6, 3, 3, TINY.width) and found["avg"].shape == (6, TINY.width)
    np.testing.assert_allclose(found["none"].mean(axis=(1, 2)), found["avg"], rtol=1e-4, atol=1e-4)
    assert found["avg"].std() > 0.1  # real activations
    seeded = features(preset, "avg", weights="none", seed=7)  # the presets were written with seeds 0 to 3
    assert not np.allclose(seeded, found["avg"]) and np.array_equal(seeded, features(preset, "avg", weights="none", seed=7))


@pytest.mark.slow
def test_dinov2_takes_other_multiples_of_its_patch(presets):
    assert features(presets["dinov2"], "none", input_size=32).shape == (6, 4, 4, TINY.width)


@pytest.mark.slow
def test_openvino_runs_what_it_converts_and_tensorflow_the_rest_said_and_remembered(presets, tmp_path, caplog):
    """CIFAR's 32 px images resized bicubically (CLIP) are beyond OpenVINO's converter: TensorFlow runs them and the
    run says why; ViT's bilinear resizing converts, with OpenVINO's features those of TensorFlow."""
    storage = str(tmp_path / "storage")
    common = {"source": "/data/c.tar.gz", "md5": "none", "storage": storage, "precision": "float32"}
    clip = load_config(backbone=f"hub:{presets['clip']}", **common).extraction_settings
    choice = choose_engine(clip, storage, "a" * 32, lambda count: (IMAGES, np.zeros(len(IMAGES), np.int64)))
    assert choice.engine == "tensorflow" and "OpenVINO cannot convert" in choice.reason and "ResizeBicubic" in choice.reason
    assert "ResizeBicubic" in caplog.text and "TensorFlow runs it" in caplog.text
    extractors.release_extractors()
    assert choose_engine(clip, storage, "a" * 32, lambda count: pytest.fail("a remembered verdict read images")) == choice
    assert extractors.built_extractors() == []

    vit = load_config(backbone=f"hub:{presets['vit']}", **common).extraction_settings
    assert choose_engine(vit, storage, "a" * 32, lambda count: (IMAGES, np.zeros(len(IMAGES), np.int64))).engine == "openvino"
    on_openvino = extractors.get_extractor(vit.feature_spec("a" * 32, "openvino", "float32"), IMAGES.shape[1:])(IMAGES, 4)
    on_tensorflow = extractors.get_extractor(vit.feature_spec("a" * 32, "tensorflow", "float32"), IMAGES.shape[1:])(IMAGES, 4)
    assert mean_cosine(on_openvino, on_tensorflow) >= BF16_MIN_COSINE


def test_a_handle_without_network_fails_with_one_line_naming_it_and_the_copy(monkeypatch, tmp_path):
    for name, value in {**OFFLINE, "KAGGLEHUB_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_config(backbone=f"hub:{HANDLE}", source="/data/c.tar.gz", md5="none")
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"invalid configuration: Keras Hub preset '{HANDLE}' cannot be fetched")
    assert "save_to_preset('dinov2_small')" in message and message.endswith("pass --backbone hub:presets/dinov2_small")


# The families' whole runs, each on the engine its test needs: ViT on OpenVINO (`auto` converts it, the run keeps the
# converted model, predict reads it back and the export converts the classifier again), the others on TensorFlow
# (DINOv2's and CLIP's bicubic resizing of CIFAR's 32 px images is beyond OpenVINO's converter; SigLIP's converts as
# ViT's does, so one conversion stands for both). Exports in every format the engine allows.
END_TO_END = {
    "dinov2": {"engine": "tensorflow", "formats": ("keras", "savedmodel")},
    "clip": {"engine": "tensorflow", "formats": ("keras", "savedmodel")},
    "siglip": {"engine": "tensorflow", "formats": ("keras", "savedmodel")},
    "vit": {"engine": "auto", "formats": ("keras", "savedmodel", "openvino")},
}

# Every family's exports loaded in one process without this library: {family: {format: probabilities}}.
FRESH_PROCESS = """
import json, sys
sys.modules["cifar_transfer"] = None  # the export must not need this library
import keras, numpy as np, openvino as ov, tensorflow as tf
folders, images, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
pixels = np.load(images)
found = {}
for family, folder in folders.items():
    files = json.load(open(folder + "/export.json"))
    if "keras" in files["files"]:
        found[family + "/keras"] = np.asarray(keras.models.load_model(folder + "/model.keras")(pixels))  # no predict loop to trace
    if "savedmodel" in files["files"]:
        serve = tf.saved_model.load(folder + "/savedmodel/1").signatures["serving_default"]
        found[family + "/savedmodel"] = serve(images=tf.constant(pixels))["probabilities"].numpy()
    if "openvino" in files["files"]:
        compiled = ov.Core().compile_model(folder + "/openvino/model.xml", "CPU", files["openvino_compile_config"])
        found[family + "/openvino"] = compiled(pixels)[0]
np.savez(out, **found)
"""


@dataclass
class EndToEnd:
    """One family's whole run, its rerun, predict and export, as the test reads them."""

    config: PipelineConfig
    first: RunSummary
    second: RunSummary
    built_by_rerun: list
    expected: pd.DataFrame  # the run's own answers on the test split, in image order
    predicted: np.ndarray  # predict's probabilities on the same images
    exported: ExportResult
    fresh: dict[str, np.ndarray] = field(default_factory=dict)  # each format's probabilities in a fresh process


@pytest.fixture(scope="module")
def end_to_end(prefect_api, presets, tmp_path_factory) -> dict[str, EndToEnd]:
    """Each family run on one small archive with no network (extract in shards, head, report; t-SNE reads only
    stored features and has its own tests), rerun, predicted and exported; then one fresh process loads every export."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    root = tmp_path_factory.mktemp("hub-end-to-end")
    archive = root / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, cifar_members(train_per_batch=20, test_count=50))  # 100 train, 50 test: 3 shards of 50
    runs, images = {}, None
    for family, how in END_TO_END.items():
        options = {"backbone": f"hub:{presets[family]}", "weights": "imagenet", "input_size": None, "tsne_sample": 0, "head": "ridge"}
        # float32 whatever the CPU: an export runs its backbone in float32, and its answers are checked against the
        # run's to 1e-3 (the reduced precisions `auto` picks on some CPUs are tested in test_engines)
        config = tiny_config((archive, md5), root / family, **options, engine=how["engine"], precision="float32")
        first = cifar_transfer(config)
        extractors.release_extractors()
        second = cifar_transfer(config)
        built_by_rerun = extractors.built_extractors()
        expected = pd.read_parquet(first.head.files.predictions).query("split == 'test'").sort_values("index")
        if images is None:
            images = np.load(root / family / "datasets" / f"cifar10-{md5}" / "test_images.npy")
        predictor = Predictor(find_head(config.storage), config.storage)
        predicted = predictor.model(predictor.extractor(images, len(images)), len(images))  # one batch: one trace
        exported = export_model(config.storage, str(root / "exported" / family), formats=how["formats"])
        extractors.release_extractors()
        runs[family] = EndToEnd(config, first, second, built_by_rerun, expected, predicted, exported)
    np.save(root / "images.npy", images)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            json.dumps({family: run.exported.destination for family, run in runs.items()}),
            str(root / "images.npy"),
            str(root / "out.npz"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(root / "out.npz") as answers:
        for key in answers.files:
            family, fmt = key.split("/")
            runs[family].fresh[fmt] = answers[key]
    return runs


@pytest.mark.long
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_end_to_end(end_to_end, presets, family):
    """A run on a preset folder with no network, a rerun that reuses everything, predict with the run's answers,
    and an export in every format the engine allows that a fresh process without this library loads and agrees with."""
    run, how = end_to_end[family], END_TO_END[family]
    blocks = len(stage_blocks(TINY.depth))
    width = (blocks + 1 if family == "siglip" else 2 * blocks) * TINY.width  # SigLIP: one embedding, no class token
    assert run.first.features.spec.engine == ("openvino" if how["engine"] == "auto" else "tensorflow")
    assert run.first.features.feature_shape == [width] and run.first.extraction.shards_computed == 3
    assert run.first.features.folder.rsplit("/", 1)[1].startswith(f"hub-{family}-24px-stages-")
    assert run.second.features.fingerprint == run.first.features.fingerprint and run.second.extraction.shards_computed == 0
    assert run.built_by_rerun == [] and run.second.head.files == run.first.head.files

    answers = run.expected["predicted"].to_numpy()
    assert run.expected["predicted"].nunique() > 3, "the run's answers are too uniform to check against"
    assert np.array_equal(run.predicted.argmax(axis=1), answers)
    confidence = run.expected["confidence"].to_numpy()
    assert np.max(np.abs(run.predicted[np.arange(len(answers)), answers] - confidence)) < 1e-4

    assert set(run.exported.files) == set(how["formats"]) == set(run.fresh) and run.exported.spec["backbone"] == f"hub:{presets[family]}"
    for fmt, found in run.fresh.items():
        assert found.shape == run.predicted.shape, fmt
        assert np.mean(found.argmax(axis=1) == answers) >= 0.99, fmt
        assert np.max(np.abs(found[np.arange(len(found)), answers] - confidence)) < 1e-3, fmt


@pytest.mark.slow
def test_the_audit_and_similar_images_work_on_a_hub_backbones_features(end_to_end, tmp_path):
    """The audit of a hub family's run (DINOv2's: TensorFlow, bicubic resizing), and an image file found again among
    the set's images through the preset's own extractor."""
    run = end_to_end["dinov2"]
    config = run.config.model_copy(update={"storage": str(tmp_path / "storage")})
    shutil.copytree(run.config.storage, config.storage)  # the audit writes beside the features
    audited = audit_features(config)
    assert len(pd.read_parquet(audited.files.label_issues)) == 150 and len(pd.read_parquet(audited.files.outliers)) == 150
    images = np.load(next((tmp_path / "storage" / "datasets").glob("cifar10-*/train_images.npy")))
    picture = tmp_path / "query.png"
    Image.fromarray(images[11]).save(picture)  # lossless, at the archive's 32 px
    first = similar(config.storage, str(picture), k=3)[0]
    assert (first.split, first.index, first.rank) == ("train", 11, 1) and first.similarity > 0.999


@pytest.mark.slow
def test_export_leaves_openvino_out_of_a_model_it_cannot_convert_and_says_so(end_to_end, tmp_path, caplog):
    """CLIP's bicubic resizing has no OpenVINO conversion: the default formats leave openvino out with a warning, and
    asked for by name it fails in one line naming the formats that work."""
    storage = end_to_end["clip"].config.storage
    refused = r"^OpenVINO cannot convert this model \(.*ResizeBicubic.*\): export --format keras --format savedmodel$"
    with pytest.raises(ConfigError, match=refused):
        export_model(storage, str(tmp_path / "openvino-only"), formats=("openvino",))
    exported = export_model(storage, str(tmp_path / "default"))
    assert set(exported.files) == {"keras", "savedmodel"}
    assert "OpenVINO cannot convert this model" in caplog.text and "the openvino format is left out" in caplog.text


@pytest.mark.slow
def test_the_command_line_names_an_unreachable_handle_in_its_last_line(tmp_path):
    done = subprocess.run(
        [*CLI, "run", "--backbone", f"hub:{HANDLE}", "--storage", str(tmp_path / "storage")],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE, "KAGGLEHUB_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith(f"cifar-transfer: error: invalid configuration: Keras Hub preset '{HANDLE}'")
    assert "--backbone hub:presets/dinov2_small" in last and json.dumps(HANDLE)[1:-1] in last
