"""Tests for defect extraction, mask PNGs and overlay pictures."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from aoi_lightning.postprocess.defects import extract_defects
from aoi_lightning.postprocess.render import NG_COLOR, OK_COLOR, heat_colors, render_overlay, save_mask_png, write_png


def _read(path: Path) -> np.ndarray:
    return cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)


def test_diagonal_neighbours_are_one_defect() -> None:
    amap = np.zeros((6, 6), np.float32)
    amap[1, 1] = amap[2, 2] = amap[3, 3] = 5.0
    mask, defects = extract_defects(amap, 1.0)
    assert len(defects) == 1  # 4-connectivity would give three
    assert defects[0]["area"] == 3
    assert defects[0]["bbox"] == [1, 1, 3, 3]
    assert mask.dtype == np.uint8 and int(mask.sum()) == 3


def test_exact_geometry_and_values() -> None:
    amap = np.zeros((8, 10), np.float32)
    amap[2:5, 3:7] = 2.0  # rows 2..4, cols 3..6: 12 pixels
    amap[3, 5] = 8.0
    mask, defects = extract_defects(amap, 1.5)
    (d,) = defects
    assert d["component_id"] == 1
    assert d["area"] == 12
    assert d["bbox"] == [3, 2, 6, 4]
    assert d["centroid"] == pytest.approx([4.5, 3.0])
    assert d["max_anomaly_value"] == pytest.approx(8.0)
    assert d["mean_anomaly_value"] == pytest.approx((11 * 2.0 + 8.0) / 12)
    assert d["source"] == "pixel_threshold"
    assert np.array_equal(mask, (amap > 1.5).astype(np.uint8))
    # no original size: the original resolution is the model's
    assert d["bbox_original"] == d["bbox"] and d["area_original"] == 12
    assert d["centroid_original"] == pytest.approx(d["centroid"])


def test_threshold_is_strict_and_scaled_by_mult() -> None:
    amap = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    assert extract_defects(amap, 2.0)[0].tolist() == [[0, 0, 1, 1]]  # a value equal to the threshold is not a defect
    assert extract_defects(amap, 2.0, mult=1.5)[0].tolist() == [[0, 0, 0, 1]]
    assert extract_defects(amap, 2.0, mult=0.25)[0].tolist() == [[1, 1, 1, 1]]


def test_min_area_drops_components_from_list_and_mask() -> None:
    amap = np.zeros((12, 12), np.float32)
    amap[0, 0] = 1.0  # area 1
    amap[4:6, 4:6] = 1.0  # area 4
    amap[8:11, 8:11] = 1.0  # area 9
    mask, defects = extract_defects(amap, 0.5, min_defect_area=4)
    assert [d["area"] for d in defects] == [9, 4]
    assert [d["component_id"] for d in defects] == [1, 2]
    assert mask[0, 0] == 0 and int(mask.sum()) == 13
    assert extract_defects(amap, 0.5, min_defect_area=10)[1] == []


def test_order_is_area_then_top_then_left() -> None:
    amap = np.zeros((10, 10), np.float32)
    amap[6, 6:8] = 1.0  # area 2, lower
    amap[1, 6:8] = 1.0  # area 2, top right
    amap[1, 0:2] = 1.0  # area 2, top left
    amap[4, 2:5] = 1.0  # area 3
    _, defects = extract_defects(amap, 0.5)
    assert [(d["area"], d["bbox"][:2]) for d in defects] == [(3, [2, 4]), (2, [0, 1]), (2, [6, 1]), (2, [6, 6])]


def test_original_size_scaling_matches_the_saved_mask(tmp_path: Path) -> None:
    amap = np.zeros((8, 8), np.float32)
    amap[2:4, 1:3] = 3.0  # bbox [1, 2, 2, 3], area 4, centroid (1.5, 2.5)
    mask, (d,) = extract_defects(amap, 1.0, original_size=(16, 32))  # sy = 2, sx = 4
    assert d["bbox_original"] == [4, 4, 11, 7]
    assert d["area_original"] == 32
    assert d["centroid_original"] == pytest.approx([(1.5 + 0.5) * 4 - 0.5, (2.5 + 0.5) * 2 - 0.5])
    big = _read(save_mask_png(mask, (16, 32), tmp_path / "m.png"))
    assert big.shape == (16, 32) and set(np.unique(big).tolist()) == {0, 255}
    ys, xs = np.nonzero(big)
    assert [xs.min(), ys.min(), xs.max(), ys.max()] == d["bbox_original"]
    assert len(xs) == d["area_original"]


def test_bbox_original_stays_inside_the_image_when_shrinking() -> None:
    amap = np.zeros((10, 10), np.float32)
    amap[7:10, 7:10] = 1.0
    _, (d,) = extract_defects(amap, 0.5, original_size=(3, 3))
    x0, y0, x1, y1 = d["bbox_original"]
    assert 0 <= x0 <= x1 <= 2 and 0 <= y0 <= y1 <= 2


def test_no_defects_and_json_ready_types() -> None:
    mask, defects = extract_defects(np.zeros((1, 5, 5), np.float32), 1.0)
    assert mask.shape == (5, 5) and defects == []
    amap = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    _, defects = extract_defects(amap, 0.8, original_size=(33, 47))
    assert defects
    assert json.loads(json.dumps(defects)) == defects
    for d in defects:
        assert all(type(v) is int for v in d["bbox"] + d["bbox_original"] + [d["area"], d["area_original"]])
        assert all(type(v) is float for v in d["centroid"] + d["centroid_original"])


def test_bad_threshold_or_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="finite"):
        extract_defects(np.zeros((4, 4), np.float32), float("nan"))
    with pytest.raises(ValueError, match="shape"):
        extract_defects(np.zeros((2, 4, 4), np.float32), 1.0)


def test_heat_scale_is_fixed_by_the_threshold() -> None:
    amap = np.array([[0.0, 1.0, 2.0, 4.0]], np.float32)
    colors = heat_colors(amap, 1.0, (1, 4))  # scale 0..4: values 2 and 4 differ
    assert not np.array_equal(colors[0, 2], colors[0, 3])
    low = heat_colors(np.full((2, 2), 0.1, np.float32), 1.0, (2, 2))  # a good part stays at the blue end
    assert low[0, 0, 0] > low[0, 0, 2]


@pytest.mark.parametrize(("score", "color"), [(0.5, OK_COLOR), (2.0, NG_COLOR)])
def test_overlay_at_original_size_with_verdict_colour(score: float, color: tuple[int, int, int]) -> None:
    image = np.full((90, 120, 3), 128, np.uint8)
    amap = np.zeros((32, 32), np.float32)
    amap[10:20, 10:20] = 5.0
    mask, defects = extract_defects(amap, 1.0, original_size=(90, 120))
    out = render_overlay(image, amap, mask, defects, score, 1.0, 1.0)
    assert out.shape == (90, 120, 3) and out.dtype == np.uint8
    text_area = out[:20, :110].reshape(-1, 3)
    assert (np.abs(text_area.astype(int) - np.array(color)).sum(axis=1) < 60).any()


def test_png_writing_to_non_ascii_path_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "Prüfung ü" / "bild 1.png"
    write_png(target, np.full((5, 7, 3), 200, np.uint8))
    assert _read(target).shape == (5, 7, 3)
    assert [p.name for p in target.parent.iterdir()] == ["bild 1.png"]
