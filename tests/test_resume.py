"""Crash safety of `aoi run`: SIGKILL half-way leaves only complete lines; `--resume` finishes without gaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aoi_lightning.fileio import read_jsonl

RUN = "import sys; from aoi_lightning.cli import main; sys.exit(main(sys.argv[1:]))"
N_IMAGES = 150


@pytest.fixture(scope="module")
def many_images(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    sources = sorted((tiny_mvtec_root / "synthetic" / "test").rglob("*.png"))
    for i in range(N_IMAGES):
        (folder / f"img_{i:04d}.png").write_bytes(sources[i % len(sources)].read_bytes())
    return folder


def _run_argv(run: Path, images: Path, out: Path, *extra: str) -> list[str]:
    """argv of `aoi run` over `images` with the run's model into `out`."""
    return ["run", "--model_dir", str(run), "--input_dir", str(images), "--output_dir", str(out), *extra]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_then_resume_gives_every_image_once(patchcore_run: Path, many_images: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = _run_argv(patchcore_run, many_images, out, "--batch_size", "1", "--no_progress", "--device", "cpu")
    proc = subprocess.Popen([sys.executable, "-c", RUN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    preds = out / "preds.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(_lines(preds)) < 20:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _lines(preds)
    assert all(line.endswith("\n") for line in before[:-1])
    complete = read_jsonl(preds)  # every complete line parses
    if killed:
        assert len(complete) < N_IMAGES
    res = _run([*args, "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    records = read_jsonl(preds)
    paths = [r["image_path"] for r in records]
    assert len(paths) == N_IMAGES and len(set(paths)) == N_IMAGES
    assert paths[: len(complete)] == [r["image_path"] for r in complete]  # what was written is kept as it was
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["num_images"] == N_IMAGES and report["num_ok"] + report["num_ng"] == N_IMAGES


def test_resume_drops_a_torn_last_line(patchcore_run: Path, many_images: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = _run_argv(patchcore_run, many_images, out, "--no_progress", "--no_save_overlays", "--device", "cpu")
    assert _run(args).returncode == 0
    lines = _lines(out / "preds.jsonl")
    (out / "preds.jsonl").write_text("".join(lines[:40]) + lines[40][:25], encoding="utf-8")  # crash mid-line
    res = _run([*args, "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    again = _lines(out / "preds.jsonl")
    assert len(again) == N_IMAGES
    assert [json.loads(x)["image_path"] for x in again] == [json.loads(x)["image_path"] for x in lines]
