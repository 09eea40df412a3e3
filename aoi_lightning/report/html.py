"""The run's HTML report: one self-contained page (inline CSS, images as data URIs, no script, no network)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

REPORT_HTML = "report.html"

#: Rows of the metrics table: (key in a metrics.json section, label, number format).
METRIC_ROWS = (
    ("image_auroc", "Image AUROC", "{:.4f}"),
    ("pixel_auroc", "Pixel AUROC", "{:.4f}"),
    ("pixel_aupro", "Pixel AUPRO (FPR <= 0.3)", "{:.4f}"),
    ("image_f1", "Image F1 at the threshold", "{:.4f}"),
    ("image_precision", "Image precision", "{:.4f}"),
    ("image_recall", "Image recall", "{:.4f}"),
    ("image_accuracy", "Image accuracy", "{:.4f}"),
    ("false_reject_rate", "False-reject rate (good judged NG)", "{:.2%}"),
    ("escape_rate", "Escape rate (defective judged OK)", "{:.2%}"),
    ("pixel_f1", "Pixel F1 at the threshold", "{:.4f}"),
    ("pixel_iou", "Pixel IoU at the threshold", "{:.4f}"),
    ("num_images", "Images", "{:d}"),
    ("num_good", "Good images", "{:d}"),
    ("num_defective", "Defective images", "{:d}"),
)
SECTIONS = (("test", "test (held out)"), ("full_test", "full test folder"), ("val", "validation"))

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#1a1a1a;background:#fff;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}
h2{font-size:1.25em;margin-top:32px;border-bottom:2px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f0f0}
.facts td{text-align:left}.note{color:#8a4b00;background:#fff4e0;border-left:4px solid #e69500;padding:6px 10px}
.muted{color:#666}img.plot{max-width:100%;display:block;margin:8px 0}
.gallery{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0;border:1px solid #ccc;padding:6px;background:#fafafa}
figure img{display:block;height:220px}figcaption{font-size:0.85em;max-width:520px;word-break:break-all}
"""


@dataclass
class GalleryItem:
    """One gallery picture: an image judged wrong (or the closest call when there is no error)."""

    title: str
    image_path: str
    defect_type: str
    pred_score: float
    picture: bytes | None
    mime: str = "image/jpeg"


@dataclass
class ReportData:
    """What the report shows. `curves`/`histogram` are PNG bytes (None when not computable)."""

    heading: str
    facts: list[tuple[str, str]]
    metrics: dict
    thresholds: dict
    per_defect_rows: list[dict]
    curves: bytes | None = None
    histogram: bytes | None = None
    false_positives: list[GalleryItem] = field(default_factory=list)
    false_negatives: list[GalleryItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gallery_notes: dict[str, str] = field(default_factory=dict)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fmt(value, spec: str = "{:.4g}") -> str:
    """A number for a table cell; `–` for missing or non-finite values."""
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "–"
        try:
            return spec.format(value)
        except ValueError:
            return spec.format(int(value)) if float(value).is_integer() else f"{value:.4g}"
    return html.escape(str(value))


def _metrics_table(metrics: dict) -> str:
    sections = [(key, label) for key, label in SECTIONS if isinstance(metrics.get(key), dict)]
    if not sections:
        return "<p class='muted'>No metrics.</p>"
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in sections)
    rows = []
    for key, label, spec in METRIC_ROWS:
        values = [metrics[s].get(key) for s, _ in sections]
        if all(v is None for v in values):
            continue
        cells = "".join(f"<td>{fmt(v, spec)}</td>" for v in values)
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    return f"<table id='metrics'><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _per_defect_table(rows: list[dict]) -> str:
    if not rows:
        return "<p class='muted'>No defect types in the test set.</p>"
    cols = (
        ("defect_type", "defect type", "{}"),
        ("num_images", "images (with good)", "{:d}"),
        ("image_auroc", "image AUROC", "{:.4f}"),
        ("pixel_auroc", "pixel AUROC", "{:.4f}"),
        ("pixel_aupro", "pixel AUPRO", "{:.4f}"),
        ("test_num_images", "test images", "{:d}"),
        ("test_wrong", "test images judged wrong", "{:d}"),
        ("test_error_rate", "escape / false-reject rate (test)", "{:.2%}"),
        ("mean_score", "mean score (test)", "{:.4g}"),
    )
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(row.get(key), spec)}</td>" for key, _, spec in cols) + "</tr>" for row in rows
    )
    return f"<table id='per-defect-type'><tr>{head}</tr>{body}</table>"


def _gallery(items: list[GalleryItem], note: str | None, threshold) -> str:
    parts = [f"<p class='muted'>{html.escape(note)}</p>"] if note else []
    figures = []
    for item in items:
        img = (
            f"<img src='{data_uri(item.picture, item.mime)}' alt='{html.escape(item.title)}'>"
            if item.picture
            else "<p class='muted'>picture unavailable</p>"
        )
        caption = (
            f"<b>{html.escape(item.title)}</b> &middot; {html.escape(item.defect_type)} &middot; score "
            f"{fmt(item.pred_score)} vs threshold {fmt(threshold)}<br>{html.escape(item.image_path)}"
        )
        figures.append(f"<figure>{img}<figcaption>{caption}</figcaption></figure>")
    if figures:
        parts.append(f"<div class='gallery'>{''.join(figures)}</div>")
    return "".join(parts)


def render_html(data: ReportData) -> str:
    """The complete HTML document of a report."""
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in data.facts)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in data.notes)
    thr = data.thresholds
    image_t = thr.get("image_threshold")
    thr_rows = [
        (k, thr.get(k))
        for k in (
            "image_threshold",
            "pixel_threshold",
            "method",
            "metric",
            "split",
            "value",
            "pixel_metric",
            "pixel_value",
            "note",
        )
        if thr.get(k) is not None
    ]
    thr_table = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v, '{:.6g}')}</td></tr>" for k, v in thr_rows)

    def figure(png: bytes | None, alt: str, missing: str) -> str:
        if png is None:
            return f"<p class='muted'>{html.escape(missing)}</p>"
        return f"<img class='plot' src='{data_uri(png, 'image/png')}' alt='{html.escape(alt)}'>"

    legend = (
        "Left: the image with the ground-truth defect outlined in yellow. Right: the model's anomaly heat map, "
        "predicted defect outlines (white), boxes (magenta) and verdict."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(data.heading)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(data.heading)}</h1>
<table class="facts">{facts}</table>
{notes}
<h2>Metrics</h2>
{_metrics_table(data.metrics)}
<h2>Thresholds</h2>
<table class="facts">{thr_table or "<tr><td>no tuned thresholds</td></tr>"}</table>
<h2>Image-level ROC and precision-recall (test split)</h2>
{figure(data.curves, "ROC and precision-recall curves", "Curves need good and defective test images.")}
<h2>Score histogram (test split)</h2>
{figure(data.histogram, "score histogram of good and defective images", "No labelled test images.")}
<h2>Per defect type</h2>
{_per_defect_table(data.per_defect_rows)}
<h2>Worst false positives (good parts judged NG)</h2>
<p class="muted">{legend}</p>
{_gallery(data.false_positives, data.gallery_notes.get("false_positives"), image_t)}
<h2>Worst false negatives (escapes: defective parts judged OK)</h2>
{_gallery(data.false_negatives, data.gallery_notes.get("false_negatives"), image_t)}
</body></html>
"""
