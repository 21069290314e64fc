"""Decoding an image file, one way for every step and for predict.py: a data set's images and labels
(loader/layouts.py) and a user's own images (loader/user_images.py) are read by the same functions.

`decode` reads a file in full, so that a truncated or corrupt file fails at once, and refuses an image
that declares more than MAX_PIXELS pixels (a "decompression bomb": a small file that would decode into
gigabytes). `to_rgb` makes the 8-bit RGB image a viewer shows of any colour mode; 16-bit and wider
grayscale is scaled into 0..255, not clipped to white.
"""
import math
import re
import warnings

import numpy as np
from PIL import Image

# PIL's own limit (Image.MAX_IMAGE_PIXELS: 89,478,485 pixels, a 9459×9459 image, about 270 MB as 8-bit
# RGB), past which PIL only warns up to twice that; here every image above it is refused.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
WIDE_GRAYSCALE = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

_WHITE = (255, 255, 255)


class UndecodableImage(Exception):
    """The file is corrupt, truncated, not an image, in a format PIL cannot decode, or too large;
    the message says why (the callers name the file and what they wanted it for)."""


def decode(path):
    """The PIL image in `path`, decoded in full; FileNotFoundError when there is no such file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(path)
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        declared = re.search(r"\((\d+) pixels\)", str(err))  # PIL's words: "Image size (N pixels) exceeds ..."
        size = f"{int(declared.group(1)):,} pixels" if declared else "more pixels than PIL's limit"
        raise UndecodableImage(f"it declares {size}, more than the {MAX_PIXELS:,} an image may have: refused as "
                               f"a possible decompression bomb (a small file that decodes into gigabytes)") from None
    # Decoders raise many types for bad files (OSError, SyntaxError, struct.error, EOFError, ...);
    # anything raised while decoding this file is about this file.
    except Exception as err:
        raise UndecodableImage(f"{type(err).__name__}: {err}") from err
    try:
        picture.load()  # also closes the file: the pixels are in memory now
    except Exception as err:
        picture.close()
        raise UndecodableImage(f"{type(err).__name__}: {err}") from err
    return picture


def to_rgb(picture):
    """The 8-bit RGB image of `picture`, as an image viewer shows it (EXIF orientation aside: callers
    decide whether to apply it).

    - Grayscale (1, L), palette (P) and CMYK become RGB by PIL's conversions.
    - 16-bit and wider grayscale (I;16*, I, F): see `_to_8bit`; 16-bit values v become round(v/257),
      so 0..65535 spans 0..255 exactly.
    - Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited onto white,
      not dropped: what lies under transparent pixels is whatever the editor left there (often
      black or stale content), whereas white is what viewers and web pages show, and half-transparent
      edges blend instead of leaving a dark fringe.
    - Embedded ICC colour profiles are not applied (values are taken as sRGB).
    ValueError for a colour mode PIL cannot convert (e.g. LAB).
    """
    if picture.mode in WIDE_GRAYSCALE:
        picture = _to_8bit(picture)
    if picture.has_transparency_data:
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return picture.convert("RGB")


def _to_8bit(picture):
    """One-channel image with more than 8 bits -> mode L.

    Values are scaled from their nominal range: 0..65535 for integer modes (16-bit PNG and TIFF;
    PIL may widen them to mode I), 0..1 for float (F). Values outside it (32-bit integers, floats
    in other units) are stretched linearly from their own minimum..maximum instead of clipped.
    Non-finite values become 0.
    """
    values = np.nan_to_num(np.asarray(picture, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = 0.0, 1.0 if picture.mode == "F" else 65535.0
    if values.size and (values.min() < low or values.max() > high):
        low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / max(high - low, math.ulp(1.0)))
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
