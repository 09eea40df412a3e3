"""Tests for preds.jsonl records, report.json, output names and the shared output writer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from aoi_lightning.fileio import output_name
from aoi_lightning.postprocess.outputs import (
    ModelFacts,
    OutputOptions,
    PredictionOutputs,
    finish_outputs,
    merge_rank_files,
)
from aoi_lightning.postprocess.records import build_report, error_record, prediction_record

RECORD_KEYS = {
    "image_path", "model", "category", "image_size", "model_input_size", "gt_label", "pred_score",
    "image_threshold", "pixel_threshold", "effective_pixel_threshold", "label", "is_anomaly", "num_defects",
    "total_defect_area", "defects",
}  # fmt: skip
DEFECT_KEYS = {
    "component_id", "source", "area", "bbox", "centroid", "max_anomaly_value", "mean_anomaly_value",
    "area_original", "bbox_original", "centroid_original",
}  # fmt: skip
REPORT_KEYS = {
    "model", "category", "run_id", "thresholds", "num_images", "num_ok", "num_ng", "ng_rate", "ok_rate",
    "score_stats", "defect_stats", "num_errors", "created_at",
}  # fmt: skip
SAFE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
FACTS = ModelFacts(
    "patchcore", "widget", (32, 32), image_threshold=1.0, pixel_threshold=2.0, thresholds={"quantile_image": 0.99}
)


def _record(score: float, areas: list[int], **kwargs) -> dict:
    defects = [{"area": a} for a in areas]
    return prediction_record("x.png", "padim", "c", (10, 20), (8, 8), None, score, 1.0, 2.0, 0.5, defects, **kwargs)


def test_record_key_set_and_decision() -> None:
    rec = _record(1.5, [3, 4], mask_path="masks/x.png", overlay_path="overlays/x.png")
    assert set(rec) == RECORD_KEYS | {"mask_path", "overlay_path"}
    assert rec["label"] == "NG" and rec["is_anomaly"] is True
    assert _record(1.0, [])["label"] == "OK"  # score == threshold is OK (strict rule)
    assert rec["effective_pixel_threshold"] == pytest.approx(1.0)
    assert rec["num_defects"] == 2 and rec["total_defect_area"] == 7
    assert rec["image_size"] == [10, 20] and rec["model_input_size"] == [8, 8]
    ok = _record(0.999, [])
    assert set(ok) == RECORD_KEYS and ok["label"] == "OK" and ok["is_anomaly"] is False
    assert _record(0.5, [])["gt_label"] is None
    assert prediction_record("a", "m", "c", (1, 1), (1, 1), -1, 0.0, 1.0, 1.0, 1.0, [])["gt_label"] is None
    assert prediction_record("a", "m", "c", (1, 1), (1, 1), 1, 0.0, 1.0, 1.0, 1.0, [])["gt_label"] == 1


def test_error_record_is_one_line() -> None:
    assert error_record("bad.png", "broken\nmore detail") == {"image_path": "bad.png", "error": "broken"}


def test_report_counts_rates_and_stats() -> None:
    records = [
        _record(3.0, [10, 5]),
        _record(2.0, [7]),
        _record(0.5, [2]),
        _record(0.2, []),
        error_record("bad.png", "unreadable"),
    ]
    report = build_report(records, "padim", "c", "r1", {"image_threshold": 1.0, "pixel_threshold": 2.0})
    assert set(report) == REPORT_KEYS
    assert report["thresholds"] == {
        "image_threshold": 1.0,
        "pixel_threshold": 2.0,
        "quantile_image": None,
        "quantile_pixel": None,
    }
    assert (report["num_images"], report["num_ok"], report["num_ng"], report["num_errors"]) == (4, 2, 2, 1)
    assert report["ng_rate"] == 0.5 and report["ok_rate"] == 0.5
    assert report["score_stats"] == pytest.approx({"min": 0.2, "max": 3.0, "mean": 5.7 / 4})
    assert report["defect_stats"] == pytest.approx(
        {"total_defects": 4, "avg_defects_per_ng": 1.5, "max_defect_area": 10, "avg_total_defect_area": 11.0}
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["created_at"])
    json.dumps(report, allow_nan=False)


@pytest.mark.parametrize("records", [[], [error_record("a.png", "x"), error_record("b.png", "y")]])
def test_report_without_images(records: list[dict]) -> None:
    report = build_report(records, "padim", "c", "r1", {"image_threshold": float("nan")})
    assert report["num_images"] == report["num_ok"] == report["num_ng"] == 0
    assert report["ng_rate"] == 0.0 and report["ok_rate"] == 0.0
    assert report["defect_stats"] is None and "score_stats" not in report
    assert report["num_errors"] == len(records)
    assert report["thresholds"]["image_threshold"] is None  # NaN never reaches the JSON


def test_report_without_ng_images() -> None:
    report = build_report([_record(0.1, [3])], "m", "c", "r", {})
    assert report["defect_stats"] == {
        "total_defects": 1,
        "avg_defects_per_ng": 0.0,
        "max_defect_area": 3,
        "avg_total_defect_area": 0.0,
    }


def test_output_names_are_unique_and_safe(tmp_path: Path) -> None:
    root = tmp_path / "in"
    paths = [
        root / "a" / "0001.png", root / "b" / "0001.png", root / "0001.png", root / "0001.jpg", root / "a__0001.png",
        root / "sub dir" / "Prüfung 1.png", root / "sub_dir" / "Prüfung_1.png", root / ".hidden.png",
        root / ("x" * 200) / "y.png", root / "A.png", root / "a.png",
    ]  # fmt: skip
    names = [output_name(p, root) for p in paths]
    assert len({n.lower() for n in names}) == len(names)  # unique on case-insensitive disks and shares too
    assert all(SAFE.match(n) and len(n) < 200 for n in names), names
    assert names[0] == "a__0001" and names[2] == "0001"  # plain relative paths stay readable
    assert output_name(root / "a" / "0001.png", root) == names[0]  # deterministic
    outside = output_name(tmp_path / "elsewhere" / "0001.png", root)
    assert "/" not in outside and outside != names[2] and SAFE.match(outside)
    assert output_name("../../etc/passwd.png", None) != "passwd"


def test_prediction_outputs_write_files_inside_the_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    amap = np.zeros((32, 32), np.float32)
    amap[4:12, 4:12] = 5.0
    image = np.full((48, 64, 3), 90, np.uint8)
    with PredictionOutputs(out, FACTS, OutputOptions(), input_root=tmp_path / "in") as writer:
        rec = writer.write(str(tmp_path / "in" / "s p" / "ä.png"), 1.5, amap, (48, 64), gt_label=1, image_rgb=image)
        writer.write_error(str(tmp_path / "in" / "bad.png"), "not an image")
        lines = (out / "preds.jsonl").read_text(encoding="utf-8").splitlines()  # flushed before close
    assert len(lines) == 2 and json.loads(lines[0]) == rec
    assert set(rec) == RECORD_KEYS | {"mask_path", "overlay_path"}
    assert set(rec["defects"][0]) == DEFECT_KEYS
    for key in ("mask_path", "overlay_path"):
        path = (out / rec[key]).resolve()
        assert path.is_file() and path.is_relative_to(out.resolve())
    mask = cv2.imdecode(np.fromfile(str(out / rec["mask_path"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (48, 64) and int((mask == 255).sum()) > 0
    assert rec["num_defects"] == 1 and rec["label"] == "NG" and rec["gt_label"] == 1
    report = finish_outputs(out, [json.loads(line) for line in lines], FACTS, "r9")
    assert json.loads((out / "report.json").read_text()) == report
    assert (report["num_images"], report["num_errors"], report["thresholds"]["quantile_image"]) == (1, 1, 0.99)


def test_outputs_without_masks_or_overlays_omit_the_keys(tmp_path: Path) -> None:
    opts = OutputOptions(save_masks=False, save_overlays=False, pixel_threshold_mult=2.0)
    with PredictionOutputs(tmp_path, FACTS, opts) as writer:
        rec = writer.write("p.png", 0.5, np.full((32, 32), 3.0, np.float32), (32, 32), image_rgb=None)
    assert set(rec) == RECORD_KEYS and rec["effective_pixel_threshold"] == 4.0 and rec["num_defects"] == 0
    assert not (tmp_path / "masks").exists() and not (tmp_path / "overlays").exists()


def test_merge_rank_files_orders_by_index_and_drops_duplicates(tmp_path: Path) -> None:
    (tmp_path / "preds.rank0.jsonl").write_text('{"index": 2, "image_path": "c"}\n{"index": 0, "image_path": "a"}\n')
    (tmp_path / "preds.rank1.jsonl").write_text(
        '{"index": 1, "image_path": "b"}\n{"index": 2, "image_path": "c"}\n{"ind'
    )
    files = [tmp_path / "preds.rank0.jsonl", tmp_path / "preds.rank1.jsonl"]
    records = merge_rank_files(tmp_path, files)
    assert records == [{"image_path": "a"}, {"image_path": "b"}, {"image_path": "c"}]
    assert (tmp_path / "preds.jsonl").read_text().count("\n") == 3
    assert not any(f.exists() for f in files)


def test_missing_thresholds_and_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="aoi fit"):
        ModelFacts("padim", "c", (32, 32), float("nan"), float("nan"))
    with pytest.raises(ValueError, match="pixel_threshold_mult"):
        OutputOptions(pixel_threshold_mult=0.0)
    with pytest.raises(ValueError, match="min_defect_area"):
        OutputOptions(min_defect_area=-1)
