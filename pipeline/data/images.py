"""One image file to model-ready pixels: header check, decode, fix, resize and crop (preprocess.Geometry).

Fixes applied to every file, so photos from phones and scanners need no cleaning first:
- EXIF orientation (a phone's portrait photo stored sideways) is applied before anything else;
- palette, RGBA/LA (alpha dropped, as PIL's convert and torchvision's loader do), CMYK and YCbCr become RGB or
  greyscale as the model needs;
- 16-bit greyscale (PNG mode I;16) is scaled by 255/65535; PIL's own convert would clip every value above 255
  to white.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .preprocess import Geometry, crop_box, output_size

MAX_PIXELS = 16384 * 16384  # larger headers are refused before decoding (a 79 KB PNG can claim 9000x9000)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class BadImage(Exception):
    """A file that cannot serve as an image; the message names the reason."""


def _open(path: Path):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own MAX_PIXELS check below replaces PIL's warning-then-error guard
    try:
        im = Image.open(path)
    except Exception as exc:  # PIL raises many kinds for unreadable bytes
        raise BadImage(f"{type(exc).__name__}: {str(exc)[:160]}") from None
    width, height = im.size
    if width * height > MAX_PIXELS:
        im.close()
        raise BadImage(f"{width}x{height} pixels is over the limit of {MAX_PIXELS} pixels")
    return im


def header(path: Path) -> tuple[int, int, bool]:
    """(width, height, greyscale) from the file's header alone, without decoding its pixels."""
    if not path.is_file():
        raise BadImage("not a regular file")
    with _open(path) as im:
        width, height = im.size
        try:  # an EXIF orientation that turns the image a quarter (5-8) swaps the sides decode gives
            # (a PNG's getexif decodes the whole file when its eXIf chunk is not in the header: not asked then)
            if ("exif" in im.info or im.format != "PNG") and im.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
        except Exception:  # odd EXIF: decode reports what is wrong with the file
            pass
        return width, height, im.mode in _GREY_MODES


def _to_mode(im, channels: str):
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float64)
        if im.mode != "F":
            values = values * (255.0 / 65535.0) if im.mode.startswith("I;16") or values.max(initial=0) > 255 \
                else values
        im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    target = "RGB" if channels == "rgb" else "L"
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette image with transparency goes straight to RGB
    return im if im.mode == target else im.convert(target)


def decode(path: Path, geometry: Geometry) -> np.ndarray:
    """The image at `path` as (C, H, W) uint8, prepared by `geometry` (size and channels must be set)."""
    from PIL import Image, ImageOps

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[geometry.interpolation]
    with _open(path) as im:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's UserWarnings on odd EXIF or palettes are not errors
                im.load()
                im = ImageOps.exif_transpose(im)
                im = _to_mode(im, geometry.channels)
                width, height = im.size
                new_w, new_h = output_size(width, height, geometry)
                if (new_w, new_h) != (width, height):
                    im = im.resize((new_w, new_h), resample)
                if geometry.resize:
                    im = im.crop(crop_box(new_w, new_h, geometry.size))
                pixels = np.asarray(im, dtype=np.uint8)
        except Exception as exc:  # truncated or corrupt data surfaces only while decoding
            raise BadImage(f"{type(exc).__name__}: {str(exc)[:160]}") from None
    pixels = pixels.reshape(*pixels.shape[:2], -1)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
