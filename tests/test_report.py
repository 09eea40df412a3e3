"""The run's HTML report: curve math against scikit-learn, the page written during fit and by `aoi report`."""

from __future__ import annotations

import base64
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from aoi_lightning.fileio import read_json, read_jsonl
from aoi_lightning.report.build import build_report_data, pick_gallery
from aoi_lightning.report.html import render_html
from aoi_lightning.report.plots import average_precision, pr_curve, roc_curve

SECTIONS = ("Metrics", "Thresholds", "ROC", "histogram", "Per defect type", "false positives", "false negatives")


class PageParser(HTMLParser):
    """Collects headings, image sources, table ids and any tag that could reach the network or run code."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.tables: list[str] = []
        self.forbidden: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2"):
            self._in_heading = True
            self.headings.append("")
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table" and attrs.get("id"):
            self.tables.append(attrs["id"])
        if tag in ("script", "link", "iframe", "object", "embed") or any(
            str(v).startswith(("http:", "https:", "//")) for v in attrs.values() if v
        ):
            self.forbidden.append(tag)

    def handle_endtag(self, tag):
        if tag in ("h1", "h2"):
            self._in_heading = False

    def handle_data(self, data):
        if self._in_heading:
            self.headings[-1] += data


def parse(path: Path) -> tuple[PageParser, str]:
    text = path.read_text(encoding="utf-8")
    page = PageParser()
    page.feed(text)
    return page, text


def decode_data_uri(src: str) -> np.ndarray | None:
    header, _, payload = src.partition(",")
    assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
    return cv2.imdecode(np.frombuffer(base64.b64decode(payload), np.uint8), cv2.IMREAD_COLOR)


def assert_self_contained_report(path: Path, metrics: dict) -> PageParser:
    page, text = parse(path)
    assert not page.forbidden, page.forbidden
    assert "url(" not in text and "@import" not in text
    for word in SECTIONS:
        assert any(word.lower() in h.lower() for h in page.headings), (word, page.headings)
    assert {"metrics", "per-defect-type"} <= set(page.tables)
    assert len(page.images) >= 3  # curves, histogram, at least one gallery picture
    for src in page.images:
        image = decode_data_uri(src)
        assert image is not None and image.shape[0] > 50 and image.shape[1] > 50
    assert f"{metrics['full_test']['image_auroc']:.4f}" in text
    assert f"{metrics['test']['pixel_aupro']:.4f}" in text
    for defect in metrics["per_defect_type"]:
        assert f"<td>{defect}</td>" in text
    return page


# -- curve math ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("offset", [0.0, 1000.0])  # far outside [0, 1]: no sigmoid squashing into ties
def test_roc_and_average_precision_match_sklearn(seed: int, offset: float) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1) * 10 + offset  # many ties
    fpr, tpr, roc_thresholds = roc_curve(scores, labels)
    ref_fpr, ref_tpr, ref_thr = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    # torchmetrics divides its counts in float32: curve points and AP agree with sklearn to float32 precision
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-6)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-6)
    np.testing.assert_array_equal(roc_thresholds, ref_thr[1:])  # sklearn's first point is at +inf
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    precision, recall, thresholds = pr_curve(scores, labels)
    ref_p, ref_r, ref_t = precision_recall_curve(labels, scores, drop_intermediate=False)
    # sklearn: ascending thresholds, from the lowest score (recall 1), plus the (recall 0, precision 1) end point
    ref_p, ref_r, ref_t = ref_p[:-1][::-1], ref_r[:-1][::-1], ref_t[::-1]
    assert len(precision) == len(recall) == len(thresholds) == len(ref_t) == len(np.unique(scores))
    np.testing.assert_allclose(precision, ref_p, atol=1e-6)
    np.testing.assert_allclose(recall, ref_r, atol=1e-6)
    np.testing.assert_array_equal(thresholds, ref_t)
    assert np.all(np.diff(recall) >= 0) and np.all(np.diff(thresholds) < 0)
    assert recall[-1] == 1.0 and precision[-1] == pytest.approx(labels.mean())


def test_gallery_picks_the_worst_errors_and_the_closest_calls() -> None:
    recs = [{"gt_label": g, "pred_score": s} for g, s in [(0, 1.0), (0, 5.0), (0, 9.0), (1, 2.0), (1, 4.0), (1, 8.0)]]
    fps, fns, closest = pick_gallery(recs, 4.5, size=5)
    assert [r["pred_score"] for r in fps] == [9.0, 5.0]  # good judged NG, highest first
    assert [r["pred_score"] for r in fns] == [2.0, 4.0]  # defective judged OK, lowest first
    assert closest["false_positives"]["pred_score"] == 1.0 and closest["false_negatives"]["pred_score"] == 8.0
    fps, fns, _ = pick_gallery(recs, 4.5, size=1)
    assert [r["pred_score"] for r in fps] == [9.0] and [r["pred_score"] for r in fns] == [2.0]
    # a score equal to the threshold is OK (strict rule)
    fps, fns, _ = pick_gallery(recs, 5.0, size=5)
    assert [r["pred_score"] for r in fps] == [9.0]


# -- the page ------------------------------------------------------------------------------------------------------
def test_fit_writes_the_report_from_memory(padim_run: Path, fit_listings) -> None:
    assert "report.html" in fit_listings[padim_run.name]
    metrics = read_json(padim_run / "metrics.json")
    page = assert_self_contained_report(padim_run / "report.html", metrics)
    assert any("padim" in h for h in page.headings)
    assert read_json(padim_run / "meta.json")["timings"]["report_html_s"] > 0


def test_aoi_report_rebuilds_the_same_tables_from_files(aoi_cli, padim_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "padim_copy"
    shutil.copytree(padim_run, run, ignore=shutil.ignore_patterns("report.html", "eval"))
    assert aoi_cli(["report", "--run_dir", run, "--gallery_size", "2"]) == 0
    metrics = read_json(run / "metrics.json")
    assert_self_contained_report(run / "report.html", metrics)

    def tables(path: Path) -> list[str]:
        text = path.read_text(encoding="utf-8")
        return re.findall(r"<table id='(?:metrics|per-defect-type)'>.*?</table>", text, flags=re.S)

    from_memory, from_files = tables(padim_run / "report.html"), tables(run / "report.html")
    assert len(from_files) == 2 and from_files == from_memory


def test_report_gallery_shows_the_worst_errors(padim_run: Path) -> None:
    """Labels swapped and the threshold at the median score: false positives and negatives, each with a picture."""
    records = [{**r, "gt_label": 1 - r["gt_label"]} for r in read_jsonl(padim_run / "preds_test.jsonl")]
    metrics = read_json(padim_run / "metrics.json")
    median = float(np.median([r["pred_score"] for r in records]))
    calls: list[list[str]] = []

    def overlays(paths: list[str]) -> dict:
        calls.append(paths)
        return {p: np.full((64, 64, 3), 200, np.uint8) for p in paths}

    data = build_report_data(
        "t", [("model", "padim")], metrics, records, {"image_threshold": median}, overlays, gallery_size=3
    )
    good_ng = sum(r["gt_label"] == 0 and r["pred_score"] > median for r in records)
    bad_ok = sum(r["gt_label"] == 1 and r["pred_score"] <= median for r in records)
    assert len(data.false_positives) == min(3, good_ng) > 0 and len(data.false_negatives) == min(3, bad_ok) > 0
    assert len(calls) == 1  # one batch of overlays for the whole gallery
    assert all(item.picture for item in data.false_positives + data.false_negatives)
    text = render_html(data)
    assert text.count("<figure>") == len(data.false_positives) + len(data.false_negatives)
    assert "false positive" in text and "false negative" in text


def test_report_without_per_image_scores_still_writes(aoi_cli, patchcore_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "bare"
    shutil.copytree(
        patchcore_run, run, ignore=shutil.ignore_patterns("preds_*.jsonl", "report.html", "eval", "predictions")
    )
    assert aoi_cli(["report", "--run_dir", run]) == 0
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "No per-image scores" in text and "<table id='metrics'>" in text
    (run / "metrics.json").unlink()
    assert aoi_cli(["report", "--run_dir", run]) == 2
    err = capsys.readouterr().err
    assert "aoi report: error:" in err and "metrics.json" in err and "Traceback" not in err


def test_report_renders_missing_values_as_dashes() -> None:
    """Missing and non-finite values render as a dash, never as NaN."""
    metrics = {
        "split_policy": "none",
        "test": {"image_auroc": None, "pixel_auroc": float("nan"), "num_images": 3},
        "per_defect_type": {},
    }
    data = build_report_data("t", [], metrics, [], {}, None)
    text = render_html(data)
    assert ">nan<" not in text.lower() and "No tuned image threshold" in text
