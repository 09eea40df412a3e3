"""The ONNX back ends load an export only when its files are the ones `aoi export` wrote: model.onnx must match
export_meta.json's sha256, and export_meta.json must agree with the metadata `aoi export` wrote into the graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_aoi

BACKENDS = ["onnx", "openvino"]


@pytest.fixture()
def copied(patchcore_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(patchcore_run, run)
    return run


def _edit_meta(run: Path, edit) -> None:
    path = run / "export" / "export_meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _refused(run: Path, images: Path, out: Path, backend: str, capsys) -> str:
    capsys.readouterr()
    argv = ["run", "--model_dir", run, "--input_dir", images, "--output_dir", out, "--backend", backend,
            "--no_progress"]  # fmt: skip
    assert run_aoi(argv) == 2
    assert not (out / "preds.jsonl").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_onnx_of_another_run_is_refused(copied, padim_run, tiny_mvtec_root, tmp_path, capsys, backend) -> None:
    shutil.copy(padim_run / "export" / "model.onnx", copied / "export" / "model.onnx")
    err = _refused(copied, tiny_mvtec_root / "synthetic" / "test" / "good", tmp_path / "out", backend, capsys)
    assert "model.onnx is not the file" in err and "sha256 differs" in err and "aoi export" in err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["thresholds", "nested_thresholds", "resize", "run_id"])
def test_edited_export_meta_is_refused(copied, tiny_mvtec_root, tmp_path, capsys, backend, what) -> None:
    (copied / "thresholds.json").unlink()  # the export/-only deployment: nothing else to compare with

    def edit(meta: dict) -> None:
        if what == "thresholds":
            meta["image_threshold"] = meta["thresholds"]["image_threshold"] = 1e6
        elif what == "nested_thresholds":  # the values read_export uses, alone
            meta["thresholds"]["image_threshold"] = 1e6
        elif what == "resize":
            meta["preprocessing"]["resize"] = "fit_pad"
        else:
            meta["run_id"] = "someone-else"

    _edit_meta(copied, edit)
    err = _refused(copied, tiny_mvtec_root / "synthetic" / "test" / "good", tmp_path / "out", backend, capsys)
    key = {"thresholds": "image_threshold", "nested_thresholds": "thresholds", "resize": "preprocessing",
           "run_id": "run_id"}[what]  # fmt: skip
    assert f"says {key}" in err and "was edited after the export" in err


def test_untouched_export_still_loads(copied, tiny_mvtec_root, tmp_path) -> None:
    argv = ["run", "--model_dir", copied, "--input_dir", tiny_mvtec_root / "synthetic" / "test" / "good",
            "--output_dir", tmp_path / "out", "--backend", "onnx", "--no_progress"]  # fmt: skip
    assert run_aoi(argv) == 0
