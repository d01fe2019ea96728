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

Threads: a shard's images decode on every core this process may use (`decode_into`; Pillow's decoders and resize
release the GIL), so the images of a folder keep up with an engine faster than one core decodes: a GPU's thousands
of images a second, where one thread decodes a few hundred photos. Any decode holding more than `SMALL_DECODE_MB`
runs alone (one at a time in the process), so the memory bound below holds whatever the threads.

Memory: the cap is on the bytes a decode holds, not on a pixel count: the decoded image in Pillow's own layout
(1 byte a pixel for grayscale and palette, 2 for 16-bit, 4 for colour) plus the one full-size copy a conversion
needs, at most `MAX_DECODE_MB`. An image whose decoded form is over `SMALL_DECODE_MB` is first box-reduced
(`Image.reduce`) to no less than twice `size` before any conversion, orientation or compositing, so those work on
a small image: a 100-megapixel 16-bit PNG decodes in about 300 MB, not 2 GB. Smaller images take the direct path
above, unchanged, so a collection's features do not depend on when its images were decoded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps

from cifar_transfer.hardware import in_order_on_threads, usable_cores

MAX_DECODE_MB = 512  # a 100-megapixel colour photo decodes into 400 MB; a crafted header could ask for far more
SMALL_DECODE_MB = 64  # decoded images up to this size (16 megapixels of colour) take the direct path
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # what Pillow may open: not EPS (Ghostscript), not PSD, ...
BACKGROUND = (255, 255, 255)
# What Pillow raises on bytes it cannot decode (it turns its parsers' struct, index and end-of-data errors into
# these): UnidentifiedImageError and truncation are OSErrors, bad headers SyntaxErrors, bad values ValueErrors.
_PILLOW_FAILURES = (Image.DecompressionBombError, OSError, SyntaxError, ValueError)
# Modes Pillow converts to RGB faithfully. Others (LAB, HSV, float TIFFs) it would convert channel by channel,
# without colour science or a known range: refused rather than decoded into wrong colours.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_OPAQUE_MODES = frozenset({"RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr"})
# Bytes a pixel takes in Pillow's memory: one for 1-band 8-bit images, two for 16-bit, four for the rest.
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Modes `Image.reduce` cannot reduce, and the mode each is converted to first (the one full-size copy).
_BEFORE_REDUCE = {"1": "L", "P": "RGBA", **{mode: "L" for mode in _SIXTEEN_BIT}}
READ_AHEAD_PER_THREAD = 4  # encoded images `decode_into` holds per decoding thread, read ahead of their decode
_LARGE_DECODES = threading.Lock()  # held by every decode over SMALL_DECODE_MB: one at a time in the process
_STRIP_PIXELS = 1 << 22  # large images are reduced, and 16-bit ones scaled to 8 bits, a strip of this many pixels at a time
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # EXIF orientation -> what makes the picture stand upright

# Pillow's one error log (a TIFF asking for too many samples a pixel) repeats the SyntaxError reported here.
logging.getLogger("PIL.TiffImagePlugin").setLevel(logging.CRITICAL)


class _PillowQuiet:
    """Pillow's warnings (odd EXIF, palettes, big images) ignored while any thread decodes: an image's reason says
    enough. One `warnings.catch_warnings` for all of them, entered by the first and left by the last: it saves and
    restores the process's one filter list, so one per thread would restore each other's state (a warning leaks, or
    the silence outlives them). Only warnings issued in Pillow or this module are ignored: other threads' still show."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decoding = 0
        self._silence: warnings.catch_warnings | None = None

    def __enter__(self) -> None:
        with self._lock:
            if not self._decoding:
                self._silence = warnings.catch_warnings()
                self._silence.__enter__()
                warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
                warnings.filterwarnings("ignore", module=re.escape(__name__) + "$")
            self._decoding += 1

    def __exit__(self, *_) -> None:
        with self._lock:
            self._decoding -= 1
            if not self._decoding and self._silence is not None:
                self._silence.__exit__(None, None, None)
                self._silence = None


_pillow_quiet = _PillowQuiet()


class UndecodableImage(ValueError):
    """The bytes are not an image this pipeline decodes: not an image, truncated, unsupported or too large."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, size: int) -> np.ndarray:
    """The image in `data` as a (size, size, 3) uint8 RGB array; `UndecodableImage` says why when it cannot be."""
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    with _pillow_quiet:
        return _checked_decode(data, size)


def decode_into(
    pixels: np.ndarray, encoded: Iterable[tuple[bytes | None, str | None]], mirrored: bool = False, threads: int | None = None
) -> list[str | None]:
    """Decode each encoded image into its row of `pixels` ((rows, size, size, 3) uint8; mirrored left to right with
    `mirrored`) on `threads` threads (default: one per core, `hardware.usable_cores`), and give each row's reason
    when it holds no image: the reason it came with (bytes None: unread) or why it would not decode; None where it
    decoded.

    `encoded` is consumed in order, at most `READ_AHEAD_PER_THREAD` images a thread ahead of their decode, so a
    shard's encoded bytes are never all in memory at once. Rows decode in any order; each lands in its own row,
    so the result is the same as one thread's, bit for bit."""
    size = pixels.shape[1]
    reasons: list[str | None] = []

    def decode_row(row: int, data: bytes) -> None:
        try:
            image = _checked_decode(data, size)
        except UndecodableImage as exc:
            reasons[row] = exc.reason
            return
        pixels[row] = image[:, ::-1] if mirrored else image

    def to_decode() -> Iterator[tuple[int, bytes]]:
        for row, (data, reason) in enumerate(encoded):
            reasons.append(None if data is not None else reason or "unreadable")
            if data is not None:
                yield row, data

    threads = threads or usable_cores()
    with _pillow_quiet:  # raises what a decode raised beyond a refusal
        deque(in_order_on_threads(to_decode(), lambda job: decode_row(*job), threads, threads * READ_AHEAD_PER_THREAD, "decode"), maxlen=0)
    return reasons


