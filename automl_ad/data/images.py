"""Decoding image and mask files into numpy arrays, the same way for every source format.

Every image becomes H x W x 3 uint8 RGB, whatever PIL opened:

- grayscale (``1``, ``L``) is replicated to three channels;
- alpha (``LA``, ``RGBA``, ``PA``, palette with transparency) is *dropped*, not composited:
  industrial captures that carry alpha are almost always fully opaque, and compositing on a
  chosen background would invent colours for the rare transparent pixels;
- palette images are expanded through their palette;
- 16-bit and 32-bit integer grayscale (``I;16*``, ``I``) is scaled to 8 bits by its real bit
  range: the PNG ``sBIT`` significant-bit count when the file declares one (12-bit sensor
  data in a 16-bit container), else the container's range (65535 for 16-bit, and for
  ``I`` the smallest of 16 or 32 bits that holds the data). PIL's own ``convert("L")``
  clips these to 255, which turns almost every pixel white;
- other colour spaces (CMYK, YCbCr, LAB, HSV) go through PIL's conversion to RGB.

Truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set here, and
every read calls ``.load()`` so a short file fails now instead of later as grey pixels.

Images whose header declares more than ``MAX_IMAGE_PIXELS`` pixels (PIL's own default,
89.5 megapixels, about 9459 x 9459; an 8k x 8k industrial capture is 67 MP) or a side
over ``MAX_IMAGE_SIDE`` are refused from the header alone, before any pixel is decoded:
a decompression bomb (a tiny file declaring a huge image) would otherwise exhaust
memory. ``AUTOML_AD_MAX_IMAGE_PIXELS`` sets another pixel limit.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from automl_ad.errors import UserError

# Suffixes (lower case, with the dot) that the data layer treats as images.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Errors PIL raises for files it cannot decode (truncated data surfaces as OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError,
                  struct.error, EOFError)

MAX_IMAGE_PIXELS = 89_478_485  # PIL's default bomb limit, so its check and ours agree
MAX_IMAGE_SIDE = 65_535  # PNG and TIFF allow far more; no camera makes it

_WIDE_INTEGER_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def is_image_file(path: Path) -> bool:
    """True for a visible file whose suffix is an image suffix (case-insensitive)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def image_files_in(folder: Path | str, what: str) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted); UserError naming ``what``
    (e.g. "--texture-dir") when it is not a folder or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not files:
        raise UserError(f"{what} {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def max_image_pixels() -> int:
    """The pixel limit: ``AUTOML_AD_MAX_IMAGE_PIXELS`` when set (a positive integer)."""
    text = os.environ.get("AUTOML_AD_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"AUTOML_AD_MAX_IMAGE_PIXELS={text!r}: give a positive number of pixels")
    return int(text)


def _too_large(path: Path, detail: str) -> UserError:
    # No ": " in the text: data check shows what follows the last one as the reason.
    return UserError(f"image {path} is too large to decode safely ({detail})")


def _open_checked(path: Path) -> Image.Image:
    """``Image.open`` (header only) with the size limit enforced before any decoding."""
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL's own bomb check in open() then uses the same limit
    with warnings.catch_warnings():
        # PIL only warns between 1x and 2x its limit and would then decode the image.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise _too_large(path, f"over the limit of {limit / 1e6:.1f} megapixels, AUTOML_AD_MAX_IMAGE_PIXELS") from None
    width, height = opened.size
    if max(width, height) > MAX_IMAGE_SIDE:
        opened.close()
        raise _too_large(path, f"{width} x {height}, a side over {MAX_IMAGE_SIDE} px")
    return opened


def _open_loaded(path: Path) -> Image.Image:
    """Open and fully decode ``path``; any failure becomes a UserError naming it."""
    try:
        with _open_checked(path) as opened:
            opened.load()
            image = opened.copy()  # detached from the file, which the with-block closes
            image.info = dict(opened.info)
            file_format = opened.format
    except FileNotFoundError as error:
        raise UserError(f"image file not found: {path}") from error
    except UserError:
        raise  # already names the file (too large); UserError is a ValueError
    except _DECODE_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read image {path}: {reason}") from error
    if file_format == "PNG" and image.mode in _WIDE_INTEGER_MODES:
        # PIL does not expose sBIT; a second, header-only read finds it.
        with open(path, "rb") as stream:
            bits = _png_significant_bits(stream)
        if bits:
            image.info["significant_bits"] = bits
    return image


def _png_significant_bits(stream) -> int | None:
    """Read the grey sBIT value from a PNG stream's chunk list (None when absent)."""
    try:
        stream.seek(8)
        while True:
            header = stream.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"sBIT":
                data = stream.read(length)
                return int(data[0]) if data else None
            if kind in (b"IDAT", b"IEND"):
                return None  # sBIT must precede the image data
            stream.seek(length + 4, 1)  # skip data and CRC
    except (OSError, ValueError, struct.error):
        return None


def _wide_to_uint8(image: Image.Image) -> np.ndarray:
    """16/32-bit integer grayscale -> H x W uint8, scaled by the real bit range."""
    values = np.asarray(image).astype(np.int64)
    values = np.clip(values, 0, None)  # negative "I" values have no meaning as intensity
    bits = image.info.get("significant_bits")
    if bits and 1 <= bits <= 16:
        full_scale = (1 << bits) - 1
    elif image.mode.startswith("I;16") or int(values.max(initial=0)) <= 0xFFFF:
        full_scale = 0xFFFF
    else:
        full_scale = 0xFFFFFFFF
    scaled = np.rint(np.minimum(values, full_scale) * (255.0 / full_scale))
    return scaled.astype(np.uint8)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _WIDE_INTEGER_MODES:
        gray = _wide_to_uint8(image)
    elif mode in ("1", "L"):
        gray = np.asarray(image.convert("L"))
    elif mode in ("LA", "La"):
        gray = np.asarray(image.getchannel(0))
    elif mode in ("P", "PA"):
        # Through RGBA so palette transparency is dropped the same way as real alpha.
        return np.array(np.asarray(image.convert("RGBA"))[..., :3], order="C")
    elif mode in ("RGBA", "RGBa", "RGBX"):
        return np.array(np.asarray(image)[..., :3], order="C")
    elif mode == "RGB":
        return np.array(image)  # a writable copy: PIL's own buffer is read-only
    else:
        return np.array(image.convert("RGB"))
    return np.repeat(gray[..., None], 3, axis=2)


def read_image(path: Path | str) -> np.ndarray:
    """Decode ``path`` into H x W x 3 uint8 RGB (conversion rules in the module docstring).

    Raises UserError naming the file when it is missing, truncated, or not an image.
    """
    path = Path(path)
    return rgb_array(_open_loaded(path), str(path))


def rgb_array(image: Image.Image, name: str = "image") -> np.ndarray:
    """An opened PIL image as H x W x 3 uint8 RGB, by the same rules as :func:`read_image`
    (so a file and the PIL image opened from it give the same pixels). ``name`` is what a
    refusal calls it."""
    try:
        image.load()
    except _DECODE_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot decode {name}: {reason}") from error
    if image.mode == "F":
        raise UserError(f"floating-point images (mode F) are not supported: {name}")
    return _to_rgb_array(image)


def read_mask(path: Path | str) -> np.ndarray:
    """Decode a ground-truth mask into H x W bool: True where the grey value is > 0.

    16-bit masks are compared on their raw values (any nonzero value is defect), so a
    mask saved as 0/1 in 16 bits is not lost to the 8-bit scaling used for images.
    """
    path = Path(path)
    image = _open_loaded(path)
    if image.mode in _WIDE_INTEGER_MODES or image.mode == "F":
        return np.asarray(image) > 0
    if image.mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        image = image.convert("RGBA").convert("RGB")  # drop alpha as for images
    return np.asarray(image.convert("L")) > 0


def image_size_of(path: Path | str) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels.

    Raises UserError naming the file when the header cannot be read.
    """
    path = Path(path)
    try:
        with _open_checked(path) as opened:
            width, height = opened.size
    except FileNotFoundError as error:
        raise UserError(f"image file not found: {path}") from error
    except UserError:
        raise  # already names the file (too large); UserError is a ValueError
    except _DECODE_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read image header {path}: {reason}") from error
    return int(height), int(width)
