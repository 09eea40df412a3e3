"""Tests for the built-in synthetic MVTec-layout data set."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from aoi_lightning.data.synthetic import (
    DEFAULT_CATEGORY,
    DEFECT_TYPES,
    default_cache_dir,
    ensure_synthetic,
    generate_synthetic_mvtec,
)

SMALL = {"n_train": 5, "n_test_good": 3, "n_test_per_defect": 3, "image_size": 128, "seed": 7}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_mvtec(tmp_path_factory.mktemp("syn"), **SMALL)


def test_defect_types_exported() -> None:
    assert DEFAULT_CATEGORY == "synthetic"
    assert isinstance(DEFECT_TYPES, tuple) and len(DEFECT_TYPES) >= 3
    assert len(set(DEFECT_TYPES)) == len(DEFECT_TYPES)


def test_layout_and_counts(small_root: Path) -> None:
    cat = small_root / DEFAULT_CATEGORY
    assert sorted(p.name for p in small_root.iterdir()) == [DEFAULT_CATEGORY]  # no temp dirs left behind
    assert (cat / "README.txt").is_file()
    assert json.loads((cat / ".complete").read_text())["seed"] == SMALL["seed"]
    train = sorted((cat / "train" / "good").glob("*.png"))
    assert [p.name for p in train] == [f"{i:03d}.png" for i in range(SMALL["n_train"])]
    assert len(list((cat / "test" / "good").glob("*.png"))) == SMALL["n_test_good"]
    assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(("good", *DEFECT_TYPES))
    assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    for defect in DEFECT_TYPES:
        imgs = sorted((cat / "test" / defect).glob("*.png"))
        masks = sorted((cat / "ground_truth" / defect).glob("*.png"))
        assert len(imgs) == SMALL["n_test_per_defect"]
        assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in imgs]
    img = _read_rgb(train[0])
    assert img.shape == (SMALL["image_size"], SMALL["image_size"], 3) and img.dtype == np.uint8


def test_good_images_vary(small_root: Path) -> None:
    paths = sorted((small_root / DEFAULT_CATEGORY / "train" / "good").glob("*.png"))
    imgs = [_read_rgb(p).astype(np.int16) for p in paths]
    for a, b in zip(imgs[:-1], imgs[1:], strict=True):
        assert np.abs(a - b).mean() > 0.5


def test_deterministic(tmp_path: Path, small_root: Path) -> None:
    a = _files(generate_synthetic_mvtec(tmp_path / "a", **SMALL))
    b = _files(generate_synthetic_mvtec(tmp_path / "b", **SMALL))
    assert a == b
    assert a == _files(small_root)
    c = _files(generate_synthetic_mvtec(tmp_path / "c", **{**SMALL, "seed": 8}))
    assert c.keys() == a.keys() and c != a


def test_masks_binary_nonempty_and_local(small_root: Path) -> None:
    cat = small_root / DEFAULT_CATEGORY
    goods = np.stack(
        [
            _read_rgb(p).astype(np.float32)
            for split in ("train", "test")
            for p in sorted((cat / split / "good").glob("*"))
        ]
    )
    for defect in DEFECT_TYPES:
        for img_path in sorted((cat / "test" / defect).glob("*.png")):
            img = _read_rgb(img_path)
            mask = _read_rgb(cat / "ground_truth" / defect / f"{img_path.stem}_mask.png")
            assert mask.ndim == 2 and mask.dtype == np.uint8
            assert mask.shape == img.shape[:2]
            assert set(np.unique(mask).tolist()) == {0, 255}
            inside = mask > 0
            assert 0.001 < inside.mean() < 0.08, (defect, img_path.name, inside.mean())
            x = img.astype(np.float32)
            # Nearest good template (whole image): the defect region stands out against it.
            nearest = goods[np.argmin(np.abs(goods - x).mean(axis=(1, 2, 3)))]
            diff = np.abs(x - nearest).mean(axis=2)
            d_in, d_out = float(diff[inside].mean()), float(diff[~inside].mean())
            assert d_in > 1.5 * d_out and d_in > 10.0, (defect, img_path.name, d_in, d_out)
            # Per-pixel nearest good template: nothing in the good set explains the masked pixels.
            diff = np.abs(goods - x).mean(axis=3).min(axis=0)
            d_in, d_out = float(diff[inside].mean()), float(diff[~inside].mean())
            assert d_in > 3.0 * d_out, (defect, img_path.name, d_in, d_out)


def test_mask_is_exactly_the_changed_pixels(small_root: Path) -> None:
    # White-box: the defect-free reference of test/<defect>/i is the good render drawn from the same seed stream.
    from aoi_lightning.data.synthetic import _render_good, _rng

    cat = small_root / DEFAULT_CATEGORY
    for d, defect in enumerate(DEFECT_TYPES):
        for i in range(SMALL["n_test_per_defect"]):
            img = _read_rgb(cat / "test" / defect / f"{i:03d}.png")[..., ::-1]
            mask = _read_rgb(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
            ref = _render_good(_rng(SMALL["seed"], 10 + d, i), SMALL["image_size"])
            np.testing.assert_array_equal(np.any(img != ref, axis=2), mask > 0)


def test_ensure_reuses_and_regenerates(tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path, **SMALL)
    assert root == tmp_path
    marker = tmp_path / DEFAULT_CATEGORY / ".complete"
    png = tmp_path / DEFAULT_CATEGORY / "train" / "good" / "000.png"
    before = (marker.stat().st_mtime_ns, png.stat().st_mtime_ns, png.stat().st_ino)
    assert ensure_synthetic(tmp_path, **SMALL) == tmp_path
    assert (marker.stat().st_mtime_ns, png.stat().st_mtime_ns, png.stat().st_ino) == before

    ensure_synthetic(tmp_path, **{**SMALL, "n_train": 3})
    assert json.loads(marker.read_text())["n_train"] == 3
    assert len(list((tmp_path / DEFAULT_CATEGORY / "train" / "good").glob("*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_CATEGORY]


def test_ensure_regenerates_incomplete_tree(tmp_path: Path) -> None:
    cat = tmp_path / DEFAULT_CATEGORY
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "train" / "good" / "junk.png").write_bytes(b"half written")
    ensure_synthetic(tmp_path, **SMALL)
    assert (cat / ".complete").is_file()
    assert not (cat / "train" / "good" / "junk.png").exists()


def test_ensure_concurrent(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            ensure_synthetic(tmp_path, **SMALL)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_CATEGORY]
    assert (tmp_path / DEFAULT_CATEGORY / ".complete").is_file()


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AOI_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    root = ensure_synthetic(**SMALL)
    assert root == tmp_path / "cache" / "synthetic_v1"
    assert (root / DEFAULT_CATEGORY / ".complete").is_file()

    monkeypatch.delenv("AOI_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "aoi_lightning"


def test_invalid_args(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        ensure_synthetic(tmp_path, bogus=1)
    with pytest.raises(ValueError):
        generate_synthetic_mvtec(tmp_path, image_size=16)
    with pytest.raises(ValueError):
        generate_synthetic_mvtec(tmp_path, category="../escape")
