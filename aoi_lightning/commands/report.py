"""`aoi report --run_dir RUN`: (re)write `RUN/report.html` from the run's files."""

from __future__ import annotations

import logging
from pathlib import Path

from aoi_lightning.fileio import read_json, read_jsonl
from aoi_lightning.progress import phase
from aoi_lightning.report.build import OverlaySource, build_report_data, run_facts, write_report
from aoi_lightning.report.gallery import image_key, prediction_overlays, read_bgr, render_model_overlays
from aoi_lightning.rundir.loading import RunError, load_run_model, read_run_info, run_files_checked
from aoi_lightning.rundir.thresholds_file import check_thresholds_file, metrics_thresholds

log = logging.getLogger(__name__)


def model_overlay_source(run_dir: Path, image_size: tuple[int, int], device: str) -> OverlaySource:
    """Overlays from `RUN/predictions/` where `aoi predict` wrote them, the rest drawn by the run's model."""
    saved = prediction_overlays(run_dir / "predictions")

    def source(paths: list[str]) -> dict:
        out, missing = {}, []
        for path in paths:
            file = saved.get(image_key(path))
            picture = read_bgr(file) if file is not None else None
            if picture is None:
                missing.append(path)
            else:
                out[path] = picture
        if missing:
            try:
                module, _ = load_run_model(run_dir, device, require_thresholds=True)
            except RunError as exc:
                log.warning("gallery without model overlays: %s", exc)
                return out
            out.update(render_model_overlays(module.model, missing, module.preprocessing, device))
        return out

    return source


def report_from_run(run_dir: str | Path, gallery_size: int = 6, device: str = "cpu") -> Path:
    """Build `<run_dir>/report.html` from metrics.json, preds_test.jsonl (+ preds_val.jsonl), thresholds.json."""
    info = read_run_info(run_dir)
    run = info.run
    if not run.metrics.is_file():
        raise RunError(f"{run.metrics} not found: the run has no test results (fit it with test images)")
    metrics = read_json(run.metrics)
    records = []
    for split in ("test", "val"):
        if run.preds(split).is_file():
            records.extend(read_jsonl(run.preds(split)))
    measured = metrics_thresholds(metrics)
    thresholds = check_thresholds_file(
        run.thresholds,
        measured,
        "does not match the threshold the test metrics were computed at,",
        "restore the file or run `aoi test` again",
        RunError,
        run.metrics,
    )
    thresholds = thresholds if thresholds is not None else dict(measured)
    with phase("report") as made, run_files_checked(str(run.path)):
        path = _build_and_write(info, metrics, records, thresholds, gallery_size, device)
        made.detail = f"written to {path}"
    return path


def _build_and_write(info, metrics: dict, records: list[dict], thresholds: dict, gallery_size: int, device: str):
    run = info.run
    data_cfg = info.config.get("data") or {}
    facts = run_facts(info.model_name, info.category, run.path, metrics.get("split_policy"), info.image_size)
    data = build_report_data(
        f"{info.model_name} / {info.category} / {run.path.name}",
        facts,
        metrics,
        records,
        thresholds,
        model_overlay_source(run.path, info.image_size, device),
        mask_suffix=str(data_cfg.get("mask_suffix") or "_mask"),
        gallery_size=gallery_size,
    )
    if not records:
        data.notes.append(f"No per-image scores ({run.preds('test').name} missing): no curves, histogram or gallery.")
    return write_report(run.path, data)


def report(run_dir: str, gallery_size: int = 6, device: str = "cpu") -> int:
    """Write RUN/report.html, a self-contained page (no network).

    The page holds the metrics, image-level ROC and PR curves, score histograms with the threshold, the
    per-defect-type table and a gallery of the worst false positives and false negatives. Overlays come from
    RUN/predictions/ when present, else from the model.

    Args:
        run_dir: run directory written by `aoi fit` (metrics.json, preds_test.jsonl).
        gallery_size: pictures per gallery (>= 0).
        device: torch device for overlays drawn by the model.

    Raises:
        RunError: a run without test results; ValueError: a negative gallery size (one line).
    """
    if gallery_size < 0:
        raise ValueError(f"--gallery_size must be >= 0, got {gallery_size}")
    path = report_from_run(run_dir, gallery_size, device)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0
