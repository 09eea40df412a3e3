"""ONNX export of a fitted torch model: `model.onnx` (normalisation in the graph) and `export_meta.json`.

Uses the TorchScript-based exporter (`dynamo=False`): with torch 2.14 the torch.export-based one specialises the
batch axis of PaDiM and cannot down-convert kornia's padding to opset 17. Pure torch/onnx: no Lightning here.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from aoi_lightning.data.preprocess import INTERPOLATIONS, RESIZE_DESCRIPTIONS, Preprocessing
from aoi_lightning.fileio import dumps, read_json, sha256_of, write_json
from aoi_lightning.models.components.base import AnomalyTorchModel, InferenceOutput
from aoi_lightning.models.components.feature_extractor import fix_same_padding
from aoi_lightning.progress import phase
from aoi_lightning.rundir.meta import package_versions, utc_now

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = tuple(InferenceOutput._fields)  # ("pred_score", "anomaly_map")
MODEL_FILE = "model.onnx"
META_FILE = "export_meta.json"
CONSISTENCY_FILE = "consistency.json"
DEFAULT_OPSET = 17
#: Above this many bytes of weights the graph is saved with its tensors in `model.onnx.data` (protobuf limit 2 GiB).
EXTERNAL_DATA_BYTES = 2_000_000_000


class ExportError(ValueError):
    """An export that cannot be made or read; the message says what to do."""


def describe_model(model: AnomalyTorchModel) -> dict:
    """Backbone, layers and in-graph normalisation of a torch model."""
    extractor = getattr(model, "feature_extractor", None)
    out: dict = {"torch_class": type(model).__name__}
    norm = model.input_normalization() if hasattr(model, "input_normalization") else None
    if extractor is not None:
        out["backbone"] = extractor.backbone_name
        out["layers"] = list(extractor.layers)
    if norm is not None:
        out["normalization"] = {
            "mean": list(norm[0]),
            "std": list(norm[1]),
            "in_graph": True,
            "note": "applied inside the graph: feed RGB images scaled to [0, 1], not normalised",
        }
    bank = getattr(model, "memory_bank", None)
    if bank is not None:
        out["memory_bank_size"] = int(bank.shape[0])
    tiling = model.tiling_info() if hasattr(model, "tiling_info") else None
    if tiling is not None:  # the input stays the whole image at image_size; the graph cuts and stitches tiles
        out["tiling"] = tiling
    return out


def _metadata_props(meta: dict) -> dict[str, str]:
    """ONNX metadata_props: string values, JSON for anything nested or numeric."""
    keys = (
        "model",
        "category",
        "run_id",
        "backbone",
        "layers",
        "image_size",
        "preprocessing",
        "input",
        "outputs",
        "normalization",
        "image_threshold",
        "pixel_threshold",
        "thresholds",
        "opset",
        "versions",
        "created_at",
    )
    props = {}
    for key in keys:
        if key in meta:
            value = meta[key]
            props[key] = value if isinstance(value, str) else dumps(value)
    props["format"] = "aoi_lightning.onnx/1"
    return props


#: Initializers of at least this many bytes are candidates for float16 storage (see `store_exact_float16`).
FLOAT16_MIN_BYTES = 1 << 20


def store_exact_float16(proto: onnx.ModelProto, min_bytes: int | None = None) -> int:
    """Store every float32 initializer or `Constant` node value of at least `min_bytes` whose values are all
    exact float16 numbers as a float16 initializer widened by a `Cast` node, in place.

    The exporter writes PaDiM's float16 whitening panels (`stats_dtype: float16`) as float32 constants, which
    doubles the file against the checkpoint; stored back as float16 the graph computes the same numbers (the
    widening is exact, and ONNX Runtime folds the casts once when it loads the model). Weights that are not
    exact float16 values (the backbone, float32 statistics) are left alone.

    Returns:
        The bytes saved.
    """
    from onnx import TensorProto, helper, numpy_helper

    min_bytes = FLOAT16_MIN_BYTES if min_bytes is None else min_bytes
    graph_inputs = {value.name for value in proto.graph.input}

    def as_half(tensor: onnx.TensorProto) -> np.ndarray | None:
        """The float16 values of a large float32 tensor that float16 holds exactly, else None."""
        if tensor.data_type != TensorProto.FLOAT or len(tensor.raw_data) < min_bytes:
            return None
        with warnings.catch_warnings():  # a read-only view of the protobuf's bytes, never written to
            warnings.filterwarnings("ignore", message=".*not writable.*")
            values = torch.from_numpy(numpy_helper.to_array(tensor))
        half = values.to(torch.float16)  # torch converts with vector instructions, numpy one value at a time
        return half.numpy() if torch.equal(half.to(torch.float32), values) else None

    def widen(name: str) -> onnx.NodeProto:
        return helper.make_node("Cast", [f"{name}_float16"], [name], to=TensorProto.FLOAT, name=f"{name}_widen")

    casts, saved = [], 0
    for init in proto.graph.initializer:
        half = None if init.name in graph_inputs else as_half(init)
        if half is None:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, f"{name}_float16"))
        casts.append(widen(name))
        saved += half.nbytes  # float32 takes twice float16's bytes
    nodes = list(proto.graph.node)
    for position, node in enumerate(nodes):
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        half = None if value is None else as_half(value)
        if half is None:
            continue
        name = node.output[0]
        proto.graph.initializer.append(numpy_helper.from_array(half, f"{name}_float16"))
        nodes[position] = widen(name)
        saved += half.nbytes
    if saved:
        del proto.graph.node[:]
        proto.graph.node.extend(casts + nodes)
    return saved


def _weights_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or 4 * math.prod(t.dims) for t in proto.graph.initializer)


def _trace(model: AnomalyTorchModel, image_size: tuple[int, int], path: Path, opset: int) -> None:
    dummy = torch.rand(2, 3, *image_size)  # batch 2: no batch-1 specialisation gets baked into the graph
    fixed = fix_same_padding(model, dummy)  # also builds size-dependent constants (e.g. the blur matrices)
    if fixed:
        log.info("%d convolutions with TensorFlow 'SAME' padding fixed for %dx%d", fixed, *image_size)
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with warnings.catch_warnings():
        # shape-dependent Python values (kernel sizes, bank size) are constants of the trained input size
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*", category=DeprecationWarning)
        try:
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except (RuntimeError, ValueError) as exc:
            if "opset" not in str(exc).lower():
                raise
            first = str(exc).strip().splitlines()[0]
            raise ExportError(f"--opset {opset} is not supported by this torch's exporter ({first})") from exc


def export_onnx(
    torch_model: AnomalyTorchModel,
    image_size: tuple[int, int],
    path: str | Path,
    meta: dict | None = None,
    opset: int = DEFAULT_OPSET,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Export a fitted model to ONNX and write `export_meta.json` next to it; each file is replaced atomically.

    Args:
        torch_model: fitted model; forward maps images (B, 3, H, W) in [0, 1] to `InferenceOutput`.
        image_size: (H, W) the model was trained at; the graph has a fixed H, W and a dynamic batch axis.
        path: target `.onnx` file (usually `<run>/export/model.onnx`).
        meta: facts of the run to record (model, category, run_id, thresholds info, ...).
        opset: ONNX opset version.
        preprocessing: how the model's input images are made (recorded as `preprocessing`); default: the default
            one at `image_size` with the model's normalisation.

    Raises:
        ExportError: unfitted model, or a `preprocessing` of another size than `image_size`.

    Returns:
        The path of the written ONNX file.
    """
    with phase("ONNX export") as exported:
        if not torch_model.is_fitted:
            raise ExportError(f"{type(torch_model).__name__} is not fitted: run `aoi fit` before exporting")
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = int(image_size[0]), int(image_size[1])
        if preprocessing is None:
            norm = torch_model.input_normalization() if hasattr(torch_model, "input_normalization") else None
            preprocessing = Preprocessing.from_image_size((h, w), *(norm or (None, None)))
        if preprocessing.image_size != (h, w):
            raise ExportError(
                f"preprocessing size {list(preprocessing.image_size)} differs from the export size {[h, w]}"
            )
        model = copy.deepcopy(torch_model).to("cpu").eval()
        image_t, pixel_t = float(model.image_threshold), float(model.pixel_threshold)
        if not (math.isfinite(image_t) and math.isfinite(pixel_t)):
            log.warning("exporting a model without thresholds: export_meta.json records them as null")
        info = dict(meta or {})
        info.update(describe_model(model))
        info.update(
            {
                "image_size": [h, w],
                "preprocessing": preprocessing.to_dict(),
                "input": {
                    "name": INPUT_NAME,
                    "shape": ["batch", 3, h, w],
                    "dtype": "float32",
                    "range": [0.0, 1.0],
                    "layout": "NCHW",
                    "channels": preprocessing.channels,
                    "resize": f"{RESIZE_DESCRIPTIONS[preprocessing.resize]} with "
                    f"{INTERPOLATIONS[preprocessing.interpolation]}",
                },
                "outputs": {"pred_score": ["batch"], "anomaly_map": ["batch", 1, h, w]},
                "image_threshold": image_t,
                "pixel_threshold": pixel_t,
                "opset": int(opset),
                "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                "versions": package_versions(),
                "created_at": utc_now(),
            }
        )
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tmp = tmp_dir / path.name
            with torch.no_grad(), model.export_mode():
                _trace(model, (h, w), tmp, opset)
            proto = onnx.load(str(tmp))
            saved = store_exact_float16(proto)
            if saved:
                log.info("float16 statistics stored as float16 in the graph (%.1f MB saved)", saved / 1e6)
            for key, value in _metadata_props(info).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            proto.doc_string = f"AOI Anomaly Inspector {info.get('model', '')} model; see {META_FILE}"
            external = _weights_bytes(proto) > EXTERNAL_DATA_BYTES
            data_name = f"{path.name}.data"
            for stale in tmp_dir.iterdir():
                stale.unlink()
            onnx.save_model(
                proto,
                str(tmp),
                save_as_external_data=external,
                all_tensors_to_one_file=True,
                location=data_name if external else None,
            )
            del proto
            onnx.checker.check_model(str(tmp))
            info["external_data"] = data_name if external else None
            info["model_file"] = path.name
            info["size_bytes"] = tmp.stat().st_size + ((tmp_dir / data_name).stat().st_size if external else 0)
            info["sha256"] = sha256_of(tmp)
            info["external_data_sha256"] = sha256_of(tmp_dir / data_name) if external else None
            if external:
                os.replace(tmp_dir / data_name, path.parent / data_name)
            os.replace(tmp, path)
            if not external:
                (path.parent / data_name).unlink(missing_ok=True)  # weights of an earlier, larger export
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        write_json(path.parent / META_FILE, info)
        stale = path.parent / CONSISTENCY_FILE
        if stale.is_file():  # it described the previous export
            stale.unlink()
            log.info("removed %s of the previous export: run `aoi consistency` again", stale)
        exported.detail = f"{info['size_bytes'] / 1e6:.1f} MB, written to {path}"
    return path


