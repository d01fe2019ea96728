"""Keras Hub presets with seeded random weights, written without network: what the tests and `bench/hub.py` run.

`write_seeded_preset(folder, "dinov2", ...)` builds the architecture at the given sizes, seeds its weights and saves
it with an image converter as a real preset of that family has one (`save_to_preset`: `config.json`,
`model.weights.h5`, `image_converter.json`), so `--backbone hub:<folder>` reads it as it would a downloaded one.
The converters follow each family's published preprocessing: DINOv2 bicubic with antialiasing and ImageNet's mean
and std, CLIP bicubic with its own mean and std, SigLIP and ViT bilinear to [-1, 1]. CLIP and SigLIP are written as
image-text models (a one-block text tower beside), as their presets are.
"""

from __future__ import annotations

from dataclasses import dataclass

from cifar_transfer.backbones.hub import keras_hub

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Sizes:
    image_size: int
    patch_size: int
    width: int  # the width of a token
    depth: int  # transformer blocks
    heads: int

    @property
    def mlp(self) -> int:
        return 4 * self.width


def _normalising(mean, std) -> dict:
    return {"scale": [1 / (255 * s) for s in std], "offset": [-m / s for m, s in zip(mean, std, strict=True)]}


def _dinov2(sizes: Sizes):
    hub = keras_hub()
    side = (sizes.image_size, sizes.image_size)
    backbone = hub.models.DINOV2Backbone(
        patch_size=sizes.patch_size,
        num_layers=sizes.depth,
        hidden_dim=sizes.width,
        num_heads=sizes.heads,
        intermediate_dim=sizes.mlp,
        image_shape=(*side, 3),
        position_embedding_shape=side,
    )
    converter = hub.layers.DINOV2ImageConverter(
        image_size=side, interpolation="bicubic", antialias=True, **_normalising(IMAGENET_MEAN, IMAGENET_STD)
    )
    return backbone, converter


def _vision_tower(encoder, sizes: Sizes):
    """An image-text model's vision encoder (CLIP's and SigLIP's take the same arguments)."""
    return encoder(
        patch_size=sizes.patch_size,
        hidden_dim=sizes.width,
        num_layers=sizes.depth,
        num_heads=sizes.heads,
        intermediate_dim=sizes.mlp,
        image_shape=(sizes.image_size, sizes.image_size, 3),
    )


def _text_sizes(sizes: Sizes) -> dict:
    return {"vocabulary_size": 64, "embedding_dim": sizes.width, "hidden_dim": sizes.width, "num_layers": 1, "num_heads": sizes.heads}


def _clip(sizes: Sizes):
    hub = keras_hub()
    vision = _vision_tower(hub.models.CLIPVisionEncoder, sizes)
    text = hub.models.CLIPTextEncoder(**_text_sizes(sizes), intermediate_dim=sizes.mlp, max_sequence_length=8)
    converter = hub.layers.CLIPImageConverter(
        image_size=(sizes.image_size, sizes.image_size), interpolation="bicubic", **_normalising(CLIP_MEAN, CLIP_STD)
    )
    return hub.models.CLIPBackbone(vision, text, projection_dim=sizes.width), converter


def _siglip(sizes: Sizes):
    hub = keras_hub()
    vision = _vision_tower(hub.models.SigLIPVisionEncoder, sizes)
    text = hub.models.SigLIPTextEncoder(**_text_sizes(sizes), intermediate_dim=sizes.mlp, max_sequence_length=8)
    converter = hub.layers.SigLIPImageConverter(image_size=(sizes.image_size, sizes.image_size), scale=1 / 127.5, offset=-1.0)
    return hub.models.SigLIPBackbone(vision, text), converter


def _vit(sizes: Sizes):
    hub = keras_hub()
    backbone = hub.models.ViTBackbone(
        image_shape=(sizes.image_size, sizes.image_size, 3),
        patch_size=sizes.patch_size,
        num_layers=sizes.depth,
        num_heads=sizes.heads,
        hidden_dim=sizes.width,
        mlp_dim=sizes.mlp,
    )
    converter = hub.layers.ViTImageConverter(image_size=(sizes.image_size, sizes.image_size), scale=1 / 127.5, offset=-1.0)
    return backbone, converter


ARCHITECTURES = {"dinov2": _dinov2, "clip": _clip, "siglip": _siglip, "vit": _vit}

# The published sizes the benchmark times (seeded weights): DINOv2 ViT-S/14, CLIP ViT-B/16, SigLIP ViT-B/16, ViT-B/16.
PUBLISHED = {
    "dinov2": Sizes(224, 14, 384, 12, 6),
    "clip": Sizes(224, 16, 768, 12, 12),
    "siglip": Sizes(224, 16, 768, 12, 12),
    "vit": Sizes(224, 16, 768, 12, 12),
}


def write_seeded_preset(folder: str, architecture: str, sizes: Sizes, seed: int = 0) -> str:
    """Write the `architecture` preset at `sizes` with weights seeded by `seed` into `folder`; returns `folder`."""
    from cifar_transfer.native import load_keras

    load_keras().utils.set_random_seed(seed)
    backbone, converter = ARCHITECTURES[architecture](sizes)
    backbone.save_to_preset(folder)
    converter.save_to_preset(folder)
    return folder
