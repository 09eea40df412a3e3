"""Determinism on CPU: a second PaDiM fit with the same seed gives bit-identical scores and thresholds.

The same check for PatchCore (seeded coreset sampling) is test_cli_fit.py::test_seed_makes_fit_reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

from aoi_lightning.fileio import read_jsonl


def test_padim_fit_with_the_same_seed_gives_identical_scores_and_thresholds(
    padim_run: Path, tiny_mvtec_root: Path, tiny_runs_root: Path, aoi_cli, tiny_fit_argv
) -> None:
    argv = tiny_fit_argv(
        "aoi_lightning.models.Padim", tiny_mvtec_root, tiny_runs_root, "padim_same_seed", "--seed", "0"
    )
    assert aoi_cli(argv) == 0
    again = padim_run.parent / "padim_same_seed"
    for split in ("train", "val", "test"):
        first, second = read_jsonl(padim_run / f"preds_{split}.jsonl"), read_jsonl(again / f"preds_{split}.jsonl")
        assert [r["image_path"] for r in first] == [r["image_path"] for r in second]
        assert len(first) > 0
        assert [r["pred_score"] for r in first] == [r["pred_score"] for r in second], split  # bit-identical
    thresholds = json.loads((padim_run / "thresholds.json").read_text(encoding="utf-8"))
    assert json.loads((again / "thresholds.json").read_text(encoding="utf-8")) == thresholds
    assert isinstance(thresholds["image_threshold"], float) and isinstance(thresholds["pixel_threshold"], float)
