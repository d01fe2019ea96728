"""Keras Hub backbones (`--backbone hub:<preset>`) on real, tiny presets: DINOv2, CLIP, SigLIP and ViT configurations
with seeded weights, written by `save_to_preset` into a folder once per session. Nothing is downloaded: the handle
tests point Kaggle's client at a closed local port."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_flow import tiny_config

from cifar_transfer import extractors
from cifar_transfer.backbones import build_extractor, get_backbone
from cifar_transfer.backbones.hub import keras_hub, stage_blocks
from cifar_transfer.backbones.seeded_presets import Sizes, write_seeded_preset
from cifar_transfer.config import load_config
from cifar_transfer.engines import BF16_MIN_COSINE, choose_engine, mean_cosine
from cifar_transfer.errors import ConfigError
from cifar_transfer.export import export_model
from cifar_transfer.flows.pipeline import cifar_transfer
from cifar_transfer.predict import Predictor
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
    choice = choose_engine(clip, storage, "a" * 32, lambda count: IMAGES)
    assert choice.engine == "tensorflow" and "OpenVINO cannot convert" in choice.reason and "ResizeBicubic" in choice.reason
    assert "ResizeBicubic" in caplog.text and "TensorFlow runs it" in caplog.text
    extractors.release_extractors()
    assert choose_engine(clip, storage, "a" * 32, lambda count: pytest.fail("a remembered verdict read images")) == choice
    assert extractors.built_extractors() == []

    vit = load_config(backbone=f"hub:{presets['vit']}", **common).extraction_settings
    assert choose_engine(vit, storage, "a" * 32, lambda count: IMAGES).engine == "openvino"
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


FRESH_PROCESS = """
import json, sys
sys.modules["cifar_transfer"] = None  # the export must not need this library
import keras, numpy as np, openvino as ov, tensorflow as tf
folder, images, out = sys.argv[1:]
pixels = np.load(images)
config = json.load(open(folder + "/export.json"))["openvino_compile_config"]
np.savez(
    out,
    keras=keras.models.load_model(folder + "/model.keras").predict(pixels, verbose=0),
    savedmodel=tf.saved_model.load(folder + "/savedmodel/1").signatures["serving_default"](images=tf.constant(pixels))["probabilities"],
    openvino=ov.Core().compile_model(folder + "/openvino/model.xml", "CPU", config)(pixels)[0],
)
"""


@pytest.mark.slow
def test_a_vit_preset_end_to_end(prefect_api, presets, tmp_path):
    """A run on a preset folder with no network (extract in shards, t-SNE, head, report), a rerun that reuses everything, predict with
    the run's answers, and an export in every format that a fresh process without this library loads and agrees with."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, cifar_members())
    options = {"backbone": f"hub:{presets['vit']}", "weights": "imagenet", "input_size": None}
    config = tiny_config((archive, md5), tmp_path / "storage", **options, engine="auto", precision="auto")
    first = cifar_transfer(config)
    assert first.features.spec.engine == "openvino" and first.features.feature_shape == [2 * len(stage_blocks(TINY.depth)) * TINY.width]
    assert first.features.folder.rsplit("/", 1)[1].startswith("hub-vit-24px-stages-")
    extractors.release_extractors()
    second = cifar_transfer(config)
    assert second.features.fingerprint == first.features.fingerprint and second.extraction.shards_computed == 0
    assert extractors.built_extractors() == []

    expected = pd.read_parquet(first.head.files.predictions).query("split == 'test'").sort_values("index")
    assert expected["predicted"].nunique() > 3, "the run's answers are too uniform to check against"
    images = np.load(tmp_path / "storage" / "datasets" / f"cifar10-{md5}" / "test_images.npy")
    predictor = Predictor(find_head(config.storage))
    probabilities = predictor.model(predictor.extractor(images, 32), 32)
    assert np.array_equal(probabilities.argmax(axis=1), expected["predicted"].to_numpy())

    exported = export_model(config.storage, str(tmp_path / "exported"))
    assert set(exported.files) == {"keras", "savedmodel", "openvino"} and exported.spec["backbone"] == f"hub:{presets['vit']}"
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, exported.destination, str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answers = np.load(tmp_path / "out.npz")
    for fmt in ("keras", "savedmodel", "openvino"):
        found = np.asarray(answers[fmt])
        assert np.mean(found.argmax(axis=1) == expected["predicted"].to_numpy()) >= 0.99, fmt
        picked = found[np.arange(len(found)), expected["predicted"].to_numpy()]
        assert np.max(np.abs(picked - expected["confidence"].to_numpy())) < 1e-3, fmt


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
