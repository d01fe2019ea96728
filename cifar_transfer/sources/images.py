"""Decode one encoded image into the pixels a backbone reads, safely, the same way for every collection source.

Collections hold images of any size, mode and format, some broken or hostile. `decode_image` turns one into
a `size` x `size` uint8 RGB array or raises `UndecodableImage` with the reason in one line, so the caller
skips and lists it instead of crashing a shard. A crafted header cannot make it allocate much: the pixel
count is checked from the header, against this module's own cap (not Pillow's global one), before decoding.

How pixels are made, so that every source agrees:
- EXIF orientation is applied first, so the picture stands as a viewer shows it.
- Transparency is composited over white (a transparent logo on a web page is seen on white), then dropped.
- Grayscale, palette, CMYK and 16-bit images become 8-bit RGB; 16-bit values are scaled, not clipped.
- The image is squashed to a square, never cropped: all of it stays in view, at the cost of its aspect
  ratio, as in the CIFAR archive path whose images are already square.
- It is resized once, from its own size straight to `size`, with Pillow's bilinear filter, the filter the
  archive path uses (Keras bilinear). For large reductions Pillow widens the filter to cover every source
  pixel, so no detail is aliased away. Large JPEGs are first decoded at 1/2 to 1/8 scale by libjpeg
  (`Image.draft`), never below `size`: several times faster, and the difference is below what the resize
  keeps anyway.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 100_000_000  # a 10,000 x 10,000 photo; decoding it takes 300 MB, a crafted header could ask for far more
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # what Pillow may open: not EPS (Ghostscript), not PSD, ...
BACKGROUND = (255, 255, 255)
# What Pillow raises on bytes it cannot decode (it turns its parsers' struct, index and end-of-data errors into
# these): UnidentifiedImageError and truncation are OSErrors, bad headers SyntaxErrors, bad values ValueErrors.
_PILLOW_FAILURES = (Image.DecompressionBombError, OSError, SyntaxError, ValueError)
# Modes Pillow converts to RGB faithfully. Others (LAB, HSV, float TIFFs) it would convert channel by channel,
# without colour science or a known range: refused rather than decoded into wrong colours.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_OPAQUE_MODES = frozenset({"RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr"})
# Pillow's one error log (a TIFF asking for too many samples a pixel) repeats the SyntaxError reported here.
logging.getLogger("PIL.TiffImagePlugin").setLevel(logging.CRITICAL)


class UndecodableImage(ValueError):
    """The bytes are not an image this pipeline decodes: not an image, truncated, unsupported or too large."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, size: int) -> np.ndarray:
    """The image in `data` as a (size, size, 3) uint8 RGB array; `UndecodableImage` says why when it cannot be."""
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    with warnings.catch_warnings():  # Pillow warns about odd EXIF, palettes or big images: the reason says enough
        warnings.simplefilter("ignore")
        try:
            return _decode(data, size)
        except UndecodableImage:
            raise
        except _PILLOW_FAILURES as exc:
            raise UndecodableImage(_reason(exc)) from None


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=FORMATS) as image:
        width, height = image.size  # never zero: Pillow refuses to open an empty image
        if width * height > MAX_PIXELS:
            raise UndecodableImage(f"image is {width}x{height} pixels, over the cap of {MAX_PIXELS:,} pixels")
        image.draft("RGB", (size, size))  # JPEG only: libjpeg's scale is chosen so both sides stay >= size
        upright = ImageOps.exif_transpose(image)
        return np.asarray(_rgb(upright).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.uint8)


def _rgb(image: Image.Image) -> Image.Image:
    """`image` in 8-bit RGB: transparency composited over `BACKGROUND`, 16-bit values scaled to 8 bits."""
    if image.mode.startswith("I"):  # 16-bit grayscale (PNG, TIFF) opens as "I;16*" or "I"
        scaled = np.asarray(image.convert("I"), dtype=np.int64) // 257
        image = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode not in _OPAQUE_MODES:
        raise UndecodableImage(f"unsupported colour mode {image.mode}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _reason(exc: Exception) -> str:
    """One line saying what is wrong with the bytes."""
    if isinstance(exc, Image.UnidentifiedImageError):
        return f"not an image in a supported format ({', '.join(FORMATS)})"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image is too large to decode safely ({exc})"
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return f"cannot decode the image: {detail}"
