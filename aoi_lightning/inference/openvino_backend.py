"""Inference from the ONNX export with the OpenVINO runtime (CPU); torch is never imported.

OpenVINO reads `export/model.onnx` directly (no conversion step, nothing written next to the run) and compiles it
for the CPU it runs on. Numbers are kept in float32 (`INFERENCE_PRECISION_HINT: f32`): on CPUs with bfloat16
units OpenVINO would otherwise lower the precision by default, beyond the consistency tolerances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aoi_lightning.inference.onnx_backend import OnnxRunError, read_export


class OpenVinoPredictor:
    """The `Predictor` of the AOI runner over the OpenVINO runtime, reading the run's ONNX export."""

    def __init__(self, compiled, facts, run_id: str, preprocessing) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.scores_port = compiled.output("pred_score")
        self.maps_port = compiled.output("anomaly_map")
        self.facts = facts
        self.run_id = run_id
        self.preprocessing = preprocessing

    @classmethod
    def from_run(cls, model_dir: str | Path, device: str = "cpu", threads: int = 0) -> OpenVinoPredictor:
        """Compile `<run>/export/model.onnx` for OpenVINO's CPU plugin.

        Raises:
            OnnxRunError: a missing or stale export (see `read_export`), the openvino package missing, or a
                device other than the CPU.
        """
        if device not in ("cpu", "auto"):
            raise OnnxRunError(f"--device {device}: the openvino back end runs on the CPU (use --device cpu)")
        try:
            import openvino as ov
        except ImportError as exc:
            raise OnnxRunError(
                "--backend openvino needs the OpenVINO runtime: pip install openvino (or use --backend onnx)"
            ) from exc
        export = read_export(model_dir)
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            model = core.read_model(str(export.onnx_path))
            shape = model.input(0).get_partial_shape()
            export.check_input_shape([str(d) if d.is_dynamic else d.get_length() for d in shape])
            info = model.get_rt_info()
            framework = info["framework"] if "framework" in info else {}  # the ONNX metadata_props
            export.check_graph_metadata({str(k): v.astype(str) for k, v in dict(framework).items()})
            compiled = core.compile_model(model, "CPU", config)
        except OnnxRunError:
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise OnnxRunError(f"cannot load {export.onnx_path} in OpenVINO: {str(exc).splitlines()[0]}") from exc
        return cls(compiled, export.facts, export.run_id, export.preprocessing)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, H, W) float32 in [0, 1] -> scores (B,) and maps (B, H, W)."""
        result = self.request.infer({0: np.ascontiguousarray(images, np.float32)})
        scores = np.asarray(result[self.scores_port], np.float32).reshape(-1)
        maps = np.asarray(result[self.maps_port], np.float32)[:, 0]
        return scores, maps
