"""A corpus of bad and unusual input files for the inspection commands, generated on the fly (no binaries in git).

Each `Case` is one file as the commands list it, with the outcome they must give: a prediction (with the
original image size the record must report) or an `error` record with an exact one-line message.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

#: Messages of `aoi_lightning.data.image_io` for the error cases ({path} is the path as listed).
NOT_AN_IMAGE = "not a readable image (unknown format, truncated or corrupt): {path}"
TRUNCATED_JPEG = "truncated JPEG (the file ends before its end-of-image marker): {path}"
EMPTY = "empty file: {path}"
MISSING = "cannot open {path}: No such file or directory"
TOO_LARGE = "image too large ({w}x{h} pixels): {path}"

HUGE_SIDE = 12_000  # 144 M pixels: decoded reduced by 2
BOMB_SIDE = 30_000  # 900 M pixels: a small file that would need 2.7 GB decoded whole


@dataclass(frozen=True)
class Case:
    """One corpus file.

    Attributes:
        rel: path relative to the corpus folder (posix).
        what: what the file is, for the documentation and failure messages.
        size: (h, w) the prediction record reports as `image_size`; None for an error case.
        error: the exact error message ({path} = the listed path); None for a prediction.
    """

    rel: str
    what: str
    size: tuple[int, int] | None = None
    error: str | None = None

    def expected_error(self, root: Path) -> str | None:
        if self.error is None:
            return None
        return self.error.format(path=root / self.rel)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def blank_grey_png(path: Path, side: int, rows: int | None = None, level: int = 1) -> Path:
    """An 8-bit grey `side` x `side` PNG of zeros, compressed row by row (a few MB for 30000 x 30000); with
    `rows` only that many rows of pixel data follow the header (a header that promises more than it holds)."""
    compressor = zlib.compressobj(level)
    row = bytes(side + 1)  # filter byte + pixels
    block = row * max(1, min(side, 4_000_000 // (side + 1)))
    n = side if rows is None else rows
    per_block = len(block) // len(row)
    parts = [compressor.compress(block) for _ in range(n // per_block)]
    parts.append(compressor.compress(row * (n % per_block)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path


def bmp_header_only(path: Path, width: int, height: int) -> Path:
    """A 24-bit BMP whose header promises `width` x `height` pixels but holds one row of them."""
    row = (width * 3 + 3) // 4 * 4
    pixels = bytes(row)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    head = struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    path.write_bytes(head + info + pixels)
    return path


def _encode(image_bgr: np.ndarray, ext: str, *params: int) -> bytes:
    ok, data = cv2.imencode(ext, image_bgr, list(params))
    assert ok, ext
    return data.tobytes()


def _pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def build_corpus(folder: Path, outside: Path, base_rgb: np.ndarray, huge: Path, bomb: Path) -> list[Case]:
    """Write the corpus into `folder` (and a link target into `outside`, a folder beside it).

    Args:
        folder: empty corpus folder.
        outside: folder outside the corpus for the target of a symbolic link.
        base_rgb: (64, 64, 3) uint8 RGB picture of a part (the content of the readable cases).
        huge: a `HUGE_SIDE` square PNG (see `blank_grey_png`), linked into the corpus.
        bomb: a `BOMB_SIDE` square PNG, linked into the corpus.

    Returns:
        the cases in the sorted order the commands list them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    h, w = base_rgb.shape[:2]
    bgr = cv2.cvtColor(base_rgb, cv2.COLOR_RGB2BGR)
    png, jpg = _encode(bgr, ".png"), _encode(bgr, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    pil = Image.fromarray(base_rgb)
    wide_rgb = np.ascontiguousarray(np.concatenate([base_rgb, base_rgb[:, ::-1]], axis=1)[: h // 2])  # (32, 128)
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # stored landscape, shown turned 90 degrees clockwise
    files: dict[str, bytes] = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "text_named.png": b"this is a text file, not a picture\n",
        "depth16.png": _encode((bgr.astype(np.uint16) * 257), ".png"),
        "bit1.png": _pil_bytes(pil.convert("L").point(lambda v: 255 if v > 127 else 0).convert("1"), "PNG"),
        "palette.png": _pil_bytes(pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
        "grey.png": _pil_bytes(pil.convert("L"), "PNG"),
        "rgba.png": _pil_bytes(Image.fromarray(np.dstack([base_rgb, np.full((h, w), 90, np.uint8)])), "PNG"),
        "cmyk.jpg": _pil_bytes(pil.convert("CMYK"), "JPEG", quality=95),
        "exif_rot6.jpg": _pil_bytes(Image.fromarray(wide_rgb), "JPEG", quality=95, exif=exif),
        "tiny_8x8.png": _encode(cv2.resize(bgr, (8, 8), interpolation=cv2.INTER_AREA), ".png"),
        "wide_32x128.png": _encode(cv2.cvtColor(wide_rgb, cv2.COLOR_RGB2BGR), ".png"),
        "bitmap.bmp": _encode(bgr, ".bmp"),
        "tiff.tif": _encode(bgr, ".tif"),
        "UPPER.PNG": png,
        "lot ü/Teil 01 – é.png": png,
        "a/same.png": png,
        "b/same.png": _encode(bgr[::-1], ".png"),
        "bomb_header.png": b"",  # written below
        "notes.txt": b"not an image: never listed\n",
        ".hidden.png": png,  # hidden files are never listed
    }
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    blank_grey_png(folder / "bomb_header.png", 100_000, rows=1)
    bmp_header_only(folder / "bomb.bmp", 40_000, 40_000)
    (outside / "target.png").write_bytes(png)
    (folder / "link_outside.png").symlink_to(outside / "target.png")
    (folder / "dangling.png").symlink_to(outside / "no_such_file.png")
    (folder / "huge_12000.png").symlink_to(huge)
    (folder / "bomb_30000.png").symlink_to(bomb)

    cases = [
        Case("empty.png", "zero-byte file", error=EMPTY),
        Case("truncated.png", "PNG cut in half", error=NOT_AN_IMAGE),
        Case("truncated.jpg", "JPEG cut in half", error=TRUNCATED_JPEG),
        Case("text_named.png", "text file named .png", error=NOT_AN_IMAGE),
        Case("depth16.png", "16-bit RGB PNG", (h, w)),
        Case("bit1.png", "1-bit PNG", (h, w)),
        Case("palette.png", "palette PNG (32 colours)", (h, w)),
        Case("grey.png", "8-bit greyscale PNG", (h, w)),
        Case("rgba.png", "RGBA PNG (alpha 90)", (h, w)),
        Case("cmyk.jpg", "CMYK JPEG", (h, w)),
        Case("exif_rot6.jpg", "JPEG stored 128 x 32 with EXIF orientation 6", (2 * w, h // 2)),
        Case("tiny_8x8.png", "8 x 8 image", (8, 8)),
        Case("huge_12000.png", "12000 x 12000 PNG (decoded reduced by 2)", (HUGE_SIDE, HUGE_SIDE)),
        Case("wide_32x128.png", "non-square image", (h // 2, 2 * w)),
        Case("bitmap.bmp", "BMP", (h, w)),
        Case("tiff.tif", "TIFF", (h, w)),
        Case("UPPER.PNG", "upper-case extension", (h, w)),
        Case("lot ü/Teil 01 – é.png", "spaces and non-ASCII characters in folder and file name", (h, w)),
        Case("a/same.png", "same file name as b/same.png", (h, w)),
        Case("b/same.png", "same file name as a/same.png", (h, w)),
        Case("link_outside.png", "symbolic link to a file outside the folder", (h, w)),
        Case("dangling.png", "symbolic link to a missing file", error=MISSING),
        Case(
            "bomb_header.png",
            "PNG header claiming 100000 x 100000",
            error=TOO_LARGE.replace("{w}x{h}", "100000x100000"),
        ),
        Case(
            "bomb_30000.png",
            "valid 30000 x 30000 PNG of 4 MB (decompression bomb)",
            error=TOO_LARGE.replace("{w}x{h}", f"{BOMB_SIDE}x{BOMB_SIDE}"),
        ),
        Case("bomb.bmp", "BMP header claiming 40000 x 40000", error=TOO_LARGE.replace("{w}x{h}", "40000x40000")),
    ]
    return sorted(cases, key=lambda c: Path(c.rel).parts)
