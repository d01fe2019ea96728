"""Backbones by name, through a registry of families.

A family (`base.BackboneFamily`) is one source of pretrained image models: it knows which names are its models
and under what canonical name features record them, the input sizes each allows (smallest, default), how to build
one for a pooling (its own taps for "stages") and its preprocessing. `keras.applications` (`applications`) is the
family of plain names; another family is one module whose models are named "<prefix>:<model>", added to
`FAMILIES`. `build_extractor` wraps what a family builds in what every backbone shares: seeded random weights,
the precision policy, uint8 images in, resizing, float32 features out.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

from cifar_transfer.backbones import applications, hub
from cifar_transfer.backbones.base import Backbone, BackboneFamily
from cifar_transfer.errors import ConfigError
from cifar_transfer.native import load_keras

FAMILIES: tuple[BackboneFamily, ...] = (applications.FAMILY, hub.FAMILY)


def family_of(name: str) -> BackboneFamily:
    """The family a name belongs to: the one of its "<prefix>:", else the family of plain names."""
    prefix, colon, _ = name.partition(":")
    return next((family for family in FAMILIES if family.prefix == (prefix if colon else None)), applications.FAMILY)


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name or say, in one line, which names exist."""
    backbone = family_of(name).resolve(name)
    if backbone is None:
        raise ConfigError(f"unknown backbone {name!r}: use {' or '.join(family.valid_names() for family in FAMILIES)}")
    return backbone


def backbone_option_help() -> str:
    """The --backbone description, from the families."""
    return " or ".join(family.naming for family in FAMILIES)


@contextlib.contextmanager
def _private_python_random(seed: int) -> Iterator[None]:
    """Make Keras' default initializer seeds a function of `seed` alone.

    Keras draws the seed of every initializer built without one from the global
    `random` module, which any other thread (Prefect's among them) may use at the
    same moment; a private generator keeps a seeded random network identical in
    every process, so resumed and distributed shards come from the same weights.
    """
    from keras.src.random import seed_generator

    shared = seed_generator.python_random
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = shared


_PRECISION_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def build_extractor(
    backbone_name: str,
    *,
    weights: str,
    input_size: int,
    pooling: str,
    precision: str,
    seed: int,
    image_shape: tuple[int | None, int | None, int] = (32, 32, 3),  # None: any height or width (always resized)
):
    """The frozen feature extractor: uint8 images in, float32 features out.

    Resizing and the backbone's own preprocessing live inside the model, so a
    batch of raw 32x32 images is all it needs and memory stays flat whatever
    the input size. `pooling` is "avg" (the pooled final features), "stages" (the family's taps: for CNNs see
    `stages.stage_taps`) or "none" (the spatial map). `weights` is the family's pretrained weights ("imagenet"),
    "none" (seeded random init) or a weights-file path.
    """
    keras = load_keras()

    backbone = get_backbone(backbone_name)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_PRECISION_POLICY[precision])
    try:
        keras.utils.set_random_seed(seed)
        with _private_python_random(seed):
            base = backbone.build(weights=weights, input_size=input_size, pooling=pooling)
        base.trainable = False
        images = keras.Input(image_shape, dtype="uint8", name="images")
        pixels = keras.ops.cast(images, "float32")
        if image_shape[:2] != (input_size, input_size):
            pixels = keras.layers.Resizing(
                input_size,
                input_size,
                interpolation=backbone.interpolation,
                antialias=backbone.antialias,
                crop_to_aspect_ratio=backbone.crop_to_aspect_ratio,
            )(pixels)
        features = base(backbone.preprocess_input(pixels), training=False)  # never batch statistics: frozen
        features = keras.ops.cast(features, "float32")
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return keras.Model(images, features, name=f"{backbone.model_name}_features")
