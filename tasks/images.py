"""Any image Pillow opens, as 8-bit RGB, with the same pixel values the file means, or one line saying why not.

Pillow's own `convert("RGB")` is right for the 8-bit modes but clips high-bit-depth ones: a 16-bit
grayscale PNG (mode `I;16` or `I`, values 0..65535) comes out white wherever a value exceeds 255. So the
modes are handled in three groups:

- 8-bit modes (`1`, `L`, `P`, `PA`, `LA`, `RGB`, `RGBA`, `RGBX`, `CMYK`, `YCbCr`, `HSV`): Pillow's
  conversion. `LAB` goes through littlecms (`ImageCms`, Lab D50 -> sRGB), so the result does not depend
  on how a Pillow release converts Lab by itself. 16-bit colour PNGs arrive here already at 8 bits
  (Pillow keeps each sample's high byte).
- Alpha is dropped: the colour channels are used as stored, which is what the community VTAB-1k loaders
  do (`Image.open(path).convert("RGB")`), so a transparent image gives the same pixels here as there.
  Premultiplied modes (`RGBa`, `La`) are un-premultiplied first, so they follow the same rule.
  Embedded colour profiles (ICC) are not applied, as they are not there either.
- Integer and float modes (`I;16`, `I;16L`, `I;16B`, `I;16N`, `I`, `F`) are scaled to 0..255 from the
  range their bit depth defines: an unsigned b-bit value v becomes round(v * 255 / (2**b - 1)) (a 16-bit
  65535 -> 255, 32768 -> 128). The depth is the TIFF's BitsPerSample where the file says it; `I;16*`
  modes are 16-bit; mode `I` from a PNG or PGM is 16-bit (Pillow opens their 16-bit grayscale as `I`,
  scaled to 0..65535). Floats are taken to lie in [0, 1] (the usual convention for float images).

Refused with one line, since no scale can be known and a guess would silently change the pixels:
integer images deeper than 16 bits or signed, integer images of unknown depth, values outside the
declared range, float images with values outside [0, 1] or not finite.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# TIFF tags: bits per sample and sample format (1: unsigned integer, 2: signed integer, 3: float).
_BITS_PER_SAMPLE, _SAMPLE_FORMAT = 258, 339
_HIGH_DEPTH = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}
_SAVE_AS = "save it as an 8- or 16-bit PNG"


class ImageModeError(ValueError):
    """The image's mode or values have no sensible 8-bit RGB reading; the message says why and what to do."""


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` as an 8-bit RGB image (the rules are in the module docstring); raises `ImageModeError`."""
    mode = im.mode
    if mode in _HIGH_DEPTH:
        return Image.fromarray(to_uint8(im), "L").convert("RGB")
    if mode == "LAB":
        return _lab_to_rgb(im)
    if mode in _PREMULTIPLIED:
        im = im.convert(_PREMULTIPLIED[mode])
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageModeError(f"mode {mode} has no conversion to RGB ({e}); {_SAVE_AS}") from None


def to_uint8(im: Image.Image) -> np.ndarray:
    """A single-channel integer or float image's values scaled to uint8 [H, W] from its declared range."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageModeError(f"float image holds NaN or infinite values; {_SAVE_AS}")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ImageModeError(
                f"float image with values {a.min():g}..{a.max():g}: only floats in [0, 1] have a known scale; {_SAVE_AS}"
            )
        return np.floor(a * 255 + 0.5).astype(np.uint8)
    bits, signed = _integer_depth(im)
    if bits is None:
        raise ImageModeError(
            f"mode {im.mode} image ({im.format or 'unknown'} file) has no known bit depth; {_SAVE_AS}"
        )
    if signed or bits > 16:
        kind = "signed" if signed else "unsigned"
        raise ImageModeError(f"{bits}-bit {kind} integer image: no agreed scale to 8 bits; {_SAVE_AS}")
    a = a.astype(np.int64)
    top = (1 << bits) - 1
    if a.size and (a.min() < 0 or a.max() > top):
        raise ImageModeError(
            f"{bits}-bit image with values {a.min()}..{a.max()}, outside 0..{top}; {_SAVE_AS} with values in range"
        )
    # round(v * 255 / top), halves up, in exact integer arithmetic.
    return ((2 * 255 * a + top) // (2 * top)).astype(np.uint8)


def _integer_depth(im: Image.Image) -> tuple[int | None, bool]:
    """(bits per sample, signed) of an integer-mode image, from the file where it says so."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None and _BITS_PER_SAMPLE in tags:
        bits = tags[_BITS_PER_SAMPLE]
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        sample_format = tags.get(_SAMPLE_FORMAT, 1)
        sample_format = int(sample_format[0] if isinstance(sample_format, tuple) else sample_format)
        return bits, sample_format == 2
    if im.mode.startswith("I;16"):
        return 16, False
    if im.format in ("PNG", "PPM"):
        return 16, False
    return None, False


def _lab_to_rgb(im: Image.Image) -> Image.Image:
    try:
        from PIL import ImageCms
    except ImportError:
        raise ImageModeError(
            f"a Lab image needs Pillow's ImageCms (littlecms), which is missing; {_SAVE_AS}"
        ) from None
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(im, transform)
