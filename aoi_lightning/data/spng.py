"""PNG decoding by libspng, called through its C API with ctypes.

libspng (https://libspng.org, BSD-2-Clause) decodes PNGs to the same pixels as libpng in about 0.75x the time (512
px transistor images, checks on: 6.7 against 8.7 ms). It comes compiled into the pyspng wheel, whose own Python
function cannot be used here: it holds the GIL while it decodes (two decoding threads ran no faster than one, and
they stalled the other threads of `aoi run`), and it turns off the CRC and Adler-32 checks (a byte flipped in
transfer decoded to a wrong picture). Called with ctypes, every libspng call releases the GIL, and the context keeps
libspng's checks: a zlib checksum that does not match, or data cut short, is an error. libspng stops reading where
the image data ends, so `image_io._png_fast` checks every chunk's CRC up to IEND first.

Where the library or its symbols cannot be loaded (a pyspng build that does not export them, a libspng other than
0.7), `available()` is False and `decode` returns None: the caller decodes with OpenCV.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache

import numpy as np

#: libspng's `enum spng_format` values used here (spng.h, 0.7)
FMT_RGB8, FMT_G8 = 4, 64
#: bytes of ancillary chunk data libspng may keep per chunk and in all (as pyspng sets them): a PNG with a huge
#: text or ICC chunk is refused instead of filling memory
CHUNK_LIMIT = 64 * 1024 * 1024


class _Ihdr(ctypes.Structure):
    """`struct spng_ihdr` (spng.h)."""

    _fields_ = [
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("bit_depth", ctypes.c_uint8),
        ("color_type", ctypes.c_uint8),
        ("compression_method", ctypes.c_uint8),
        ("filter_method", ctypes.c_uint8),
        ("interlace_method", ctypes.c_uint8),
    ]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """libspng's C API from the pyspng extension module, with the argument types declared; None when absent."""
    try:
        spec = importlib.util.find_spec("pyspng._pyspng_c")
    except ImportError:
        return None
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
        lib.spng_version_string.restype = ctypes.c_char_p
        lib.spng_version_string.argtypes = []
        if not lib.spng_version_string().decode("ascii").startswith("0.7."):
            return None
        ctx, size = ctypes.c_void_p, ctypes.c_size_t
        lib.spng_ctx_new.restype, lib.spng_ctx_new.argtypes = ctx, [ctypes.c_int]
        lib.spng_ctx_free.restype, lib.spng_ctx_free.argtypes = None, [ctx]
        lib.spng_set_chunk_limits.restype, lib.spng_set_chunk_limits.argtypes = ctypes.c_int, [ctx, size, size]
        lib.spng_set_png_buffer.restype = ctypes.c_int
        lib.spng_set_png_buffer.argtypes = [ctx, ctypes.c_char_p, size]
        lib.spng_get_ihdr.restype, lib.spng_get_ihdr.argtypes = ctypes.c_int, [ctx, ctypes.POINTER(_Ihdr)]
        lib.spng_decoded_image_size.restype = ctypes.c_int
        lib.spng_decoded_image_size.argtypes = [ctx, ctypes.c_int, ctypes.POINTER(size)]
        lib.spng_decode_image.restype = ctypes.c_int
        lib.spng_decode_image.argtypes = [ctx, ctypes.c_void_p, size, ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError, UnicodeDecodeError):
        return None
    return lib


def available() -> bool:
    """True when libspng can be called."""
    return _library() is not None


def decode(data: bytes) -> np.ndarray | None:
    """An 8-bit, non-interlaced grey or RGB PNG -> (h, w) or (h, w, 3) RGB uint8, as stored (no gamma, ICC profile,
    transparency or EXIF orientation is applied); None for any other PNG, for a file libspng refuses (truncated,
    a CRC or checksum that does not match, malformed) and when libspng is not available.
    """
    lib = _library()
    if lib is None:
        return None
    ctx = lib.spng_ctx_new(0)
    if not ctx:
        return None
    try:
        if lib.spng_set_chunk_limits(ctx, CHUNK_LIMIT, CHUNK_LIMIT) or lib.spng_set_png_buffer(ctx, data, len(data)):
            return None
        ihdr = _Ihdr()
        if lib.spng_get_ihdr(ctx, ctypes.byref(ihdr)):
            return None
        if ihdr.bit_depth != 8 or ihdr.color_type not in (0, 2) or ihdr.interlace_method != 0:
            return None
        channels, fmt = (3, FMT_RGB8) if ihdr.color_type == 2 else (1, FMT_G8)
        size = ctypes.c_size_t()
        if lib.spng_decoded_image_size(ctx, fmt, ctypes.byref(size)):
            return None
        out = np.empty((ihdr.height, ihdr.width, channels), np.uint8)
        if size.value != out.nbytes or lib.spng_decode_image(ctx, out.ctypes.data, out.nbytes, fmt, 0):
            return None
        return out if channels == 3 else out[:, :, 0]
    finally:
        lib.spng_ctx_free(ctx)
