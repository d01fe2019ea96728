"""The Keras Hub family: `hub:<preset>`, where the preset is a Keras Hub preset handle (`dinov2_small`,
`kaggle://keras/dinov2/keras/dinov2_small/1`, `hf://<user>/<repo>` in Keras format) or a local preset directory
(what `save_to_preset` writes: `config.json`, `model.weights.h5`, `image_converter.json`).

The preset's own image converter is the preprocessing: its size is the default input size, its interpolation,
antialiasing and centre crop resize the images, its scale and offset (mean and std) normalise them. A model
whose position embeddings interpolate (DINOv2) takes any multiple of its patch size; the others (CLIP, SigLIP,
ViT) only their native size. An image-text preset (CLIP, SigLIP, MetaCLIP 2) gives its vision tower.

Features of a vision transformer (`TOWERS` knows where each architecture keeps its tokens): "avg" the mean patch
token of the final normalised sequence, "cls" its class token (SigLIP has none: its attention-pooled embedding),
"stages" the class token and mean patch token of `stage_blocks` (the middle, three quarters and last of the
depth, each through the final norm), "none" the patch tokens as their grid (height, width, width of a token).
A convolutional preset (ResNet, EfficientNet, ...) pools as keras.applications' models do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_transfer import layout
from cifar_transfer.backbones.base import Backbone, load_weights_file, weights_identity
from cifar_transfer.backbones.stages import pooled_stages
from cifar_transfer.errors import ConfigError
from cifar_transfer.native import load_keras

PREFIX = "hub"
CONFIG_FILE, CONVERTER_FILE, WEIGHTS_FILE = "config.json", "image_converter.json", "model.weights.h5"
PRESET_FILES = (CONFIG_FILE, CONVERTER_FILE, WEIGHTS_FILE)


def offline_fix(handle: str) -> str:
    """How to bring a preset to a machine without network: the two commands (the README shows them too)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", layout.last_named_part(handle)) or "preset"
    return (
        f"on a connected machine run `python -c \"import keras_hub as h; p='{handle}'; "
        f"h.models.Backbone.from_preset(p).save_to_preset('{name}'); h.layers.ImageConverter.from_preset(p).save_to_preset('{name}')\"`, "
        f"copy the folder here (`rsync -a {name}/ THIS_HOST:presets/{name}/`) and pass --backbone hub:presets/{name}"
    )


