"""The keras.applications family: every model Keras ships, by its class name (case-insensitive), with the
`preprocess_input` of its own module, built without its classifier (`include_top=False`)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable
from functools import cache
from pathlib import Path

from cifar_transfer.backbones.base import Backbone, load_weights_file, weights_identity
from cifar_transfer.backbones.stages import pooled_stages
from cifar_transfer.native import load_keras

# Smallest input side Keras accepts with include_top=False (keras' obtain_input_shape).
_MIN_INPUT_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
# Input side each family was trained at; 224 for every model not listed.
_NATIVE_INPUT_SIZE = {
    "InceptionV3": 299,
    "InceptionResNetV2": 299,
    "Xception": 299,
    "NASNetLarge": 331,
    "EfficientNetB1": 240,
    "EfficientNetB2": 260,
    "EfficientNetB3": 300,
    "EfficientNetB4": 380,
    "EfficientNetB5": 456,
    "EfficientNetB6": 528,
    "EfficientNetB7": 600,
    "EfficientNetV2B1": 240,
    "EfficientNetV2B2": 260,
    "EfficientNetV2B3": 300,
    "EfficientNetV2S": 384,
    "EfficientNetV2M": 480,
    "EfficientNetV2L": 480,
}
# The 2017 post fed InceptionV3 139x139 images; it stays the default for that backbone.
_POST_INPUT_SIZE = {"InceptionV3": 139}


@cache
def available_models() -> dict[str, str]:
    """Every model keras.applications exports, by its canonical name, with the module that defines it.

    Read from the source of `keras.applications` (Keras generates it as one `from <module> import <Name>` line
    per model) so that checking a configuration does not import Keras and TensorFlow; if that file ever
    looks different, Keras itself is asked.
    """
    spec = importlib.util.find_spec("keras")
    listing = Path(spec.origin).parent / "applications" / "__init__.py" if spec and spec.origin else None
    found: dict[str, str] = {}
    if listing is not None and listing.is_file():
        for node in ast.parse(listing.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {alias.asname or alias.name: node.module for alias in node.names if alias.name[:1].isupper()}
    if found:
        return found
    keras = load_keras()

    return {
        name: getattr(keras.applications, name).__module__
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    }


class KerasApplications:
    prefix: str | None = None
    naming: str = "a keras.applications model name (case-insensitive: MobileNetV2, InceptionV3, ResNet50, EfficientNetV2S, ...)"

    def resolve(self, name: str) -> Backbone | None:
        canonical = {known.lower(): known for known in available_models()}.get(name.lower())
        if canonical is None:
            return None
        default_size = _POST_INPUT_SIZE.get(canonical, _NATIVE_INPUT_SIZE.get(canonical, 224))
        return Backbone(canonical, self, min_input_size=_MIN_INPUT_SIZE.get(canonical, 32), default_input_size=default_size)

    def valid_names(self) -> str:
        return f"a keras.applications model name, one of {', '.join(sorted(available_models()))}"

    def weights_id(self, backbone: Backbone, weights: str, seed: int) -> str:
        return weights_identity(weights, seed)

    def build(self, backbone: Backbone, *, weights: str, input_size: int, pooling: str):
        constructor = getattr(importlib.import_module(available_models()[backbone.name]), backbone.name)
        base = constructor(
            include_top=False,
            weights="imagenet" if weights == "imagenet" else None,
            input_shape=(input_size, input_size, 3),
            pooling="avg" if pooling == "avg" else None,
        )
        if weights not in ("imagenet", "none"):
            load_weights_file(base, weights, f"{backbone.name}(include_top=False)", "pass the no-top weights of this backbone")
        return pooled_stages(base) if pooling == "stages" else base

    def preprocessing(self, backbone: Backbone) -> Callable:
        return importlib.import_module(available_models()[backbone.name]).preprocess_input


FAMILY = KerasApplications()
