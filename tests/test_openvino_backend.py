"""`aoi run --backend openvino`: OpenVINO on the ONNX export gives the ONNX Runtime records, without torch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny_onnx import aoi_argv

from aoi_lightning.inference.onnx_backend import OnnxPredictor, OnnxRunError

pytest.importorskip("openvino")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("run_name", ["padim_run", "patchcore_run"])
def test_openvino_records_equal_onnx_runtime_ones(run_name: str, request, tiny_mvtec_root: Path, tmp_path: Path):
    run = request.getfixturevalue(run_name)
    images = tiny_mvtec_root / "synthetic" / "test"
    out = {}
    for backend in ("onnx", "openvino"):
        out[backend] = tmp_path / backend
        cmd = ["run", "--model_dir", str(run), "--input_dir", str(images), "--recursive", "--no_progress"]
        res = subprocess.run(
            aoi_argv(*cmd, "--backend", backend, "--output_dir", str(out[backend])),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
    a, b = _records(out["onnx"] / "preds.jsonl"), _records(out["openvino"] / "preds.jsonl")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["image_path"] == y["image_path"] and set(x) == set(y)
        assert x["pred_score"] == pytest.approx(y["pred_score"], rel=1e-4, abs=1e-4)
        assert x["label"] == y["label"]


def test_openvino_predictor_matches_onnx_runtime_on_a_batch(patchcore_run: Path):
    from aoi_lightning.inference.openvino_backend import OpenVinoPredictor

    ort, ov = OnnxPredictor.from_run(patchcore_run), OpenVinoPredictor.from_run(patchcore_run)
    assert ov.facts == ort.facts and ov.preprocessing == ort.preprocessing
    h, w = ov.preprocessing.image_size
    images = np.random.default_rng(0).random((3, 3, h, w), dtype=np.float32)
    (s1, m1), (s2, m2) = ort.predict(images), ov.predict(images)
    assert s2.shape == (3,) and m2.shape == (3, h, w)
    np.testing.assert_allclose(s2, s1, rtol=1e-4, atol=1e-4)
    assert float(np.abs(m2 - m1).mean()) < 1e-4


def test_openvino_predictor_refuses_a_gpu_and_a_missing_export(patchcore_run: Path, tmp_path: Path):
    from aoi_lightning.inference.openvino_backend import OpenVinoPredictor

    with pytest.raises(OnnxRunError, match="CPU"):
        OpenVinoPredictor.from_run(patchcore_run, device="cuda")
    with pytest.raises(OnnxRunError, match="aoi export"):
        OpenVinoPredictor.from_run(tmp_path)