@dataclass(frozen=True)
class Preset:
    """A preset's files, read: where it is (a handle, or an absolute directory), its configuration, its image
    converter's, and the local path of its weights."""

    location: str
    config: dict
    converter: dict
    weights_path: str

    @property
    def vision_config(self) -> dict:
        """The image model's own entry: an image-text model's `vision_encoder`, else the model."""
        inner = self.config["config"].get("vision_encoder")
        return inner if isinstance(inner, dict) and "class_name" in inner else self.config

    @property
    def architecture(self) -> str:
        return self.vision_config["class_name"]

    @property
    def native_size(self) -> int:
        size = self.converter.get("image_size") or self.vision_config["config"].get("image_shape", [None])[:1]
        return int(size[0]) if size and size[0] else 224

    @property
    def patch_size(self) -> int:
        patch = self.vision_config["config"].get("patch_size", 1)
        return int(patch[0] if isinstance(patch, (list, tuple)) else patch)

    def digest(self, with_weights: bool) -> str:
        """The preset by content: its configuration and its converter's, and (`with_weights`) its weights' SHA-256."""
        payload: dict[str, object] = {"config": self.config, "converter": self.converter}
        if with_weights:
            payload["weights_sha256"] = _file_sha256(self.weights_path, *_stat(self.weights_path))
        return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _stat(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and modification time too: a file replaced in place is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def read_preset(location: str) -> Preset:
    """The preset at `location` (a local directory, else a Keras Hub handle fetched into its cache), or one line
    that says why it cannot be read and what to do."""
    if os.path.isdir(location):
        folder = Path(location)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
        if missing:
            raise ConfigError(
                f"Keras Hub preset directory {location!r} has no {missing[0]}: pass a folder written by save_to_preset "
                f"({', '.join(PRESET_FILES)})"
            )
        paths = {name: str(folder / name) for name in PRESET_FILES}
    else:
        paths = _fetched(location)
    config = json.loads(Path(paths[CONFIG_FILE]).read_text())
    if not isinstance(config, dict) or "class_name" not in config or "config" not in config:
        raise ConfigError(f"Keras Hub preset {location!r} is not in Keras format (its {CONFIG_FILE} names no class): convert it first")
    converter = json.loads(Path(paths[CONVERTER_FILE]).read_text())["config"] if os.path.isfile(paths[CONVERTER_FILE]) else {}
    return Preset(location, config, converter, paths[WEIGHTS_FILE])


def keras_hub():
    """The `keras_hub` module, or one line saying how to install it (it is the optional extra `hub`)."""
    try:
        import keras_hub
    except ImportError:
        raise ConfigError("hub:<preset> backbones need Keras Hub: pip install 'cifar-transfer[hub]' (or keras-hub)") from None
    return keras_hub


def _fetched(handle: str) -> dict[str, str]:
    """The local copies of a handle's files (Keras Hub's cache, filled from the network on first use)."""
    keras_hub()
    from keras_hub.src.utils.preset_utils import check_file_exists, get_file

    try:
        paths = {name: get_file(handle, name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
        paths[CONVERTER_FILE] = get_file(handle, CONVERTER_FILE) if check_file_exists(handle, CONVERTER_FILE) else ""
    except Exception as exc:  # noqa: BLE001  # kagglehub, huggingface_hub and requests each raise their own kinds
        text = " ".join(str(exc).split())
        reason = f"{type(exc).__name__}: {text[:100].rsplit(' ', 1)[0]} ..." if len(text) > 100 else f"{type(exc).__name__}: {text}"
        raise ConfigError(f"Keras Hub preset {handle!r} cannot be fetched ({reason}): {offline_fix(handle)}") from None
    return paths


@dataclass(frozen=True)
class Tower:
    """A vision transformer's token sequences, as tensors of one functional graph from its image input: the
    final normalised sequence, every block's output through the same norm, how many tokens come before the patch
    tokens (class, registers) and a summary vector where the model has one besides a class token."""

    image_input: Any
    final: Any
    blocks: list
    prefix_tokens: int
    summary: Any = None

    @property
    def has_class_token(self) -> bool:
        return self.prefix_tokens > 0


def _without_derived_config(layer, derived: tuple[str, ...]) -> None:
    """Leave out of `layer`'s saved config the values its constructor computes and refuses: Keras Hub 0.32's
    `ViTPatchingAndEmbedding` lists `num_patches` and `num_positions`, `ViTEncoderBlock` `key_dim`, so a model that
    holds these layers itself (not inside `ViTBackbone`, which saves its own arguments) would not load again; an
    exported `model.keras` does (DINOv2's, CLIP's and SigLIP's layers load as saved)."""
    config_of = layer.get_config
    layer.get_config = lambda: {key: value for key, value in config_of().items() if key not in derived}


def _dinov2(model) -> Tower:
    blocks = [model.layernorm(model.pyramid_outputs[f"stage{index}"]) for index in range(1, model.num_layers + 1)]
    return Tower(model.inputs[0], model.output, blocks, 1 + model.num_register_tokens)


def _clip(model) -> Tower:
    blocks = [model.layer_norm(block.output) for block in model.encoder_layers]
    return Tower(model.inputs[0], model.output, blocks, 1)


def _siglip(model) -> Tower:
    blocks = [model.post_layer_norm(block.output) for block in model.encoder_layers[:-1]]
    final = model.post_layer_norm.output
    return Tower(model.inputs[0], final, [*blocks, final], 0, summary=model.output)


def _vit(model) -> Tower:
    _without_derived_config(model.get_layer("vit_patching_and_embedding"), ("num_patches", "num_positions"))
    encoder = model.get_layer("vit_encoder")
    for block in encoder.encoder_layers:
        _without_derived_config(block, ("key_dim",))
    tokens = encoder.input  # the patch embeddings (and class token): the encoder's blocks are called again from here
    blocks = []
    for block in encoder.encoder_layers:
        tokens = block(tokens)
        blocks.append(encoder.layer_norm(tokens))
    return Tower(model.inputs[0], blocks[-1], blocks, int(bool(model.use_class_token)))


# Where each vision transformer keeps its tokens; any other preset with a 4-D output is read as a CNN.
TOWERS: dict[str, Callable] = {
    "DINOV2Backbone": _dinov2,
    "CLIPVisionEncoder": _clip,
    "MetaCLIP2VisionEncoder": _clip,
    "SigLIPVisionEncoder": _siglip,
    "ViTBackbone": _vit,
}
# Architectures whose position embeddings interpolate to any multiple of the patch size.
RESIZABLE = {"DINOV2Backbone"}
TRANSFORMER_POOLINGS = ("stages", "avg", "cls", "none")
CNN_POOLINGS = ("stages", "avg", "none")


def stage_blocks(depth: int) -> list[int]:
    """The blocks (0-based) pooling "stages" reads: the middle, three quarters and last of the depth (12 blocks:
    6, 9 and 12 counted from one)."""
    return sorted({max(0, math.ceil(depth * share) - 1) for share in (1 / 2, 3 / 4, 1)})


def pooled_tokens(tower: Tower, pooling: str):
    """The features `pooling` asks for, from `tower`'s sequences (see the module's description)."""
    keras = load_keras()
    ops = keras.ops

    def patch_mean(sequence):
        return ops.mean(sequence[:, tower.prefix_tokens :, :], axis=1)

    if pooling == "avg":
        return patch_mean(tower.final)
    if pooling == "cls":
        return tower.final[:, 0, :] if tower.has_class_token else tower.summary
    if pooling == "none":
        patches = tower.final[:, tower.prefix_tokens :, :]
        side = math.isqrt(patches.shape[1])
        return ops.reshape(patches, (-1, side, side, patches.shape[2]))
    parts = []
    for index in stage_blocks(len(tower.blocks)):
        sequence = tower.blocks[index]
        parts += [sequence[:, 0, :]] * tower.has_class_token + [patch_mean(sequence)]
    if tower.summary is not None:
        parts.append(tower.summary)
    return ops.concatenate(parts, axis=-1)


class KerasHub:
    prefix: str | None = PREFIX
    naming: str = (
        "hub:<preset>, a Keras Hub preset handle (hub:dinov2_small, hub:kaggle://keras/siglip/keras/siglip_base_patch16_224) "
        "or a local preset directory (hub:presets/dinov2_small)"
    )

    def resolve(self, name: str) -> Backbone | None:
        location = name.partition(":")[2]
        if not location:
            return None
        if os.path.isdir(location):
            location = str(Path(location).resolve())
        preset = read_preset(location)
        transformer = preset.architecture in TOWERS
        native, patch = preset.native_size, preset.patch_size
        fixed = transformer and preset.architecture not in RESIZABLE
        return Backbone(
            f"{PREFIX}:{location}",
            self,
            min_input_size=native if fixed else patch if transformer else 32,
            default_input_size=native,
            max_input_size=native if fixed else None,
            input_step=patch if transformer else 1,
            poolings=TRANSFORMER_POOLINGS if transformer else CNN_POOLINGS,
            interpolation=preset.converter.get("interpolation", "bilinear"),
            antialias=bool(preset.converter.get("antialias", False)),
            crop_to_aspect_ratio=bool(preset.converter.get("crop_to_aspect_ratio", False)),
            check_conversion=True,  # bicubic or antialiased resizing (CLIP's, DINOv2's) is beyond OpenVINO's converter
        )

    def valid_names(self) -> str:
        return "hub:<preset> (a Keras Hub preset handle or a local preset directory)"

    def weights_id(self, backbone: Backbone, weights: str, seed: int) -> str:
        """The preset by content: its configuration and converter, and its weights' digest when they are used."""
        preset = read_preset(backbone.name.partition(":")[2])
        if weights == "imagenet":
            return f"preset-{preset.digest(with_weights=True)}"
        return f"{weights_identity(weights, seed)}-config-{preset.digest(with_weights=False)}"

    def build(self, backbone: Backbone, *, weights: str, input_size: int, pooling: str):
        keras = load_keras()
        preset = read_preset(backbone.name.partition(":")[2])
        overrides = {"image_shape": (input_size, input_size, 3)} if input_size != preset.native_size else {}
        loaded = keras_hub().models.Backbone.from_preset(preset.location, load_weights=weights == "imagenet", **overrides)
        model = loaded.vision_encoder if hasattr(loaded, "vision_encoder") else loaded
        if weights not in ("imagenet", "none"):
            load_weights_file(
                model, weights, f"{preset.architecture} of {preset.location}", "pass the weights of this preset's image model"
            )
        if preset.architecture in TOWERS:
            tower = TOWERS[preset.architecture](model)
            return keras.Model(tower.image_input, pooled_tokens(tower, pooling), name=model.name)
        if pooling == "stages":
            return pooled_stages(model)
        if pooling == "avg":
            return keras.Model(model.inputs[0], keras.layers.GlobalAveragePooling2D()(model.output), name=model.name)
        return model

    def preprocessing(self, backbone: Backbone) -> Callable:
        """The converter's scale and offset (resizing is `Backbone`'s interpolation, antialias and crop)."""
        keras = load_keras()
        converter = read_preset(backbone.name.partition(":")[2]).converter
        scale, offset = converter.get("scale"), converter.get("offset")
        return keras.layers.Rescaling(1.0 if scale is None else scale, 0.0 if offset is None else offset, name="preset_normalization")


FAMILY = KerasHub()
