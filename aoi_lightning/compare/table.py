"""Side-by-side metrics of trained runs: what each run dir holds, the comparison rows, the Markdown table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from aoi_lightning.fileio import read_json
from aoi_lightning.rundir.loading import RunError, read_run_info
from aoi_lightning.rundir.thresholds_file import check_thresholds_file, metrics_thresholds


@dataclass(frozen=True)
class Row:
    """One compared quantity: where it comes from (`section.key` of metrics.json, or a computed key)."""

    key: str
    label: str
    better: str  # "higher" or "lower"
    fmt: str


#: The compared quantities, in table order.
ROWS = (
    Row("full_test.image_auroc", "Image AUROC (full test)", "higher", "{:.4f}"),
    Row("full_test.pixel_auroc", "Pixel AUROC (full test)", "higher", "{:.4f}"),
    Row("full_test.pixel_aupro", "Pixel AUPRO, FPR <= 0.3 (full test)", "higher", "{:.4f}"),
    Row("test.image_auroc", "Image AUROC (test split)", "higher", "{:.4f}"),
    Row("test.image_f1", "Image F1 at the tuned threshold (test split)", "higher", "{:.4f}"),
    Row("test.pixel_f1", "Pixel F1 at the tuned threshold (test split)", "higher", "{:.4f}"),
    Row("test.false_reject_rate", "False-reject rate: good judged NG (test split)", "lower", "{:.2%}"),
    Row("test.escape_rate", "Escape rate: defective judged OK (test split)", "lower", "{:.2%}"),
    Row("timing.model_fit_s", "Fit time (s): feature extraction + fit of the statistics", "lower", "{:.1f}"),
    Row("timing.fit_s", "Fit command time (s): also validation, thresholds, export callbacks", "lower", "{:.1f}"),
    Row("timing.ms_per_image", "Inference (ms/image)", "lower", "{:.1f}"),
    Row("size.checkpoint_mb", "Checkpoint size (MB)", "lower", "{:.1f}"),
    Row("size.onnx_mb", "ONNX size (MB)", "lower", "{:.1f}"),
)
PER_TYPE_KEYS = (("image_auroc", "image AUROC"), ("pixel_aupro", "pixel AUPRO"))


@dataclass
class RunSummary:
    """What a run directory holds for the comparison; `missing` says what could not be read."""

    label: str
    run_dir: Path
    model: str
    category: str
    run_id: str
    image_size: tuple[int, int]
    mask_suffix: str
    metrics: dict
    thresholds: dict
    meta: dict
    values: dict[str, float | None] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.label}: {self.model}/{self.run_id}"


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read(path: Path, missing: list[str]) -> dict:
    if not path.is_file():
        missing.append(f"{path.name} not found")
        return {}
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        missing.append(f"{path.name} unreadable ({exc})")
        return {}


def inference_ms(meta: dict) -> tuple[float | None, str]:
    """ms per image from meta.json timings and where it comes from.

    Preferred: the scoring of the training images after the fit (`score_train_s / num_train`: decoding and
    model, no metrics); else the test pass (`test_s / num_test`, which includes the metrics).
    """
    timings, data = meta.get("timings") or {}, meta.get("data") or {}
    for key, count, what in (
        ("score_train_s", "num_train", "training-image scoring"),
        ("test_s", "num_test", "test pass"),
    ):
        seconds, n = _number(timings.get(key)), _number(data.get(count))
        if seconds is not None and n:
            return 1000.0 * seconds / n, f"{key} / {count} ({what}, device {meta.get('device', '?')})"
    return None, "meta.json has no timings"


def load_summary(label: str, run_dir: str | Path) -> RunSummary:
    """Read config.yaml (required), metrics.json, thresholds.json, meta.json and file sizes of a run.

    Raises:
        RunError: not a run directory.
    """
    info = read_run_info(run_dir)
    run = info.run
    missing: list[str] = []
    metrics = _read(run.metrics, missing)
    measured = metrics_thresholds(metrics)
    thresholds = _read(run.thresholds, missing) or dict(measured)
    try:  # a thresholds.json that says otherwise than the metrics (edited): the metrics' thresholds are shown
        check_thresholds_file(
            run.thresholds,
            measured,
            "differs from the metrics'",
            "the metrics' value is shown",
            RunError,
        )
    except RunError as exc:
        missing.append(str(exc))
        thresholds = dict(measured)
    meta = _read(run.meta, missing)
    data_cfg = info.config.get("data") or {}
    s = RunSummary(
        label,
        run.path,
        info.model_name,
        info.category,
        run.path.name,
        info.image_size,
        str(data_cfg.get("mask_suffix") or "_mask"),
        metrics,
        thresholds,
        meta,
        missing=missing,
    )
    for row in ROWS:
        section, _, key = row.key.partition(".")
        if section in ("test", "full_test", "val"):
            s.values[row.key] = _number((metrics.get(section) or {}).get(key))
    timings = meta.get("timings") or {}
    parts = [_number(timings.get(k)) for k in ("feature_extraction_s", "fit_finalize_s")]
    s.values["timing.model_fit_s"] = sum(parts) if None not in parts else None
    s.sources["timing.model_fit_s"] = (
        "feature_extraction_s + fit_finalize_s" if None not in parts else "not in meta.json"
    )
    s.values["timing.fit_s"] = _number(timings.get("fit_s"))
    s.sources["timing.fit_s"] = "fit_s" if s.values["timing.fit_s"] is not None else "not in meta.json"
    s.values["timing.ms_per_image"], s.sources["timing.ms_per_image"] = inference_ms(meta)
    for key, path in (("size.checkpoint_mb", run.checkpoint), ("size.onnx_mb", run.export / "model.onnx")):
        s.values[key] = path.stat().st_size / 1e6 if path.is_file() else None
        s.sources[key] = (
            str(path.relative_to(run.path)) if path.is_file() else f"{path.relative_to(run.path)} not found"
        )
    return s


def best_labels(values: dict[str, float | None], better: str, spec: str) -> list[str]:
    """Labels whose value is best (ties at the displayed precision all count); none with fewer than two values."""
    present = {k: v for k, v in values.items() if v is not None}
    if len(present) < 2:
        return []
    top = max(present.values()) if better == "higher" else min(present.values())
    shown = spec.format(top)
    return [k for k, v in present.items() if spec.format(v) == shown]


def comparison_rows(runs: list[RunSummary]) -> list[dict]:
    """Every row: key, label, better, values by run label, best labels."""
    out = []
    for row in ROWS:
        values = {r.label: r.values.get(row.key) for r in runs}
        out.append(
            {
                "key": row.key,
                "label": row.label,
                "better": row.better,
                "values": values,
                "best": best_labels(values, row.better, row.fmt),
            }
        )
    return out


def per_defect_rows(runs: list[RunSummary]) -> list[dict]:
    """Per defect type and metric (image AUROC, pixel AUPRO vs the good test images): values by run label."""
    types = sorted({t for r in runs for t in (r.metrics.get("per_defect_type") or {})})
    out = []
    for name in types:
        for key, label in PER_TYPE_KEYS:
            values = {
                r.label: _number(((r.metrics.get("per_defect_type") or {}).get(name) or {}).get(key)) for r in runs
            }
            out.append(
                {
                    "defect_type": name,
                    "key": key,
                    "label": label,
                    "values": values,
                    "best": best_labels(values, "higher", "{:.4f}"),
                }
            )
    return out


def _cell(value: float | None, spec: str, best: bool) -> str:
    if value is None:
        return "n/a"
    text = spec.format(value)
    return f"**{text}**" if best else text


def markdown_table(runs: list[RunSummary], rows: list[dict], per_type: list[dict], notes: list[str]) -> str:
    """comparison_table.md: facts of each run, the metrics side by side (best in bold), per defect type, notes."""
    head = "| | " + " | ".join(f"{r.name}" for r in runs) + " |\n|---|" + "---:|" * len(runs) + "\n"
    facts = [
        ("Model", [r.model for r in runs]),
        ("Category", [r.category for r in runs]),
        ("Run directory", [f"`{r.run_dir}`" for r in runs]),
        ("Split policy", [str(r.metrics.get("split_policy", "n/a")) for r in runs]),
        ("Input size", ["x".join(map(str, r.image_size)) for r in runs]),
        ("Device", [str(r.meta.get("device", "n/a")) for r in runs]),
        ("Image threshold", [_cell(_number(r.thresholds.get("image_threshold")), "{:.6g}", False) for r in runs]),
    ]
    lines = [
        "# Model comparison",
        "",
        "Best value of each row in **bold** (ties all bold). `n/a`: not available (see the notes).",
        "",
        head.rstrip("\n"),
    ]
    lines += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in facts]
    spec = {row.key: row.fmt for row in ROWS}
    for row in rows:
        cells = [_cell(row["values"][r.label], spec[row["key"]], r.label in row["best"]) for r in runs]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if per_type:
        lines += [
            "",
            "## Per defect type (each type against the good test images, full test)",
            "",
            "| defect type | metric | " + " | ".join(r.name for r in runs) + " |",
            "|---|---|" + "---:|" * len(runs),
        ]
        for row in per_type:
            cells = [_cell(row["values"][r.label], "{:.4f}", r.label in row["best"]) for r in runs]
            lines.append(f"| {row['defect_type']} | {row['label']} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def run_notes(runs: list[RunSummary]) -> list[str]:
    """What the reader must know: missing files and values, different data or set-ups, how ms/image is measured."""
    notes = []
    for r in runs:
        notes += [f"{r.name}: {m}" for m in r.missing]
        for key, source in r.sources.items():
            if r.values.get(key) is None:
                notes.append(f"{r.name}: {key.split('.', 1)[1]} unavailable ({source})")
    for attr, what in (("category", "categories"), ("image_size", "input sizes")):
        if len({str(getattr(r, attr)) for r in runs}) > 1:
            notes.append(f"The runs have different {what}: the metrics are not directly comparable.")
    roots = {str((r.meta.get("data") or {}).get("root")) for r in runs if (r.meta.get("data") or {}).get("root")}
    if len(roots) > 1:
        notes.append(
            f"The runs were fitted and tested on different data ({', '.join(sorted(roots))}): the metrics are not "
            "directly comparable."
        )
    policies = {str(r.metrics.get("split_policy")) for r in runs if r.metrics}
    if len(policies) > 1:
        notes.append(f"The runs use different split policies ({', '.join(sorted(policies))}).")
    sources = {r.sources.get("timing.ms_per_image") for r in runs if r.values.get("timing.ms_per_image") is not None}
    if sources:
        notes.append("Inference ms/image: " + "; ".join(sorted(f"{s}" for s in sources)) + ".")
    return notes


def ensure_distinct(paths: list[Path]) -> None:
    """Refuse comparing a run with itself."""
    resolved = [p.expanduser().resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        raise RunError("the same run directory is given twice")
