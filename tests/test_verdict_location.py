"""Verdict and location agree: an NG image always carries a located region, an OK image none (records, masks,
overlays, report.json), with the strict tie rule."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from aoi_lightning.fileio import read_json, read_jsonl
from aoi_lightning.postprocess.defects import PEAK_FRACTION, peak_region
from aoi_lightning.postprocess.outputs import ModelFacts, OutputOptions, PredictionOutputs
from aoi_lightning.postprocess.prediction import postprocess_prediction
from aoi_lightning.postprocess.render import BOX_COLOR, PEAK_BOX_COLOR, render_overlay

FACTS = ModelFacts("padim", "board", (64, 64), image_threshold=35.0, pixel_threshold=45.0)


def _board_map() -> np.ndarray:
    """A grey board's anomaly map (about 10) with a bright square blob (30, peak 32) below the pixel threshold
    (45), and a separate speck at 22 that is above half maximum but not connected to the blob."""
    amap = np.full((64, 64), 10.0, np.float32)
    amap[20:28, 30:38] = 30.0  # 8 x 8 blob
    amap[23, 33] = 32.0  # the peak
    amap[50, 5] = 22.0  # above the half-maximum level (10 + 0.5 * 22 = 21), not connected
    return amap


def _rgb(h: int = 64, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), 128, np.uint8)


def _color_pixels(picture: np.ndarray, color: tuple[int, int, int]) -> int:
    return int(np.all(picture == np.array(color, np.uint8), axis=-1).sum())


def test_ng_without_pixels_above_threshold_gets_the_peak_region() -> None:
    amap = _board_map()
    result = postprocess_prediction("board.png", 40.0, amap, FACTS, OutputOptions(), (128, 128), image_rgb=_rgb())
    rec = result.record
    assert rec["label"] == "NG" and rec["is_anomaly"] is True
    assert rec["num_defects"] == 1 and rec["total_defect_area"] == 64
    (d,) = rec["defects"]
    assert d["source"] == "peak" and d["component_id"] == 1
    assert d["bbox"] == [30, 20, 37, 27] and d["area"] == 64  # the blob, not the speck
    assert d["max_anomaly_value"] == pytest.approx(32.0)
    assert d["bbox_original"] == [60, 40, 75, 55] and d["area_original"] == 256
    expected = np.zeros((64, 64), np.uint8)
    expected[20:28, 30:38] = 1
    assert np.array_equal(result.mask, expected)
    # the overlay draws the region's box in the peak colour
    assert _color_pixels(result.overlay, PEAK_BOX_COLOR) > 0 and _color_pixels(result.overlay, BOX_COLOR) == 0


def test_peak_region_rule_half_maximum_above_the_map_minimum() -> None:
    amap = np.array([[0.0, 1.0, 4.9, 5.0, 9.0, 10.0, 5.0, 0.0, 8.0]], np.float32)
    # min 0, peak 10: pixels >= 5.0 connected to the peak (index 5): indices 3..6; index 8 is not connected
    mask, (d,) = peak_region(amap)
    assert PEAK_FRACTION == 0.5
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 0, 0]] and d["bbox"] == [3, 0, 6, 0] and d["source"] == "peak"
    # a constant map: the whole image; NaN counts as the minimum
    mask, (d,) = peak_region(np.full((3, 4), 2.0, np.float32))
    assert int(mask.sum()) == 12 and d["area"] == 12
    amap = np.array([[np.nan, 1.0, 3.0], [0.0, 0.0, 2.5]], np.float32)
    mask, (d,) = peak_region(amap)
    assert mask.tolist() == [[0, 0, 1], [0, 0, 1]]


def test_ok_image_with_pixels_above_threshold_has_no_defect_no_mask_no_box(tmp_path: Path) -> None:
    amap = np.zeros((32, 32), np.float32)
    amap[18:28, 18:28] = 100.0  # far above the pixel threshold (below the verdict text)
    facts = ModelFacts("padim", "c", (32, 32), image_threshold=1.0, pixel_threshold=2.0)
    image = _rgb(48, 64)
    result = postprocess_prediction("ok.png", 0.5, amap, facts, OutputOptions(), (48, 64), image_rgb=image)
    assert result.record["label"] == "OK" and result.record["defects"] == [] and result.record["num_defects"] == 0
    assert result.record["total_defect_area"] == 0 and not result.mask.any()
    plain = render_overlay(image, amap, np.zeros((32, 32), np.uint8), [], 0.5, 1.0, 2.0)
    assert np.array_equal(result.overlay, plain)  # no outline, no box
    assert _color_pixels(result.overlay, BOX_COLOR) == 0 and _color_pixels(result.overlay, PEAK_BOX_COLOR) == 0
    # ... and the same image judged NG would have had its box: the check above can fail
    ng = postprocess_prediction("ng.png", 1.5, amap, facts, OutputOptions(), (48, 64), image_rgb=image)
    assert ng.record["defects"][0]["source"] == "pixel_threshold" and _color_pixels(ng.overlay, BOX_COLOR) > 0
    # the mask file of the OK image is empty
    with PredictionOutputs(tmp_path, facts, OutputOptions()) as writer:
        rec = writer.write("ok.png", 0.5, amap, (48, 64), image_rgb=image)
    mask = cv2.imdecode(np.fromfile(str(tmp_path / rec["mask_path"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (48, 64) and not mask.any()


def test_min_defect_area_never_leaves_an_ng_image_without_a_region() -> None:
    amap = np.zeros((16, 16), np.float32)
    amap[2, 2] = 5.0  # one-pixel component above the threshold, the peak
    amap[8:10, 8:10] = 3.0  # 4 pixels above the threshold
    facts = ModelFacts("padim", "c", (16, 16), image_threshold=1.0, pixel_threshold=1.0)
    kept = postprocess_prediction("a.png", 2.0, amap, facts, OutputOptions(min_defect_area=4), (16, 16))
    assert [(d["source"], d["area"]) for d in kept.record["defects"]] == [("pixel_threshold", 4)]
    fallback = postprocess_prediction("a.png", 2.0, amap, facts, OutputOptions(min_defect_area=10), (16, 16))
    (d,) = fallback.record["defects"]
    assert d["source"] == "peak" and d["bbox"] == [2, 2, 2, 2] and int(fallback.mask.sum()) == 1


def test_strict_tie_rule() -> None:
    facts = ModelFacts("padim", "c", (1, 4), image_threshold=2.0, pixel_threshold=2.0)
    amap = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    at = postprocess_prediction("a.png", 2.0, amap, facts, OutputOptions(), (1, 4))
    assert at.record["label"] == "OK" and not at.mask.any()  # score == image threshold: OK
    above = postprocess_prediction("a.png", 2.0001, amap, facts, OutputOptions(), (1, 4))
    assert above.record["label"] == "NG" and above.mask.tolist() == [[0, 0, 1, 1]]  # value == threshold: not a defect


@pytest.mark.parametrize("mult", ["100", "0.01", "1.0"])
@pytest.mark.parametrize("fixture", ["padim_run", "patchcore_run"])
def test_aoi_run_ng_iff_located_region(
    fixture: str, mult: str, request, aoi_cli, tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    """On a real (tiny synthetic) run: for every record NG <=> num_defects >= 1, an OK image has an empty mask,
    and report.json counts agree. mult 100: no pixel passes, every NG image has a peak region; mult 0.01:
    nearly every pixel passes, OK images still have none."""
    run = request.getfixturevalue(fixture)
    test_dir = tiny_mvtec_root / "synthetic" / "test"
    out = tmp_path / "out"
    argv = ["run", "--model_dir", run, "--input_dir", test_dir, "--output_dir", out, "--recursive",
            "--pixel_threshold_mult", mult, "--no_progress", "--device", "cpu"]  # fmt: skip
    assert aoi_cli(argv) == 0
    records = [r for r in read_jsonl(out / "preds.jsonl") if "error" not in r]
    assert records and {r["label"] for r in records} == {"OK", "NG"}
    for rec in records:
        assert rec["is_anomaly"] == (rec["pred_score"] > rec["image_threshold"])
        assert rec["is_anomaly"] == (rec["num_defects"] >= 1), rec
        assert rec["num_defects"] == len(rec["defects"])
        mask = cv2.imdecode(np.fromfile(str(out / rec["mask_path"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert bool(mask.any()) == rec["is_anomaly"]
        sources = {d["source"] for d in rec["defects"]}
        assert sources <= {"pixel_threshold", "peak"}
        if mult == "100":
            assert sources <= {"peak"} and rec["num_defects"] <= 1
        if "peak" in sources:
            assert rec["num_defects"] == 1
    report = read_json(out / "report.json")
    ng = [r for r in records if r["num_defects"] >= 1]
    assert report["num_ng"] == len(ng) == sum(r["is_anomaly"] for r in records)
    assert report["num_ok"] == len(records) - len(ng)
    assert report["defect_stats"]["total_defects"] == sum(r["num_defects"] for r in records)
