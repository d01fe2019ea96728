"""What a backbone is, whatever family it comes from: a name, the input sizes and poolings it allows, how its
images are resized, and its family's constructor, preprocessing and weights identity."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cifar_transfer.errors import ConfigError
from cifar_transfer.storage import file_md5

POOLINGS = ("stages", "avg", "none")  # what every family offers; a family may add its own ("cls")


class BackboneFamily(Protocol):
    """One source of pretrained image models (keras.applications, Keras Hub presets), registered in
    `cifar_transfer.backbones.FAMILIES`."""

    prefix: str | None  # its names are "<prefix>:<model>"; None: plain names (one family only: keras.applications)
    naming: str  # how its models are named, for --help: "a keras.applications model name (MobileNetV2, ...)"

    def resolve(self, name: str) -> Backbone | None:
        """The model `name` names (the canonical name fingerprints record, its input sizes), or None if none."""

    def valid_names(self) -> str:
        """What a name of this family may be, for the one line that refuses an unknown one."""

    def weights_id(self, backbone: Backbone, weights: str, seed: int) -> str:
        """What the features record as the weights' identity (`FeatureSpec.weights_id`): by content, so weights
        changed under the same name or path give features of another fingerprint."""

    def build(self, backbone: Backbone, *, weights: str, input_size: int, pooling: str):
        """The Keras model from preprocessed pixels (`input_size` square) to the features `pooling` asks for: "avg"
        (the pooled final features), "stages" (this family's taps, pooled and concatenated) or "none" (the map).
        `weights`: the family's pretrained weights ("imagenet"), "none" (the caller seeds the random init) or a
        weights file."""

    def preprocessing(self, backbone: Backbone) -> Callable:
        """Float pixels (0-255, at the input size) to what `build`'s model takes."""


def weights_identity(weights: str, seed: int) -> str:
    """The weights' identity as keras.applications' features record it: "imagenet", the seed of a random init, or
    the MD5 of a weights file."""
    if weights in ("imagenet", "none"):
        return "imagenet" if weights == "imagenet" else f"random-init-seed{seed}"
    return f"file-md5-{file_md5(weights)}"


def load_weights_file(model, weights: str, described: str, fix: str) -> None:
    """Load the weights file `weights` into `model`, or say in one line that it does not fit `described`, and `fix`."""
    try:
        model.load_weights(weights)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"weights file {weights!r} does not fit {described}: {str(exc).splitlines()[0]}; {fix}") from exc


def keras_name(name: str) -> str:
    """A backbone name as a Keras model or layer may be named ("hub:/presets/dinov2" -> "hub__presets_dinov2")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclass(frozen=True)
class Backbone:
    """A backbone by name: its sizes are known without Keras; its family builds it on use."""

    name: str  # canonical: what `FeatureSpec.backbone` records
    family: BackboneFamily
    min_input_size: int
    default_input_size: int
    max_input_size: int | None = None  # a model with fixed position embeddings takes its native size only
    input_step: int = 1  # input sides must be multiples of this (a vision transformer's patch size)
    poolings: tuple[str, ...] = POOLINGS
    # How images of another size are brought to the input size (keras.layers.Resizing's arguments).
    interpolation: str = "bilinear"
    antialias: bool = False
    crop_to_aspect_ratio: bool = False
    # Whether `engines.choose_engine` must try OpenVINO's conversion before choosing it ('auto'): a family whose models
    # may hold an op OpenVINO lacks says so, and TensorFlow runs those.
    check_conversion: bool = False

    @property
    def resize(self) -> str:
        """How `FeatureSpec.resize` records the resizing: "bilinear" (keras.applications), "bicubic+antialias+crop", ..."""
        return "+".join([self.interpolation, *["antialias"] * self.antialias, *["crop"] * self.crop_to_aspect_ratio])

    @property
    def model_name(self) -> str:
        """The name as a Keras model may be named ("hub:dinov2_small" -> "hub_dinov2_small")."""
        return keras_name(self.name)

    def input_size_problem(self, input_size: int) -> str | None:
        """Why `input_size` does not fit this backbone, with the fix; None when it does."""
        if self.max_input_size == self.min_input_size != input_size:
            return (
                f"input_size {input_size} does not fit {self.name}: it takes {self.min_input_size} px inputs only (fixed position "
                f"embeddings): pass --input-size {self.min_input_size} or leave it out"
            )
        if input_size < self.min_input_size:
            fix = f"pass --input-size {self.min_input_size} or more"
            return f"input_size {input_size} is below {self.name}'s minimum of {self.min_input_size}: {fix}"
        if self.max_input_size is not None and input_size > self.max_input_size:
            fix = f"pass --input-size {self.max_input_size} or less"
            return f"input_size {input_size} is above {self.name}'s maximum of {self.max_input_size}: {fix}"
        if input_size % self.input_step:
            fit = max(self.min_input_size, input_size // self.input_step * self.input_step)
            return f"input_size {input_size} is not a multiple of {self.name}'s patch size {self.input_step}: pass --input-size {fit}"
        return None

    def build(self, *, weights: str, input_size: int, pooling: str):
        return self.family.build(self, weights=weights, input_size=input_size, pooling=pooling)

    @property
    def preprocess_input(self) -> Callable:
        return self.family.preprocessing(self)

    def weights_id(self, weights: str, seed: int) -> str:
        return self.family.weights_id(self, weights, seed)