def export_module(
    module, image_size: tuple[int, int], export_dir: str | Path, extra: dict | None = None, opset: int = DEFAULT_OPSET
) -> Path:
    """Export a trained model module (anything with `.model`, `.model_name`, `.threshold_info` and optionally
    `.preprocessing`) to `<export_dir>/model.onnx` with its thresholds information."""
    meta = {"model": getattr(module, "model_name", type(module.model).__name__.lower())}
    meta.update(extra or {})
    meta["thresholds"] = dict(getattr(module, "threshold_info", None) or {})
    preprocessing = getattr(module, "preprocessing", None)
    return export_onnx(module.model, image_size, Path(export_dir) / MODEL_FILE, meta, opset, preprocessing)


def read_export_meta(export_dir: str | Path) -> dict:
    """`export_meta.json` of an export folder; a missing or unreadable file is an `ExportError`."""
    path = Path(export_dir) / META_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found: re-export the run with `aoi export --run_dir RUN`")
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}; re-export the run with `aoi export --run_dir RUN`") from exc


def onnx_input_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of the `image` input of an ONNX file (weights are not loaded)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors come in many types
        raise ExportError(f"cannot read ONNX file {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    inputs = [i for i in proto.graph.input if i.name == INPUT_NAME]
    if not inputs:
        raise ExportError(f"{path} has no input named {INPUT_NAME!r}; re-export it with `aoi export --run_dir RUN`")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[2].HasField("dim_value") or not dims[3].HasField("dim_value"):
        raise ExportError(f"{path}: input {INPUT_NAME!r} is not a fixed-size (B, 3, H, W) image batch")
    return int(dims[2].dim_value), int(dims[3].dim_value)