def decode_kept(
    pixels: np.ndarray, encoded: Iterable[tuple[bytes | None, str | None]], mirrored: bool = False
) -> tuple[np.ndarray, list[str | None]]:
    """`decode_into`, then the decoded images closed up in order at the front of `pixels`, in place (no second copy
    of a shard's pixels: 150 MB at 224 px): (the decoded images, a view of `pixels`; each row's reason)."""
    reasons = decode_into(pixels, encoded, mirrored)
    kept = 0
    for row, reason in enumerate(reasons):
        if reason is None:
            if row != kept:
                pixels[kept] = pixels[row]
            kept += 1
    return pixels[:kept], reasons


def _checked_decode(data: bytes, size: int) -> np.ndarray:
    """`_decode`, Pillow's failures as `UndecodableImage`."""
    try:
        return _decode(data, size)
    except UndecodableImage:
        raise
    except _PILLOW_FAILURES as exc:
        raise UndecodableImage(_reason(exc)) from None


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=FORMATS) as image:
        image.draft("RGB", (size, size))  # JPEG only: libjpeg's scale is chosen so both sides stay >= size
        width, height = image.size  # never zero: Pillow refuses to open an empty image
        decoded = width * height * _bytes_per_pixel(image.mode)
        converted = width * height * _bytes_per_pixel(_BEFORE_REDUCE.get(image.mode, image.mode)) if image.mode in _BEFORE_REDUCE else 0
        if decoded + converted > MAX_DECODE_MB * 2**20:
            raise UndecodableImage(
                f"image is {width}x{height} pixels of {image.mode}: decoding it takes {(decoded + converted) / 2**20:,.0f} "
                f"MiB, over the cap of {MAX_DECODE_MB} MiB"
            )
        with _LARGE_DECODES if decoded + converted > SMALL_DECODE_MB * 2**20 else contextlib.nullcontext():
            if decoded > SMALL_DECODE_MB * 2**20 and min(width, height) >= 4 * size:
                return _decode_large(image, size)
            upright = ImageOps.exif_transpose(image)
            return _square(_rgb(upright), size)


def _decode_large(image: Image.Image, size: int) -> np.ndarray:
    """A large image reduced first (box filter, to at least twice `size`), so conversions touch a small copy."""
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    transparent = "transparency" in image.info
    if image.mode in _SIXTEEN_BIT:
        image = _eight_bit(image)
    elif image.mode in _BEFORE_REDUCE or transparent:
        image = image.convert("RGBA" if transparent or image.mode == "P" else _BEFORE_REDUCE[image.mode])
    small = _reduce(image, max(1, image.width // (2 * size)), max(1, image.height // (2 * size)))
    del image
    if orientation in _ORIENTATIONS:
        small = small.transpose(_ORIENTATIONS[orientation])
    return _square(_rgb(small), size)


def _reduce(image: Image.Image, across: int, down: int) -> Image.Image:
    """`image.reduce((across, down))` a strip at a time: reducing an RGBA image whole makes a premultiplied copy of it."""
    rows = down * max(1, _STRIP_PIXELS // (image.width * down))
    strips = [
        image.crop((0, top, image.width, min(top + rows, image.height))).reduce((across, down)) for top in range(0, image.height, rows)
    ]
    small = Image.new(strips[0].mode, (strips[0].width, sum(strip.height for strip in strips)))
    top = 0
    for strip in strips:
        small.paste(strip, (0, top))
        top += strip.height
    return small


def _square(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.uint8)


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L", values scaled (not clipped), converted a strip at a time: one byte a
    pixel more than the image itself, where a whole-image conversion would hold 4 + 8 bytes a pixel."""
    eight = Image.new("L", image.size)
    rows = max(1, _STRIP_PIXELS // image.width)
    for top in range(0, image.height, rows):
        strip = np.asarray(image.crop((0, top, image.width, min(top + rows, image.height))))
        eight.paste(Image.fromarray((strip // 257).astype(np.uint8)), (0, top))
    return eight


def _bytes_per_pixel(mode: str) -> int:
    return 1 if mode in _ONE_BYTE_MODES else 2 if mode in _SIXTEEN_BIT else 4


def _rgb(image: Image.Image) -> Image.Image:
    """`image` in 8-bit RGB: transparency composited over `BACKGROUND`, 16-bit values scaled to 8 bits."""
    if image.mode in _SIXTEEN_BIT:  # 16-bit grayscale (PNG, TIFF)
        image = _eight_bit(image)
    elif image.mode.startswith("I"):  # 32-bit integers ("I"): as 16-bit values, clipped
        scaled = np.asarray(image, dtype=np.int64) // 257
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
