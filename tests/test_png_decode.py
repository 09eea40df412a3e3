"""PNG decoding by libspng (`spng.decode`, `image_io._png_fast`): the same pixels as OpenCV for every PNG it takes,
OpenCV for every other PNG, no damaged file decoded where OpenCV refuses it, and the GIL released while it decodes."""

from __future__ import annotations

import ctypes
import io
import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import aoi_lightning.data.image_io as image_io
from aoi_lightning.data import spng
from aoi_lightning.data.image_io import ImageReadError, read_image_with_size

pytestmark = pytest.mark.torchfree


def _picture(h: int = 37, w: int = 53) -> np.ndarray:
    rng = np.random.default_rng(7)
    rgb = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    rgb[10:20] //= 3  # smooth rows, so that the encoder picks several row filters
    rgb[:, :8] = rgb[:1, :8]
    return rgb


def _png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _opencv_rgb(data: bytes) -> np.ndarray:
    """What `read_image_with_size` gave before the libspng path: OpenCV's decoding, as RGB."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def _chunk_span(data: bytes, kind: bytes) -> tuple[int, int]:
    """(start, length) of the data of the first chunk `kind`."""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == kind:
            return pos + 8, length
        pos += 12 + length
    raise AssertionError(f"no {kind!r} chunk")


def _exif_png(rgb: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turned 90 degrees clockwise
    return _png(Image.fromarray(rgb), exif=exif)


FAST = {
    "rgb": lambda rgb: _png(Image.fromarray(rgb)),
    "rgb_stored": lambda rgb: _png(Image.fromarray(rgb), compress_level=0),
    "rgb_level9": lambda rgb: _png(Image.fromarray(rgb), compress_level=9),
    "grey": lambda rgb: _png(Image.fromarray(rgb).convert("L")),
    "rgb_by_opencv": lambda rgb: cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes(),
}
OPENCV = {
    "palette": lambda rgb: _png(Image.fromarray(rgb).convert("P")),
    "rgba": lambda rgb: _png(Image.fromarray(rgb).convert("RGBA")),
    "grey_alpha": lambda rgb: _png(Image.fromarray(rgb).convert("LA")),
    "grey16": lambda rgb: cv2.imencode(".png", rgb[:, :, 0].astype(np.uint16) * 257)[1].tobytes(),
    "rgb16": lambda rgb: cv2.imencode(".png", rgb[:, :, ::-1].astype(np.uint16) * 257)[1].tobytes(),
    "exif_orientation": _exif_png,
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_libspng_takes_8bit_grey_and_rgb_with_opencvs_pixels(tmp_path: Path, name: str) -> None:
    data = FAST[name](_picture())
    assert image_io._png_fast(np.frombuffer(data, np.uint8)) is not None
    path = tmp_path / "a.png"
    path.write_bytes(data)
    image, size = read_image_with_size(path)
    assert image.dtype == np.uint8 and image.flags["C_CONTIGUOUS"]
    assert size == (37, 53)
    np.testing.assert_array_equal(image, _opencv_rgb(data))


@pytest.mark.parametrize("name", sorted(OPENCV))
def test_other_pngs_go_to_opencv(tmp_path: Path, name: str) -> None:
    data = OPENCV[name](_picture())
    assert image_io._png_fast(np.frombuffer(data, np.uint8)) is None
    path = tmp_path / "a.png"
    path.write_bytes(data)
    image, _ = read_image_with_size(path)
    np.testing.assert_array_equal(image, _opencv_rgb(data))


def test_exif_orientation_of_a_png_is_applied(tmp_path: Path) -> None:
    rgb = _picture()
    path = tmp_path / "turned.png"
    path.write_bytes(_exif_png(rgb))
    image, size = read_image_with_size(path)
    assert size == (53, 37)
    np.testing.assert_array_equal(image, np.rot90(rgb, k=-1))


def _damaged(kind: str) -> bytes:
    data = bytearray(_png(Image.fromarray(_picture()), compress_level=0))
    start, length = _chunk_span(bytes(data), b"IDAT")
    if kind == "pixel_byte_flipped":  # a transfer error: the chunk's CRC no longer matches
        data[start + length // 2] ^= 0x10
    elif kind == "pixel_byte_flipped_crc_redone":  # only zlib's Adler-32 of the pixel data tells
        data[start + length // 2] ^= 0x10
        data[start + length : start + length + 4] = struct.pack(
            ">I", zlib.crc32(bytes(data[start - 4 : start + length]))
        )
    elif kind == "crc_flipped":
        data[start + length] ^= 0x01
    elif kind == "cut_in_idat":
        del data[start + length // 2 :]
    elif kind == "no_iend":
        del data[start + length + 4 :]
    elif kind == "chunk_length_too_long":
        data[start - 8 : start - 4] = struct.pack(">I", length + 1000)
    return bytes(data)


@pytest.mark.parametrize(
    "kind",
    [
        "pixel_byte_flipped",
        "pixel_byte_flipped_crc_redone",
        "crc_flipped",
        "cut_in_idat",
        "no_iend",
        "chunk_length_too_long",
    ],
)
def test_damaged_png_is_never_decoded_by_libspng(tmp_path: Path, kind: str) -> None:
    """pyspng's own function turns libspng's CRC and Adler-32 checks off: a flipped pixel byte decodes to a wrong
    picture there. Through `spng.decode` every damaged file goes to OpenCV, which refuses it as before."""
    data = _damaged(kind)
    assert image_io._png_fast(np.frombuffer(data, np.uint8)) is None
    path = tmp_path / "damaged.png"
    path.write_bytes(data)
    opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if opencv is None:
        with pytest.raises(ImageReadError):
            read_image_with_size(path)
    else:  # OpenCV decodes what it can read (a missing IEND), and so do we, with its pixels
        np.testing.assert_array_equal(read_image_with_size(path)[0], _opencv_rgb(data))


def test_bad_crc_of_an_ancillary_chunk_has_the_outcome_it_had(tmp_path: Path, monkeypatch) -> None:
    meta = PngInfo()
    meta.add_text("camera", "line 3")
    data = bytearray(_png(Image.fromarray(_picture()), pnginfo=meta))
    start, length = _chunk_span(bytes(data), b"tEXt")
    data[start + length] ^= 0x01
    assert image_io._png_fast(np.frombuffer(bytes(data), np.uint8)) is None
    path = tmp_path / "a.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="not a readable image"):  # Pillow's header reader checks that CRC
        read_image_with_size(path)


def test_libspng_is_called_without_the_gil() -> None:
    """ctypes releases the GIL around a call into a `CDLL` (not a `PyDLL`): decoding threads run in parallel."""
    assert spng.available()
    lib = spng._library()
    assert isinstance(lib, ctypes.CDLL) and not isinstance(lib, ctypes.PyDLL)


def test_decoding_threads_give_the_same_pixels() -> None:
    datas = [_png(Image.fromarray(np.roll(_picture(96, 80), k, axis=1))) for k in range(8)]
    expected = [spng.decode(d) for d in datas]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = spng.decode(datas[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(datas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, image in enumerate(expected):
        np.testing.assert_array_equal(results[i], image)
        np.testing.assert_array_equal(image, _opencv_rgb(datas[i]))
