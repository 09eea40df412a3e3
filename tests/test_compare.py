"""`aoi compare`: the table and report agree with each run's files; samples, grids and the missing-predictions case."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from aoi_lightning.compare.table import ROWS, best_labels
from aoi_lightning.fileio import read_json

# the tiny tree has two images per defect type (test + val): the mild and the severe case
DEFECT_CASES = ("mild", "severe")


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("predictions", "eval", "logs"))
    return dst


@pytest.fixture(scope="module")
def compared(tmp_path_factory, aoi_cli, padim_run: Path, patchcore_run: Path):
    """A: PaDiM with predictions (`aoi predict` on a copy), B: PatchCore without, overlays drawn from its model."""
    root = tmp_path_factory.mktemp("compare")
    a, b = _copy(padim_run, root / "padim"), _copy(patchcore_run, root / "patchcore")
    code = aoi_cli(["predict", "--config", a / "config.yaml", "--ckpt_path", a / "weights" / "model.ckpt",
                    "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])  # fmt: skip
    assert code == 0
    out = root / "out"
    assert aoi_cli(["compare", "--run_dir_a", a, "--run_dir_b", b, "--output_dir", out, "--render_missing"]) == 0
    return a, b, out


def test_report_values_are_those_of_each_run(compared) -> None:
    a, b, out = compared
    report = read_json(out / "comparison_report.json")
    assert [r["label"] for r in report["runs"]] == ["A", "B"]
    assert [r["model"] for r in report["runs"]] == ["padim", "patchcore"]
    for run, entry in zip((a, b), report["runs"]):
        metrics, meta = read_json(run / "metrics.json"), read_json(run / "meta.json")
        values = entry["values"]
        assert set(values) == {row.key for row in ROWS}
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert values[f"full_test.{key}"] == metrics["full_test"][key]
        for key in ("image_f1", "pixel_f1", "false_reject_rate", "escape_rate"):
            assert values[f"test.{key}"] == metrics["test"][key]
        timings = meta["timings"]
        assert values["timing.fit_s"] == timings["fit_s"]
        assert values["timing.model_fit_s"] == pytest.approx(
            timings["feature_extraction_s"] + timings["fit_finalize_s"]
        )
        assert values["timing.ms_per_image"] == pytest.approx(
            1000 * timings["score_train_s"] / meta["data"]["num_train"]
        )
        assert values["size.checkpoint_mb"] == (run / "weights" / "model.ckpt").stat().st_size / 1e6
        onnx = run / "export" / "model.onnx"
        assert values["size.onnx_mb"] == (onnx.stat().st_size / 1e6 if onnx.is_file() else None)
        assert entry["metrics"] == metrics and entry["thresholds"] == read_json(run / "thresholds.json")
    for row in report["table"]:
        spec = next(r.fmt for r in ROWS if r.key == row["key"])
        assert row["best"] == best_labels(row["values"], row["better"], spec)
    assert report["runs"][0]["predictions"]["available"] and not report["runs"][1]["predictions"]["available"]


def test_markdown_table_marks_the_best_value(compared) -> None:
    _, _, out = compared
    report = read_json(out / "comparison_report.json")
    text = (out / "comparison_table.md").read_text(encoding="utf-8")
    for row in report["table"]:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row['label']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert len(cells) == 2
        for label, cell in zip("AB", cells):
            assert cell.startswith("**") == (label in row["best"]), (row["label"], cells)
    assert "## Per defect type" in text


def test_best_labels_direction_and_ties() -> None:
    assert best_labels({"A": 0.9, "B": 0.95}, "higher", "{:.4f}") == ["B"]
    assert best_labels({"A": 0.1, "B": 0.05}, "lower", "{:.2%}") == ["B"]
    assert best_labels({"A": 0.99991, "B": 0.99994}, "higher", "{:.4f}") == ["A", "B"]  # tie at the shown precision
    assert best_labels({"A": 1.0, "B": None}, "higher", "{:.4f}") == []


def test_samples_grids_and_markdown(compared) -> None:
    a, _, out = compared
    report = read_json(out / "comparison_report.json")
    samples = report["samples"]
    types = sorted(read_json(a / "metrics.json")["per_defect_type"])
    names = {s["name"] for s in samples}
    assert {f"{t}_{c}" for t in types for c in DEFECT_CASES} <= names
    assert any(s["kind"] == "good" for s in samples)
    for s in samples:
        grid = cv2.imread(str(out / s["grid"]), cv2.IMREAD_COLOR)
        assert grid is not None and grid.shape[1] > 2 * grid.shape[0]  # image + two models side by side
        assert s["runs"]["A"]["source"] == "predictions"
        assert s["runs"]["B"]["source"] == "rendered from weights/model.ckpt"
        for label in "AB":
            assert (out / s["runs"][label]["overlay"]).is_file()
    for t in types:  # mild <= severe by ground-truth defect area
        measures = [next(s["measure"] for s in samples if s["name"] == f"{t}_{c}") for c in DEFECT_CASES]
        assert measures == sorted(measures)
        assert next(s for s in samples if s["name"] == f"{t}_mild")["measure_source"].startswith("ground-truth")
    md = (out / "sample_visualizations.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert links and all((out / link).is_file() for link in links)
    assert {f"comparison_grids/{n}.png" for n in names} <= set(links)
    assert sorted(p.parent.name for p in (out / "samples").glob("*/*.png"))[0] == "A-padim"


def test_missing_predictions_still_give_table_and_report(aoi_cli, compared, padim_run: Path, tmp_path: Path) -> None:
    _, b, _ = compared
    c = _copy(padim_run, tmp_path / "third")
    (c / "meta.json").unlink()
    out = tmp_path / "out"
    assert aoi_cli(["compare", "--run_dir_a", c, "--run_dir_b", b, "--run_dirs", padim_run, "--output_dir", out]) == 0
    report = read_json(out / "comparison_report.json")
    assert [r["label"] for r in report["runs"]] == ["A", "B", "C"]
    assert report["runs"][0]["values"]["timing.fit_s"] is None and report["runs"][0]["values"]["full_test.image_auroc"]
    table = (out / "comparison_table.md").read_text(encoding="utf-8")
    assert "n/a" in table and "meta.json not found" in table
    md = (out / "sample_visualizations.md").read_text(encoding="utf-8")
    assert "**Missing:**" in md and "no predictions" in md and "aoi predict" in md
    assert all(s["runs"][label]["overlay"] is None for s in report["samples"] for label in "ABC")
    grid = cv2.imread(str(out / report["samples"][0]["grid"]), cv2.IMREAD_COLOR)
    assert grid is not None and np.ptp(grid) > 0


def test_compare_user_errors(aoi_cli, padim_run: Path, tmp_path: Path, capsys) -> None:
    assert aoi_cli(["compare", "--run_dir_a", padim_run, "--run_dir_b", padim_run, "--output_dir", tmp_path]) == 2
    assert "same run directory" in capsys.readouterr().err
    code = aoi_cli(["compare", "--run_dir_a", padim_run, "--run_dir_b", tmp_path / "nope", "--output_dir", tmp_path])
    err = capsys.readouterr().err
    assert code == 2 and "run directory not found" in err and "Traceback" not in err


def test_runs_on_different_data_are_noted(aoi_cli, compared, padim_run: Path, tmp_path: Path) -> None:
    """Same category name, another data root (e.g. another line's images): the table says the metrics differ in
    what they measure; runs of one data set get no such note."""
    import json

    _, b, out = compared
    assert "different data" not in (out / "comparison_table.md").read_text(encoding="utf-8")
    other = _copy(padim_run, tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text(encoding="utf-8"))
    meta["data"]["root"] = "/lines/line2/images"
    (other / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    assert aoi_cli(["compare", "--run_dir_a", other, "--run_dir_b", b, "--output_dir", tmp_path / "out"]) == 0
    table = (tmp_path / "out" / "comparison_table.md").read_text(encoding="utf-8")
    assert "fitted and tested on different data (" in table and "/lines/line2/images" in table
