"""Test helpers that need neither torch nor a fit: a tiny ONNX "run" written with the `onnx` helper API, test
images, and the `aoi` command in a process where torch, Lightning, timm and kornia cannot be imported.

The model: anomaly map = the channel mean of the input (B, 1, H, W); image score = its maximum. A dark image is
OK, a bright square is an NG with one defect there (thresholds 0.5 and 0.5).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

SIZE = (32, 32)
IMAGE_THRESHOLD = 0.5
PIXEL_THRESHOLD = 0.5
BLOCKED = (
    "torch",
    "torchvision",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "timm",
    "kornia",
    "torchmetrics",
)

#: Python code run with `python -c`: a meta-path finder refuses the blocked packages, then `aoi` runs.
AOI_WITHOUT_TORCH = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked in this process)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from aoi_lightning.cli import main
sys.exit(main(sys.argv[1:]))
"""


def aoi_argv(*args: object) -> list[str]:
    """argv of `aoi <args>` in a fresh interpreter where importing torch (and the rest of BLOCKED) fails."""
    return [sys.executable, "-c", AOI_WITHOUT_TORCH, *(str(a) for a in args)]


def make_tiny_onnx_run(folder: Path, run_id: str = "tiny_onnx") -> Path:
    """Write `<folder>/export/model.onnx`, `export_meta.json` and `<folder>/thresholds.json`; returns `folder`."""
    import onnx
    from onnx import TensorProto, helper

    h, w = SIZE
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, h, w])
    score = helper.make_tensor_value_info("pred_score", TensorProto.FLOAT, ["batch"])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, h, w])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["anomaly_map"], axes=[1], keepdims=1),
        helper.make_node("ReduceMax", ["anomaly_map"], ["pred_score"], axes=[1, 2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny_channel_mean", [image], [score, amap])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime of the supported range
    onnx.checker.check_model(model)
    export = folder / "export"
    export.mkdir(parents=True, exist_ok=True)
    onnx.save(model, export / "model.onnx")
    thresholds = {"image_threshold": IMAGE_THRESHOLD, "pixel_threshold": PIXEL_THRESHOLD}
    meta = {
        "model": "TinyChannelMean",
        "category": "synthetic",
        "run_id": run_id,
        "image_size": list(SIZE),
        "thresholds": {**thresholds, "quantile_image": None, "quantile_pixel": None},
    }
    (export / "export_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (folder / "thresholds.json").write_text(json.dumps({**thresholds, "method": "fixed"}), encoding="utf-8")
    return folder


def image_png(seed: int, defect: bool, size: tuple[int, int] = (40, 48)) -> bytes:
    """A PNG (h, w) = `size`: dark noise (channel mean < 0.35 everywhere), with a bright 10 px square when
    `defect`."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 90, size=(*size, 3), dtype=np.uint8)
    if defect:
        y, x = int(rng.integers(0, size[0] - 10)), int(rng.integers(0, size[1] - 10))
        img[y : y + 10, x : x + 10] = 250
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()
