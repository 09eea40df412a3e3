"""Inference from the ONNX export alone: numpy, OpenCV and onnxruntime; torch is never imported.

A run directory (or a copy of just its `export/` folder) is enough for the line PC.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aoi_lightning.data.preprocess import Preprocessing, PreprocessingError
from aoi_lightning.fileio import read_json, sha256_of
from aoi_lightning.postprocess.prediction import ModelFacts
from aoi_lightning.rundir.thresholds_file import check_thresholds_file

EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
META_FILE = "export_meta.json"
THRESHOLDS_FILE = "thresholds.json"
#: export_meta.json keys that `aoi export` also writes into the graph's metadata, compared at load.
GRAPH_CHECKED_KEYS = (
    "model",
    "run_id",
    "image_size",
    "preprocessing",
    "image_threshold",
    "pixel_threshold",
    "thresholds",  # the values `read_export` uses
)


class OnnxRunError(ValueError):
    """An export that is missing or does not match its metadata; one line for the user."""


def _export_dir(model_dir: Path) -> Path:
    if (model_dir / ONNX_FILE).is_file():
        return model_dir
    return model_dir / EXPORT_DIR


def export_preprocessing(meta: dict) -> Preprocessing:
    """The preprocessing of an export: `export_meta.json`'s `preprocessing`, or for exports written before it was
    recorded, the default one at `image_size` with the `normalization` mean/std.

    Raises:
        PreprocessingError: an invalid `preprocessing`, or one whose size differs from `image_size`.
        KeyError, TypeError, ValueError, IndexError: no usable `image_size` in an export without `preprocessing`.
    """
    if meta.get("preprocessing") is not None:
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        size = meta.get("image_size")
        if size is not None and list(preprocessing.image_size) != [int(v) for v in size]:
            raise PreprocessingError(
                f"preprocessing image_size {list(preprocessing.image_size)} differs from image_size {list(size)}"
            )
        return preprocessing
    size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
    norm = meta.get("normalization") or {}
    return Preprocessing.from_image_size(size, norm.get("mean"), norm.get("std"))


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX export checked against its metadata and the run's thresholds.json, ready for a runtime."""

    onnx_path: Path
    meta_path: Path
    meta: dict
    preprocessing: Preprocessing
    facts: ModelFacts
    run_id: str

    def check_graph_metadata(self, props: dict[str, str]) -> None:
        """Refuse an `export_meta.json` whose model, run, thresholds, image size or preprocessing differ from
        what `aoi export` wrote into the graph itself (`props`: the ONNX metadata_props, as the runtime reads
        them): the file was edited after the export. Keys the graph does not carry are not compared."""
        for key in GRAPH_CHECKED_KEYS:
            if key not in props or key not in self.meta:
                continue
            text = str(props[key])
            try:
                in_graph = json.loads(text)
            except ValueError:
                in_graph = text
            in_meta = self.meta[key]
            if not (_same_value(in_graph, in_meta) or (isinstance(in_graph, str) and in_graph == str(in_meta))):
                raise OnnxRunError(
                    f"{self.meta_path} says {key} {in_meta!r}, but {self.onnx_path} was exported with {in_graph!r}: "
                    f"the file was edited after the export; re-export with `aoi export --run_dir RUN`"
                )

    def check_input_shape(self, shape) -> None:
        """Refuse a graph whose (B, 3, H, W) input is not the recorded image size."""
        size = list(self.preprocessing.image_size)
        if len(shape) != 4 or [shape[2], shape[3]] != size:
            raise OnnxRunError(
                f"{self.onnx_path} takes input {list(shape)}, but {self.meta_path} says image_size {size}"
            )


