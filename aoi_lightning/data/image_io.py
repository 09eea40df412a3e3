"""Image decoding: any common format, mode and bit depth -> RGB uint8, bounded in memory (sizes read from the headers
by Pillow before decoding); masks read by content whatever their encoding. OpenCV decodes, except intact 8-bit
grey and RGB PNGs, which libspng decodes to the same pixels faster (`_png_fast`)."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin, WebPImagePlugin

from aoi_lightning.data import spng

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Largest decoded image kept in memory (pixels); larger images are decoded reduced by 2, 4 or 8, or refused.
MAX_PIXELS = 64_000_000
#: Largest image decoded at full size before it is reduced (pixels). Only JPEG decodes directly at a reduced
#: size; the other formats need the whole image in memory first (3 bytes a pixel), so this bounds that memory.
MAX_DECODE_PIXELS = 256_000_000
#: Files larger than this are refused before decoding.
MAX_FILE_BYTES = 512 * 1024 * 1024

_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


log = logging.getLogger(__name__)
# decoder failures become one-line errors of ours (ImageReadError, naming the file); OpenCV's own log lines would
# repeat them without the file name (errors of other OpenCV calls still raise cv2.error)
if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)


class ImageReadError(ValueError):
    """A file that is not a readable image; the message is one line for the user."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


#: A folder holding both files is an output folder of `aoi run` / `aoi watch` (earlier results, not inputs).
RESULTS_MARKER = "preds.jsonl"
RESULTS_COMPANION = "report.json"


#: The folder of good images in `train/` and `test/` (matched without regard to case: `Good`, `GOOD`).
GOOD = "good"


def is_good(folder_name: str) -> bool:
    """Whether a `train/` or `test/` subfolder holds good images (`good` in any case)."""
    return folder_name.lower() == GOOD


