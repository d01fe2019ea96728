"""What a backbone is, whatever family it comes from: a name, the input sizes it allows, and its family's
constructor and preprocessing."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class BackboneFamily(Protocol):
    """One source of pretrained image models (keras.applications; Keras Hub presets next), registered in
    `cifar_transfer.backbones.FAMILIES`."""

    prefix: str | None  # its names are "<prefix>:<model>"; None: plain names (one family only: keras.applications)
    naming: str  # how its models are named, for --help: "a keras.applications model name (MobileNetV2, ...)"

    def resolve(self, name: str) -> Backbone | None:
        """The model `name` names (the canonical name fingerprints record, its input sizes), or None if none."""

    def valid_names(self) -> str:
        """What a name of this family may be, for the one line that refuses an unknown one."""

    def build(self, backbone: Backbone, *, weights: str, input_size: int, pooling: str):
        """The Keras model from preprocessed pixels (`input_size` square) to the features `pooling` asks for: "avg"
        (the pooled final features), "stages" (this family's taps, pooled and concatenated) or "none" (the map).
        `weights`: the family's pretrained weights ("imagenet"), "none" (the caller seeds the random init) or a
        weights file."""

    def preprocessing(self, backbone: Backbone) -> Callable:
        """Float pixels (0-255, at the input size) to what `build`'s model takes."""


@dataclass(frozen=True)
class Backbone:
    """A backbone by name: its sizes are known without Keras; its family builds it on use."""

    name: str  # canonical: what `FeatureSpec.backbone` records
    family: BackboneFamily
    min_input_size: int
    default_input_size: int

    @property
    def model_name(self) -> str:
        """The name as a Keras model may be named ("hub:dinov2_small" -> "hub_dinov2_small")."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)

    def build(self, *, weights: str, input_size: int, pooling: str):
        return self.family.build(self, weights=weights, input_size=input_size, pooling=pooling)

    @property
    def preprocess_input(self) -> Callable:
        return self.family.preprocessing(self)