def _same_value(a, b) -> bool:
    """Equal JSON values, numbers to float rounding (at any depth of dicts and lists)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def read_export(model_dir: str | Path) -> ExportedModel:
    """Read `<run>/export/` (or a folder holding model.onnx and export_meta.json): paths, preprocessing, facts.

    Raises:
        OnnxRunError: missing export or metadata, invalid metadata, no thresholds, or thresholds that differ from
            the run's thresholds.json (a stale export).
    """
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise OnnxRunError(f"--model_dir: folder not found: {model_dir}")
    folder = _export_dir(model_dir)
    onnx_path, meta_path = folder / ONNX_FILE, folder / META_FILE
    if not onnx_path.is_file():
        raise OnnxRunError(f"no ONNX export in {model_dir}: create it with `aoi export --run_dir {model_dir}`")
    if not meta_path.is_file():
        raise OnnxRunError(f"{meta_path} is missing: re-export with `aoi export --run_dir {model_dir}`")
    try:
        meta = read_json(meta_path)
        preprocessing = export_preprocessing(meta)
        thresholds = meta.get("thresholds") or {}
        image_t, pixel_t = float(thresholds["image_threshold"]), float(thresholds["pixel_threshold"])
    except PreprocessingError as exc:
        raise OnnxRunError(f"{meta_path}: {exc}") from exc
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise OnnxRunError(f"{meta_path} is not a valid export_meta.json ({type(exc).__name__}: {exc})") from exc
    # the graph files must be the ones the metadata describes (a model.onnx copied from another run, a damaged file)
    stale = f"re-export with `aoi export --run_dir {model_dir}`"
    for path, key in ((onnx_path, "sha256"), (folder / str(meta.get("external_data")), "external_data_sha256")):
        expected = meta.get(key)
        if expected and path.is_file() and sha256_of(path) != expected:
            raise OnnxRunError(f"{path} is not the file {meta_path} describes (sha256 differs): {stale}")
    # an export whose thresholds differ from the run's thresholds.json is stale (the run was refit or the
    # file edited after `aoi export`)
    check_thresholds_file(
        model_dir / THRESHOLDS_FILE,
        {"image_threshold": image_t, "pixel_threshold": pixel_t},
        "differs from the export's",
        f"the export is stale or the file was edited; re-export with `aoi export --run_dir {model_dir}`",
        OnnxRunError,
        meta_path,
    )
    facts = ModelFacts.from_thresholds(
        meta.get("model", ""),
        meta.get("category", ""),
        preprocessing.image_size,
        image_t,
        pixel_t,
        thresholds,
        resize=preprocessing.resize,
    )
    return ExportedModel(onnx_path, meta_path, meta, preprocessing, facts, str(meta.get("run_id", model_dir.name)))


class OnnxPredictor:
    """The `Predictor` of the AOI runner over ONNX Runtime."""

    def __init__(self, session, facts: ModelFacts, run_id: str, preprocessing: Preprocessing | None = None) -> None:
        self.session = session
        #: How the input images are made (export_meta.json's); default: the default one at `facts.input_size`.
        self.preprocessing = preprocessing or Preprocessing.from_image_size(facts.input_size)
        self.facts = facts
        self.run_id = run_id
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def from_run(
        cls, model_dir: str | Path, device: str = "cpu", threads: int = 0, spin_wait: bool = False
    ) -> OnnxPredictor:
        """Open `<run>/export/model.onnx` (or a folder holding model.onnx and export_meta.json) in ONNX Runtime.

        `spin_wait`: ONNX Runtime's threads busy-wait between operators and for a moment after each forward (its
        own default; `aoi serve`, where the model process has nothing else to run). Off (`aoi run`), they sleep as
        soon as they have no work, leaving the cores to the decoding and writing threads.

        Raises:
            OnnxRunError: missing export or metadata, an input size that differs from the metadata, no thresholds.
        """
        import onnxruntime as ort

        export = read_export(model_dir)
        options = ort.SessionOptions()
        # without busy-waiting, idle ONNX Runtime threads leave the cores to the decoding and writing threads of
        # `aoi run` (transistor PaDiM, 2 cores: 35.6 -> 28.7 ms per image)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        if threads > 0:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise OnnxRunError("--device cuda: onnxruntime has no CUDA provider here (use --device cpu)")
        try:
            session = ort.InferenceSession(str(export.onnx_path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise OnnxRunError(f"cannot load {export.onnx_path}: {str(exc).splitlines()[0]}") from exc
        export.check_input_shape(session.get_inputs()[0].shape)
        export.check_graph_metadata(dict(session.get_modelmeta().custom_metadata_map))
        return cls(session, export.facts, export.run_id, export.preprocessing)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, H, W) float32 in [0, 1] -> scores (B,) and maps (B, H, W)."""
        scores, maps = self.session.run(
            ["pred_score", "anomaly_map"], {self.input_name: np.ascontiguousarray(images, np.float32)}
        )
        return np.asarray(scores, np.float32).reshape(-1), np.asarray(maps, np.float32)[:, 0]
