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


def test_sigkill_and_resume_on_the_transistor_test_images(tmp_path, aoi_cli) -> None:
    """`aoi run` killed half-way over the 100 transistor test images, then `--resume`: 100 unique lines."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from aoi_lightning.fileio import read_jsonl

    fit = [
        "fit", "--config", REPO_ROOT / "experiments" / "patchcore_mvtec.yaml", "--data.root", MVTEC_ROOT,
        "--data.category", CATEGORY, "--trainer.enable_progress_bar", "false", "--runs_root", tmp_path,
        "--run_id", "kill",
    ]  # fmt: skip
    assert aoi_cli(fit) == 0
    run, out = tmp_path / "patchcore" / CATEGORY / "kill", tmp_path / "out"
    cmd = [
        sys.executable, "-c", "import sys; from aoi_lightning.cli import main; sys.exit(main(sys.argv[1:]))",
        "run", "--model_dir", str(run), "--input_dir", str(MVTEC_ROOT / CATEGORY / "test"), "--output_dir", str(out),
        "--recursive", "--batch_size", "1", "--no_progress", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    preds = out / "preds.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(read_jsonl(preds) if preds.is_file() else []) < 40:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = [r["image_path"] for r in read_jsonl(preds)]
    assert 40 <= len(kept) < 100
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = [r["image_path"] for r in read_jsonl(preds)]
    assert len(paths) == 100 and len(set(paths)) == 100
    assert paths[: len(kept)] == kept
    assert json.loads((out / "report.json").read_text())["num_images"] == 100
