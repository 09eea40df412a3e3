"""`aoi run --backend onnx`: same outputs as the torch backend, in a process where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_onnx import aoi_argv

from aoi_lightning.inference.onnx_backend import OnnxPredictor, OnnxRunError


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def mixed_folder(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    test_dir = tiny_mvtec_root / "synthetic" / "test"
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for image in sorted(sub.glob("*.png"))[:2]:
            (folder / f"{sub.name}_{image.name}").write_bytes(image.read_bytes())
    (folder / "not_an_image.png").write_text("hello", encoding="utf-8")
    return folder


def test_onnx_backend_runs_without_torch_and_matches_torch(patchcore_run: Path, mixed_folder: Path, tmp_path: Path):
    assert (patchcore_run / "export" / "model.onnx").is_file()
    onnx_out, torch_out = tmp_path / "onnx", tmp_path / "torch"
    common = ["run", "--model_dir", str(patchcore_run), "--input_dir", str(mixed_folder), "--no_progress"]
    res = subprocess.run(
        aoi_argv(*common, "--backend", "onnx", "--output_dir", str(onnx_out)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from aoi_lightning.cli import main; sys.exit(main(sys.argv[1:]))",
            *common,
            "--output_dir",
            str(torch_out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _records(onnx_out / "preds.jsonl"), _records(torch_out / "preds.jsonl")
    assert [r["image_path"] for r in a] == [r["image_path"] for r in b]
    assert sum("error" in r for r in a) == 1
    for x, y in zip(a, b):
        assert ("error" in x) == ("error" in y)
        if "error" in x:
            continue
        assert x["label"] == y["label"]
        assert x["num_defects"] == y["num_defects"]
        assert x["pred_score"] == pytest.approx(y["pred_score"], rel=1e-4, abs=1e-4)
        assert set(x) == set(y)
    ra = json.loads((onnx_out / "report.json").read_text(encoding="utf-8"))
    rb = json.loads((torch_out / "report.json").read_text(encoding="utf-8"))
    for key in ("num_images", "num_ok", "num_ng", "num_errors"):
        assert ra[key] == rb[key]


def test_onnx_predictor_refuses_a_size_mismatch(patchcore_run: Path, tmp_path: Path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes((patchcore_run / "export" / "model.onnx").read_bytes())
    meta = json.loads((patchcore_run / "export" / "export_meta.json").read_text(encoding="utf-8"))
    meta["image_size"] = [meta["image_size"][0] * 2, meta["image_size"][1] * 2]
    (export / "export_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(OnnxRunError, match="image_size"):
        OnnxPredictor.from_run(tmp_path)


def test_onnx_predictor_names_the_export_command(tmp_path: Path):
    with pytest.raises(OnnxRunError, match="aoi export"):
        OnnxPredictor.from_run(tmp_path)


def test_run_help_and_option_errors_without_torch(tmp_path: Path):
    """The options of `aoi run` are parsed (jsonargparse) in a process where torch cannot be imported."""
    res = subprocess.run(aoi_argv("run", "--help"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = " ".join(res.stdout.split())  # the help wraps lines
    assert "--backend {torch,onnx,openvino}" in out and "default: torch" in out
    argv = ["run", "--model_dir", tmp_path, "--input_dir", tmp_path, "--output_dir", tmp_path / "o", "--backend", "onx"]
    res = subprocess.run(aoi_argv(*map(str, argv)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == "aoi run: error: --backend: expected one of torch, onnx, openvino, got onx; did you mean onnx?"
    )


def test_spin_wait_is_set_on_the_session_and_serve_turns_it_on(patchcore_run: Path):
    from aoi_lightning.inference.folder import load_predictor
    from aoi_lightning.serve.api import InspectionAPI

    key = "session.intra_op.allow_spinning"
    default = OnnxPredictor.from_run(patchcore_run).session.get_session_options()
    assert default.get_session_config_entry(key) == "0"  # aoi run, aoi watch: idle threads leave the cores
    spinning = load_predictor("onnx", patchcore_run, "cpu", spin_wait=True).session.get_session_options()
    assert spinning.get_session_config_entry(key) == "1"
    x = np.zeros((1, 3, 64, 64), np.float32)
    np.testing.assert_array_equal(
        OnnxPredictor.from_run(patchcore_run).predict(x)[1],
        OnnxPredictor.from_run(patchcore_run, spin_wait=True).predict(x)[1],
    )
    import inspect

    assert inspect.signature(InspectionAPI.__init__).parameters["spin_wait"].default is True