def good_folder(split_dir: Path) -> Path:
    """`<split_dir>/good`, or the one subfolder named so in another case (`Good`) when that is what exists."""
    exact = split_dir / GOOD
    if exact.is_dir() or not split_dir.is_dir():
        return exact
    return next((p for p in sorted(split_dir.iterdir()) if p.is_dir() and is_good(p.name)), exact)


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of a folder in sorted order (hidden files skipped).

    Symbolic links are listed under their own name: a link to a file anywhere is read as that file, and a
    broken link is listed too (it then fails to open with a clear message rather than vanishing). With
    `recursive`, linked folders are descended into like the others, each real folder once (a link loop ends
    there; a link up to a folder above the input is not walked), and subfolders holding a `preds.jsonl` and a
    `report.json` (results of an earlier `aoi run` or `aoi watch`: their masks and overlays are not parts) are
    left out, with a log line.
    """
    folder = Path(folder)

    def wanted(path: Path) -> bool:
        return is_image_file(path) and not path.name.startswith(".") and (path.is_file() or not path.exists())

    if not recursive:
        return sorted(p for p in folder.iterdir() if wanted(p)) if folder.is_dir() else []
    found, seen, results = [], set(), []
    top = os.path.realpath(folder)
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = Path(root)
        real = os.path.realpath(root)
        # each real folder once; a link up to a folder above the input (a loop through its parent) is not walked
        if real in seen or (here != folder and top.startswith(real.rstrip(os.sep) + os.sep)):
            dirs[:] = []
            continue
        seen.add(real)
        if here != folder and RESULTS_MARKER in files and RESULTS_COMPANION in files:
            results.append(here)
            dirs[:] = []
            continue
        dirs.sort()
        found += [here / name for name in files if wanted(here / name)]
    if results:
        shown = ", ".join(str(p) for p in results[:3]) + (f" and {len(results) - 3} more" if len(results) > 3 else "")
        log.info(
            "left out %d folder(s) of earlier results (they hold %s and %s): %s",
            len(results),
            RESULTS_MARKER,
            RESULTS_COMPANION,
            shown,
        )
    return sorted(found)


#: Leading bytes of each accepted format (the content decides, not the file name).
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_HEADER_READERS = {
    "png": PngImagePlugin.PngImageFile,
    "jpeg": JpegImagePlugin.JpegImageFile,
    "bmp": BmpImagePlugin.BmpImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
}
#: What Pillow's header parsers raise on malformed or unsupported content.
_HEADER_ERRORS = (SyntaxError, OSError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)


def image_format(data: np.ndarray | bytes) -> str | None:
    """Format of an encoded image by its leading bytes: png, jpeg, bmp, tiff or webp; None for anything else."""
    head = bytes(memoryview(data).cast("B")[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((fmt for magic, fmt in _SIGNATURES if head.startswith(magic)), None)


def _jpeg_complete(data: np.ndarray | bytes) -> bool:
    """True when an end-of-image marker follows the last start-of-scan (inside scan data 0xFF is always
    escaped, so neither marker can occur there): a cut-off JPEG fails this however far it got. Some decoders
    return such a file grey-filled instead of failing; this makes the outcome the same everywhere."""
    raw = bytes(data)  # no copy when given bytes
    return raw.rfind(b"\xff\xd9") > raw.rfind(b"\xff\xda") >= 0


#: libjpeg's messages for entropy-coded data that ends or breaks before the image is complete (its decoder then
#: fills the rest with grey and goes on); other warnings (e.g. extraneous bytes before a marker, which some
#: cameras write) leave the picture whole and are not refusals
_JPEG_DAMAGE = ("premature end of data segment", "premature end of jpeg file", "bad huffman", "huffman table")


def jpeg_damage(data: np.ndarray | bytes) -> str | None:
    """libjpeg's message when a JPEG's scan data is damaged (cut off, or a block lost in transfer) although the
    file may still end with its end-of-image marker; None for an intact file. The check decodes at 1/8 scale with
    simplejpeg in strict mode (about 0.6 ms for 512 px); without simplejpeg it finds nothing.
    """
    try:
        import simplejpeg
    except ImportError:  # pragma: no cover - a dependency of the project
        return None
    raw = bytes(data)  # no copy when given bytes
    try:
        simplejpeg.decode_jpeg(raw, colorspace="GRAY", min_height=1, min_width=1, strict=True)
    except ValueError as exc:
        text = str(exc).strip()
        return text if any(key in text.lower() for key in _JPEG_DAMAGE) else None
    return None


def image_header(data: np.ndarray | bytes) -> tuple[str, int, int] | None:
    """(format, height, width) of an encoded PNG, JPEG, BMP, TIFF or WebP image from its header alone (as
    stored, before any EXIF rotation); None for any other or malformed content. No pixel data is decoded.

    The headers are parsed by Pillow's format plugins (TIFF: its first image file directory), opened directly
    so that Pillow's own decompression-bomb check does not hide the size: the limits are ours (`MAX_PIXELS`).
    """
    fmt = image_format(data)
    if fmt is None:
        return None
    fp = io.BytesIO(memoryview(data).cast("B"))
    try:
        if fmt == "tiff":
            magic = fp.read(4)
            big = magic[2:] in (b"+\x00", b"\x00+")
            head = magic + fp.read(12 if big else 4)
            # Pillow reads BigTIFF from the third byte, which is 0 in a big-endian file ("MM\0+"): it gets the
            # little-endian magic and the file's byte order as `prefix`
            ifd = TiffImagePlugin.ImageFileDirectory_v2(b"II+\x00" + head[4:] if big else head, prefix=head[:2])
            if ifd.next >= memoryview(data).nbytes:
                return None  # the first directory lies past the end
            fp.seek(ifd.next)
            ifd.load(fp)
            height, width = int(ifd[257]), int(ifd[256])
        else:
            width, height = _HEADER_READERS[fmt](fp).size
    except _HEADER_ERRORS:
        return None
    return fmt, height, width


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit values of a decoded image by one fixed rule, never by the image's own contrast: uint16 >> 8;
    float images in [0, 1] times 255; other float or integer images (32-bit TIFFs) as 8-bit values when none
    exceeds 255, else as 16-bit values (/ 257); negative values and NaN are 0.

    Raises:
        ValueError: values beyond 16 bits (their range cannot be known).
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    values = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    high = float(values.max()) if values.size else 0.0
    if np.issubdtype(image.dtype, np.floating) and high <= 1.0:
        scale = 255.0
    elif high <= 255.0:
        scale = 1.0
    elif high <= 65535.0:
        scale = 1.0 / 257.0
    else:
        raise ValueError(f"{image.dtype} values up to {high:g}: beyond 16 bits, their range is unknown")
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _png_chunks_intact(raw: bytes) -> bool:
    """True when `raw` is PNG chunks from IHDR to IEND whose CRC-32s all match, with no `eXIf` chunk (OpenCV
    applies EXIF orientation). libspng stops reading once the image is complete and leaves an ancillary chunk with
    a bad CRC out, where OpenCV (libpng) refuses such files; this walk (about 0.1 ms for 300 KB) sends each of them
    to OpenCV."""
    pos, end = 8, len(raw)
    while pos + 12 <= end:
        length = int.from_bytes(raw[pos : pos + 4], "big")
        kind = raw[pos + 4 : pos + 8]
        stop = pos + 8 + length
        if stop + 4 > end or kind == b"eXIf":
            return False
        if zlib.crc32(raw[pos + 4 : stop]) != int.from_bytes(raw[stop : stop + 4], "big"):
            return False
        if kind == b"IEND":
            return True
        pos = stop + 4
    return False


def _png_fast(data: np.ndarray | bytes) -> np.ndarray | None:
    """RGB (h, w, 3) uint8 of an intact 8-bit, non-interlaced grey or RGB PNG without EXIF data, decoded by libspng
    (`spng.decode`: about 0.75x OpenCV's time, for the same pixels); None for any other PNG, or when libspng refuses
    the file (a zlib checksum that does not match, data cut short), so that OpenCV decodes it, or gives its error,
    as before. Neither decoder applies gamma, ICC profiles or transparency.
    """
    raw = bytes(data)  # no copy when given bytes
    if not _png_chunks_intact(raw):
        return None
    image = spng.decode(raw)  # None for the PNGs it does not take (from their IHDR)
    if image is None:
        return None
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image


def _reduction(fmt: str, height: int, width: int, path: Path) -> int:
    """1 (full size) or the factor 2, 4 or 8 an image is decoded reduced by; ImageReadError when too large."""
    pixels = height * width
    if pixels <= MAX_PIXELS:
        return 1
    too_large = ImageReadError(f"image too large ({width}x{height} pixels): {path}")
    factor = next((f for f in (2, 4, 8) if pixels / f**2 <= MAX_PIXELS), None)
    if factor is None or (fmt != "jpeg" and pixels > MAX_DECODE_PIXELS):
        raise too_large
    return factor


def _original_size(decoded: tuple[int, int], stored: tuple[int, int], factor: int) -> tuple[int, int]:
    """(h, w) of the full-size image: the decoded size when not reduced; else the stored size, turned when
    the decoder applied an EXIF rotation of 90 or 270 degrees."""
    if factor == 1:
        return decoded
    h, w = stored
    upright = {(h // factor, w // factor), (-(-h // factor), -(-w // factor))}
    turned = {(w // factor, h // factor), (-(-w // factor), -(-h // factor))}
    return (w, h) if decoded in turned and decoded not in upright else (h, w)


def read_image_with_size(path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file to RGB uint8 (h', w', 3) and give the (h, w) of the full-size image.

    Grey is replicated, alpha dropped, palette and 1/2/4-bit images expanded, 16-bit scaled to 8-bit, EXIF
    orientation applied. An image over `MAX_PIXELS` is decoded reduced by 2, 4 or 8 (JPEG directly; other
    formats only up to `MAX_DECODE_PIXELS`, since they are decoded whole first), so (h', w') can be smaller
    than (h, w); anything larger is refused before decoding. Only PNG, JPEG, BMP, TIFF and WebP content is
    decoded, whatever the file name says.

    Raises:
        ImageReadError: unreadable, truncated, empty, too large or non-image file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(f"cannot open {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageReadError(f"empty file: {path}")
    if size > MAX_FILE_BYTES:
        raise ImageReadError(f"file too large ({size} bytes > {MAX_FILE_BYTES}): {path}")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot open {path}: {exc.strerror or exc}") from exc
    if image_format(data) == "jpeg":
        raw = data.tobytes()  # one copy for both checks
        if not _jpeg_complete(raw):
            raise ImageReadError(f"truncated JPEG (the file ends before its end-of-image marker): {path}")
        damage = jpeg_damage(raw)
        del raw  # not kept beside the decoded image
        if damage:
            raise ImageReadError(f"damaged JPEG data ({damage}): {path}")
    header = image_header(data)
    if header is None or header[1] <= 0 or header[2] <= 0:
        raise ImageReadError(f"not a readable image (unknown format, truncated or corrupt): {path}")
    fmt, height, width = header
    factor = _reduction(fmt, height, width, path)
    if fmt == "png" and factor == 1:
        fast = _png_fast(data)
        if fast is not None:
            return fast, fast.shape[:2]
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR if factor == 1 else _REDUCED_FLAGS[factor]
    try:
        image = cv2.imdecode(data, flags)
    except cv2.error as exc:
        raise ImageReadError(f"cannot decode {path}: {str(exc).strip().splitlines()[-1]}") from exc
    del data
    if image is None or image.size == 0:
        raise ImageReadError(f"not a readable image (unknown format, truncated or corrupt): {path}")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageReadError(f"image too large ({image.shape[1]}x{image.shape[0]} pixels): {path}")
    original = _original_size(image.shape[:2], (height, width), factor)
    try:
        image = _to_uint8(image)
    except ValueError as exc:
        raise ImageReadError(f"unsupported pixel values ({exc}): {path}") from exc
    if image.ndim == 2:
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.shape[2] == 4:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    elif image.shape[2] == 1:
        rgb = cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    else:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return rgb, original


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); see `read_image_with_size` (very large images come reduced).

    Raises:
        ImageReadError: unreadable, truncated, empty, too large or non-image file.
    """
    return read_image_with_size(path)[0]


def mask_values(path: str | Path) -> np.ndarray:
    """Decode a mask file to one channel (H, W) of its own value type (uint8, uint16 or float), by content.

    Grey is taken as it is (8 or 16 bit, 1-bit as 0/255); palette images through their palette; colour as the
    largest of the R, G, B values of each pixel (a defect drawn in any colour on black counts). An alpha channel
    that is fully opaque is ignored; any other alpha composites the pixel over black (transparent = background).

    Raises:
        ImageReadError: unreadable, empty, not an image, or over `MAX_DECODE_PIXELS` by its header.
    """
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot open mask {path}: {exc.strerror or exc}") from exc
    header = image_header(data) if data.size else None
    if header is None:
        raise ImageReadError(f"not a readable mask: {path}")
    if header[1] * header[2] > MAX_DECODE_PIXELS:
        raise ImageReadError(f"mask too large ({header[2]}x{header[1]} pixels): {path}")
    try:
        mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        mask = None
    if mask is None or mask.size == 0:
        raise ImageReadError(f"not a readable mask: {path}")
    if mask.ndim == 3 and mask.shape[2] in (2, 4):  # grey or colour with alpha
        alpha, colour = mask[..., -1], mask[..., :-1]
        opaque = np.iinfo(mask.dtype).max if mask.dtype.kind in "ui" else 1.0
        if not (alpha == opaque).all():
            colour = colour * (alpha[..., None].astype(np.float64) / opaque)
        mask = colour
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return np.nan_to_num(mask) if mask.dtype.kind == "f" else mask


def binarise_mask(values: np.ndarray) -> np.ndarray:
    """Binary uint8 (H, W) mask (1 = defect) of one-channel mask values (see `mask_values`).

    Rule: a pixel is defect iff its value is above the midpoint between the mask's lowest and highest value.
    For a two-level mask this is the higher level, whatever the encoding ({0, 1}, {0, 255}, {0, 65535}, a
    colour on black); for more levels (anti-aliased or JPEG-saved masks) it splits at half the range. A mask
    of a single value is all defect when that value is non-zero, else empty.
    """
    if values.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = float(values.min()), float(values.max())
    if low == high:
        return np.full(values.shape, high > 0, np.uint8)
    return (values > (low + high) / 2).astype(np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file to a binary uint8 (H, W) array (1 = defect), read by content whatever the encoding:
    `mask_values` then `binarise_mask` (grey, RGB, RGBA, palette, 8 or 16 bit, {0, 1} or {0, 255} give the
    same mask).

    Raises:
        ImageReadError: unreadable, empty, not an image, or too large.
    """
    return binarise_mask(mask_values(path))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, C) to `size` (height, width): area interpolation down, bilinear up."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = image.shape[0] >= h and image.shape[1] >= w
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a binary mask with nearest neighbour (stays binary)."""
    h, w = size
    if mask.shape[:2] == (h, w):
        return mask
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
