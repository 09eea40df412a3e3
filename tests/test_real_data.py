"""Accuracy bars on real MVTec AD data (transistor) through `aoi fit` (slow: minutes on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MVTEC_ROOT = REPO_ROOT.parent / "shared" / "datasets" / "mvtec_ad"
CATEGORY = "transistor"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (MVTEC_ROOT / CATEGORY / "train").is_dir(),
        reason=f"MVTec AD {CATEGORY} not found at {MVTEC_ROOT / CATEGORY}",
    ),
]


@pytest.mark.parametrize(
    ("experiment", "model", "image_bar", "pixel_bar"),
    [
        ("padim_mvtec.yaml", "padim", 0.93, 0.97),
        ("patchcore_mvtec.yaml", "patchcore", 0.99, 0.975),
    ],
)
def test_full_test_accuracy(experiment, model, image_bar, pixel_bar, tmp_path, aoi_cli) -> None:
    code = aoi_cli(
        [
            "fit",
            "--config", REPO_ROOT / "experiments" / experiment,
            "--data.root", MVTEC_ROOT,
            "--data.category", CATEGORY,
            "--trainer.enable_progress_bar", "false",
            "--runs_root", tmp_path,
            "--run_id", "real",
        ]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / model / CATEGORY / "real" / "metrics.json").read_text())
    full = metrics["full_test"]
    assert full["num_images"] == 100
    assert full["image_auroc"] >= image_bar, full
    assert full["pixel_auroc"] >= pixel_bar, full
