"""Image decoding with OpenCV: any common format, mode and bit depth -> RGB uint8, bounded in memory."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Images with more pixels than this are decoded reduced (JPEG/PNG/WebP by 2/4/8) or refused.
MAX_PIXELS = 64_000_000
#: Files larger than this are refused before decoding.
MAX_FILE_BYTES = 512 * 1024 * 1024


class ImageReadError(ValueError):
    """A file that is not a readable image; the message is one line for the user."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of a folder in sorted order (hidden files skipped)."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in Path(folder).glob(pattern) if p.is_file() and is_image_file(p) and not p.name.startswith(".")
    )


def _header_size(data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from PNG/JPEG headers without decoding pixels; None when unknown."""
    raw = data.tobytes()[:65536]
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24:
        return int.from_bytes(raw[20:24], "big"), int.from_bytes(raw[16:20], "big")
    if raw[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 < len(raw):
            if raw[pos] != 0xFF:
                pos += 1
                continue
            marker = raw[pos + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                return int.from_bytes(raw[pos + 5 : pos + 7], "big"), int.from_bytes(raw[pos + 7 : pos + 9], "big")
            pos += 2 + int.from_bytes(raw[pos + 2 : pos + 4], "big")
    return None


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype in (np.float32, np.float64):
        img = np.nan_to_num(image.astype(np.float32))
        high = float(img.max()) if img.size else 1.0
        scale = 255.0 if high <= 1.0 else 255.0 / high
        return np.clip(img * scale, 0, 255).astype(np.uint8)
    info = np.iinfo(image.dtype)
    return ((image.astype(np.float64) - info.min) / (info.max - info.min) * 255).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3).

    Grey is replicated, alpha dropped, 16-bit scaled to 8-bit, EXIF orientation applied (JPEG). Very large
    images are decoded at a reduced size where the format allows it, else refused.

    Raises:
        ImageReadError: unreadable, truncated, empty or non-image file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(f"cannot open {path}: {exc.strerror}") from exc
    if size == 0:
        raise ImageReadError(f"empty file: {path}")
    if size > MAX_FILE_BYTES:
        raise ImageReadError(f"file too large ({size} bytes > {MAX_FILE_BYTES}): {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    dims = _header_size(data)
    if dims is not None and dims[0] * dims[1] > MAX_PIXELS:
        factor = 2
        while dims[0] * dims[1] / factor**2 > MAX_PIXELS and factor < 8:
            factor *= 2
        if dims[0] * dims[1] / factor**2 > MAX_PIXELS:
            raise ImageReadError(f"image too large ({dims[1]}x{dims[0]} pixels): {path}")
        flags = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    try:
        image = cv2.imdecode(data, flags)
    except cv2.error as exc:
        raise ImageReadError(f"cannot decode {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if image is None or image.size == 0:
        raise ImageReadError(f"not a readable image (unknown format, truncated or corrupt): {path}")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageReadError(f"image too large ({image.shape[1]}x{image.shape[0]} pixels): {path}")
    image = _to_uint8(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file to a binary uint8 (H, W) array: any non-zero pixel is defect (1)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        raise ImageReadError(f"not a readable mask: {path}")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return (mask != 0).astype(np.uint8)


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
