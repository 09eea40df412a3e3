"""`aoi compare --run_dir_a A --run_dir_b B [--run_dirs C ...] --output_dir OUT`: trained runs side by side."""

from __future__ import annotations

import logging
from pathlib import Path

from aoi_lightning.compare.samples import choose_cases, load_run_images, samples_markdown, write_cases
from aoi_lightning.compare.table import (
    comparison_rows,
    ensure_distinct,
    load_summary,
    markdown_table,
    per_defect_rows,
    run_notes,
)
from aoi_lightning.fileio import write_json, write_text_atomic
from aoi_lightning.rundir.loading import RunError, run_files_checked
from aoi_lightning.rundir.meta import utc_now

log = logging.getLogger(__name__)

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _render(runs, cases, device: str) -> tuple[dict, list[str]]:
    """Overlays drawn by the models of runs that have no predictions (`--render_missing`)."""
    from aoi_lightning.report.gallery import render_model_overlays
    from aoi_lightning.rundir.loading import load_run_model

    rendered, notes = {}, []
    for run in runs:
        wanted = [c.image_path for c in cases if c.key not in run.predictions]
        if not wanted:
            continue
        try:
            module, info = load_run_model(run.summary.run_dir, device, require_thresholds=True)
        except RunError as exc:
            notes.append(f"{run.summary.name}: overlays not rendered: {exc}")
            continue
        rendered[run.summary.label] = render_model_overlays(module.model, wanted, module.preprocessing, device)
        notes.append(
            f"{run.summary.name}: {len(rendered[run.summary.label])} overlays rendered from weights/model.ckpt"
        )
    return rendered, notes


def compare_runs(
    run_dirs: list[str | Path], output_dir: str | Path, render_missing: bool = False, device: str = "cpu"
) -> dict:
    """Write every comparison file into `output_dir` and return the comparison_report.json document."""
    if len(run_dirs) < 2:
        raise RunError("compare needs at least two run directories")
    if len(run_dirs) > len(LABELS):
        raise RunError(f"compare takes at most {len(LABELS)} run directories")
    ensure_distinct([Path(p) for p in run_dirs])
    out = Path(output_dir).expanduser()
    summaries = [load_summary(LABELS[i], p) for i, p in enumerate(run_dirs)]
    rows, per_type = comparison_rows(summaries), per_defect_rows(summaries)
    notes = run_notes(summaries)

    runs = [load_run_images(s) for s in summaries]
    sample_notes = []
    for run in runs:
        if run.predictions_dir is None:
            sample_notes.append(
                f"{run.summary.name}: no predictions ({run.summary.run_dir / 'predictions' / 'preds.jsonl'} "
                f"not found); write them with `aoi predict --config {run.summary.run_dir / 'config.yaml'} "
                f"--ckpt_path {run.summary.run_dir / 'weights' / 'model.ckpt'}`"
            )
        if not run.scores and run.predictions_dir is None:
            sample_notes.append(f"{run.summary.name}: no per-image scores (preds_test.jsonl not found)")
    cases = choose_cases(runs)
    rendered = {}
    if render_missing and cases:
        rendered, render_notes = _render(runs, cases, device)
        sample_notes += render_notes
    write_cases(cases, runs, out, rendered)
    absent = sorted({label for c in cases for label, info in c.per_run.items() if not info.get("overlay")})
    if absent:
        sample_notes.append(f"run(s) {', '.join(absent)}: sample overlays missing; the grids show a placeholder")
    notes += [n for n in sample_notes if n not in notes]

    write_text_atomic(out / "comparison_table.md", markdown_table(summaries, rows, per_type, notes))
    write_text_atomic(out / "sample_visualizations.md", samples_markdown(cases, runs, sample_notes))
    report = {
        "created_at": utc_now(),
        "output_dir": str(out),
        "runs": [
            {
                "label": s.label,
                "name": s.name,
                "run_dir": str(s.run_dir),
                "model": s.model,
                "category": s.category,
                "run_id": s.run_id,
                "image_size": list(s.image_size),
                "split_policy": s.metrics.get("split_policy"),
                "device": s.meta.get("device"),
                "values": {row["key"]: row["values"][s.label] for row in rows},
                "value_sources": s.sources,
                "metrics": s.metrics,
                "thresholds": s.thresholds,
                "timings": s.meta.get("timings") or {},
                "predictions": {
                    "available": run.predictions_dir is not None,
                    "num_images": len(run.predictions),
                },
                "missing": s.missing,
            }
            for s, run in zip(summaries, runs)
        ],
        "table": rows,
        "per_defect_type": per_type,
        "samples": [
            {
                "name": c.name,
                "kind": c.kind,
                "defect_type": c.defect_type,
                "severity": c.severity,
                "image_path": c.image_path,
                "measure": c.measure,
                "measure_source": c.measure_source,
                "grid": f"comparison_grids/{c.name}.png",
                "runs": c.per_run,
            }
            for c in cases
        ],
        "notes": notes,
    }
    write_json(out / "comparison_report.json", report)
    return report


def compare(
    run_dir_a: str,
    run_dir_b: str,
    output_dir: str,
    run_dirs: list[str] = (),
    render_missing: bool = False,
    device: str = "cpu",
) -> int:
    """Compare trained runs side by side.

    Writes comparison_table.md (metrics, timings, sizes side by side, best in bold), comparison_report.json
    (everything), samples/<run>/ overlays of good images and of mild, medium and severe cases of each defect type,
    comparison_grids/ (side by side) and sample_visualizations.md. Overlays come from each run's predictions/
    (`aoi predict`); runs without them are listed as missing.

    Args:
        run_dir_a: first run directory (written by `aoi fit`).
        run_dir_b: second run directory.
        output_dir: folder for the comparison files (created).
        run_dirs: more run directories to compare (`--run_dirs C D`).
        render_missing: draw the overlays of runs without predictions/ with their model (weights/model.ckpt).
        device: torch device for --render_missing.

    Raises:
        RunError: fewer than two or more than 26 runs, the same run twice, a run without results (one line).
    """
    dirs = [run_dir_a, run_dir_b, *run_dirs]
    with run_files_checked("the compared runs (" + ", ".join(str(d) for d in dirs) + ")"):
        report = compare_runs(dirs, output_dir, render_missing, device)
    out = Path(output_dir)
    print(f"compared {len(report['runs'])} runs: " + ", ".join(r["name"] for r in report["runs"]))
    for row in report["table"]:
        best = ", ".join(row["best"]) or "-"
        print(f"  {row['label']}: best {best}")
    for note in report["notes"]:
        print(f"  note: {note}")
    print(
        f"wrote {out / 'comparison_table.md'}, comparison_report.json, sample_visualizations.md, "
        f"{len(report['samples'])} grids in comparison_grids/"
    )
    return 0
