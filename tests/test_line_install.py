"""The torch-free line install: `aoi run/serve/watch --backend onnx` import nothing of torch, Lightning, timm or
kornia, and `requirements-line.txt` installs none of them. CI also runs these tests in a venv made by the line
install alone (`pytest -m torchfree`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.torchfree
pytest.importorskip("onnxruntime")

from tiny_onnx import AOI_WITHOUT_TORCH, BLOCKED, aoi_argv, image_png  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Modules behind `aoi run`, `aoi watch` and `aoi serve` with the ONNX back end (serve's only where present).
LINE_MODULES = (
    "aoi_lightning.cli",
    "aoi_lightning.commands.run",
    "aoi_lightning.commands.watch",
    "aoi_lightning.commands.serve",
    "aoi_lightning.inference.onnx_backend",
    "aoi_lightning.watch.hotfolder",
    "aoi_lightning.serve",
)


def test_line_modules_import_with_torch_blocked():
    code = AOI_WITHOUT_TORCH.split("from aoi_lightning.cli")[0] + (
        "import importlib, importlib.util\n"
        f"for name in {LINE_MODULES!r}:\n"
        "    top = name.rsplit('.', 1)[0]\n"
        "    if importlib.util.find_spec(top) is None or importlib.util.find_spec(name) is None:\n"
        "        continue  # a command not in this version\n"
        "    importlib.import_module(name)\n"
        "    print('imported', name)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "imported aoi_lightning.commands.watch" in res.stdout
    assert "imported aoi_lightning.commands.run" in res.stdout


def test_requirements_line_has_no_torch_stack():
    lines = (REPO_ROOT / "requirements-line.txt").read_text(encoding="utf-8").splitlines()
    names = {re.split(r"[\[<>=!~; ]", line.strip(), maxsplit=1)[0].lower() for line in lines}
    names.discard("")
    names = {n for n in names if not n.startswith("#")}
    assert {"onnxruntime", "numpy", "opencv-python-headless", "watchdog", "jsonargparse"} <= names
    assert not names & {*BLOCKED, "pytorch-lightning", "lightning-fabric"}


def test_aoi_run_onnx_without_torch(tiny_onnx_run: Path, tmp_path: Path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "a_ok.png").write_bytes(image_png(0, False))
    (inp / "b_ng.png").write_bytes(image_png(1, True))
    (inp / "c_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = subprocess.run(
        aoi_argv("run", "--model_dir", tiny_onnx_run, "--input_dir", inp, "--output_dir", out, "--backend", "onnx",
                 "--no_progress"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in (out / "preds.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [Path(r["image_path"]).name for r in records] == ["a_ok.png", "b_ng.png", "c_bad.png"]
    assert [r.get("label") for r in records] == ["OK", "NG", None]
    assert records[1]["num_defects"] == 1 and records[1]["pred_score"] > 0.9
    assert "error" in records[2]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (report["num_ok"], report["num_ng"], report["num_errors"]) == (1, 1, 1)


@pytest.mark.parametrize("command", ["run", "check-data"])
def test_commands_that_need_torch_say_so_in_one_line(tiny_onnx_run: Path, tmp_path: Path, command: str):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.png").write_bytes(image_png(0, False))
    args = {
        "run": ("run", "--model_dir", tiny_onnx_run, "--input_dir", inp, "--output_dir", tmp_path / "out"),
        "check-data": ("check-data", "--root", tmp_path, "--category", "in", "--output_dir", tmp_path / "cd"),
    }
    res = subprocess.run(aoi_argv(*args[command]), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"aoi {command}: error: torch is not installed here (a line install?): without it `aoi run`, `aoi serve` "
        "and `aoi watch` work with --backend onnx or openvino; the other commands need the full install (pip install .)"
    ]
