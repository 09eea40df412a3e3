"""Loading a trained run: the model from `weights/model.ckpt` (weights_only) and the facts of its config."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from aoi_lightning.data.preprocess import PreprocessingError, image_size_hw
from aoi_lightning.models.lightning_base import AnomalyModule
from aoi_lightning.rundir.layout import RunDir
from aoi_lightning.rundir.thresholds_file import check_thresholds_file as check_thresholds_file_agrees

log = logging.getLogger(__name__)

#: Model classes a checkpoint may name (nothing else is ever imported from a checkpoint).
_PADIM = "aoi_lightning.models.padim.lightning_model:Padim"
_PATCHCORE = "aoi_lightning.models.patchcore.lightning_model:Patchcore"
MODEL_CLASSES = {
    "aoi_lightning.models.Padim": _PADIM,
    "aoi_lightning.models.Patchcore": _PATCHCORE,
    "aoi_lightning.models.padim.lightning_model.Padim": _PADIM,
    "aoi_lightning.models.patchcore.lightning_model.Patchcore": _PATCHCORE,
}


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used; the message says what to do."""


@dataclass
class RunInfo:
    """What inference needs to know about a trained run."""

    run: RunDir
    model_name: str
    category: str
    image_size: tuple[int, int]
    config: dict


def read_run_info(run_dir: str | Path) -> RunInfo:
    """Read `<run>/config.yaml` for the model name, category and input size."""
    run = RunDir(Path(run_dir).expanduser())
    if not run.path.is_dir():
        raise RunError(f"run directory not found: {run.path}")
    if not run.config.is_file():
        raise RunError(f"{run.path} is not a run directory (no config.yaml); train one with `aoi fit --config ...`")
    try:
        config = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RunError(f"cannot parse {run.config}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(config, dict):
        raise RunError(f"{run.config} is not a run config (a YAML mapping of model, data, trainer expected)")
    model_cfg, data_cfg = config.get("model") or {}, config.get("data") or {}
    for key, value in (("model", model_cfg), ("data", data_cfg)):
        if not isinstance(value, dict):
            raise RunError(f"{run.config}: `{key}` must be a mapping, got {type(value).__name__}")
    class_path = str(model_cfg.get("class_path", ""))
    try:
        size = image_size_hw(data_cfg.get("image_size", 256))
    except PreprocessingError as exc:
        raise RunError(f"{run.config}: data.{exc}") from exc
    return RunInfo(run, class_path.rsplit(".", 1)[-1].lower(), str(data_cfg.get("category", "")), size, config)


@contextlib.contextmanager
def run_files_checked(what: str) -> Iterator[None]:
    """Within the block, a run file of valid JSON but of another shape than `aoi fit` writes (a list for an
    object, a string for a number: an edited or damaged file) is a one-line `RunError` naming `what`, not a
    traceback from deep inside the code that reads it."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        raise RunError(
            f"the files of {what} do not have the shape `aoi fit` writes ({type(exc).__name__}: {exc}); "
            "was one edited or damaged?"
        ) from exc


def read_checkpoint(ckpt_path: str | Path, mmap: bool = False) -> dict:
    """The content of an AOI checkpoint, loaded with `weights_only=True`: a checkpoint that carries pickled
    code is refused, never executed. With `mmap` the tensors are mapped, not read (cheap for a look at the
    hyper-parameters).

    Raises:
        RunError: missing, pickled-code, truncated or corrupt file, or not an AOI model checkpoint.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise RunError(f"checkpoint not found: {ckpt_path}; train a run with `aoi fit --config ...`")
    try:
        # mapping needs the zip format of torch.save; any other file is read (and judged) the plain way
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(ckpt_path))
    except pickle.UnpicklingError as exc:
        with open(ckpt_path, "rb") as handle:
            head = handle.read(2)
        # an intact container (a torch.save zip, or a pickle's PROTO opcode) that the weights-only unpickler
        # refuses holds something else than tensors; other bytes are damaged
        intact = zipfile.is_zipfile(ckpt_path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
        if not intact and "global" not in str(exc).lower():
            raise RunError(f"cannot read {ckpt_path}: truncated or corrupt file (not a readable checkpoint)") from exc
        raise RunError(
            f"refusing to load {ckpt_path}: it holds pickled Python objects beyond plain tensors and containers "
            "(they could run code); only weights-only checkpoints written by `aoi fit` are accepted"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways
        first = str(exc).strip().split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"cannot read {ckpt_path}: truncated or corrupt file ({first})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise RunError(f"{ckpt_path} is not an AOI model checkpoint")
    return ckpt


def checkpoint_model_class(ckpt: dict) -> str:
    """The class path a checkpoint names (`aoi_lightning.models.Padim` ...), as stored."""
    hparams = ckpt.get("hyper_parameters") or {}
    return str(hparams.get("_class_path", "") or ckpt.get("hparams_name", ""))


def _model_label(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1].rsplit(":", 1)[-1] or "unknown"


#: Model hyper-parameters that shape the fitted state: a command whose config differs in one of them cannot use the
#: checkpoint (settings such as `sigma`, `weights`, `search` or `tile_batch` may differ).
STRUCTURAL_KEYS = ("backbone", "layers", "tile_size", "tile_overlap", "tile_thresholds")


def _image_size(value) -> tuple[int, int] | None:
    """`data.image_size` as (h, w): an int is square; None stays None."""
    if value is None:
        return None
    if isinstance(value, int | float | str):
        return (int(value), int(value))
    values = [int(v) for v in value]
    return (values[0], values[-1])


def _layers(value) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(v) for v in value)


def _default_layers(class_path: str, backbone: str) -> tuple[str, ...] | None:
    """The layers `layers: null` resolves to for a model class and backbone (None when unknown)."""
    target = MODEL_CLASSES.get(class_path)
    if target is None:
        return None
    from aoi_lightning.models.components.feature_extractor import layers_for_strides
    from aoi_lightning.models.padim.torch_model import PadimModel
    from aoi_lightning.models.patchcore.torch_model import PatchcoreModel

    strides = (PadimModel if target == _PADIM else PatchcoreModel).default_strides
    try:
        return layers_for_strides(backbone, strides)
    except Exception:  # noqa: BLE001 - an unknown backbone is reported by the backbone comparison
        return None


def _fitted_image_size(ckpt: dict, ckpt_path: str | Path) -> tuple[int, int] | None:
    """Input size the checkpoint was fitted at: stored in it by `aoi fit`, else its run's config.yaml."""
    meta = ckpt.get("aoi") if isinstance(ckpt.get("aoi"), dict) else {}
    if meta.get("image_size"):
        return _image_size(meta["image_size"])
    run = RunDir.from_checkpoint(ckpt_path)
    if run is None:
        return None
    try:
        config = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    return _image_size((config.get("data") or {}).get("image_size"))


def structural_differences(
    ckpt: dict, ckpt_path: str | Path, model_config: dict, image_size
) -> list[tuple[str, object, object]]:
    """Differences between a checkpoint and a command's config that make the checkpoint unusable with it: model
    class, backbone, feature layers (`null` resolved to the backbone's default), tiling and input size.

    Args:
        ckpt: checkpoint content (`read_checkpoint`).
        ckpt_path: its path (to find its run's config.yaml when the input size is not stored in it).
        model_config: the command's `model` section: {"class_path": ..., "init_args": {...}}.
        image_size: the command's `data.image_size` (int or [h, w]; None: not compared).

    Returns:
        (config key, checkpoint value, command value) for each difference; empty when they agree.
    """
    out: list[tuple[str, object, object]] = []
    want_class = str(model_config.get("class_path", ""))
    have_class = checkpoint_model_class(ckpt)
    want, have = MODEL_CLASSES.get(want_class), MODEL_CLASSES.get(have_class)
    if want is not None and have is not None and want != have:
        return [("model.class_path", _model_label(have), _model_label(want))]
    hparams = ckpt.get("hyper_parameters") or {}
    init = dict(model_config.get("init_args") or {})
    for key in STRUCTURAL_KEYS:
        if key not in hparams or key not in init:
            continue
        ours, theirs = init[key], hparams[key]
        if key == "layers":
            ours, theirs = _layers(ours), _layers(theirs)
            if (ours is None) != (theirs is None) and init.get("backbone") == hparams.get("backbone"):
                default = _default_layers(have_class or want_class, str(hparams.get("backbone")))
                ours, theirs = ours or default, theirs or default
        if ours != theirs:
            out.append((f"model.init_args.{key}", theirs, ours))
    fitted = _fitted_image_size(ckpt, ckpt_path)
    asked = _image_size(image_size)
    if fitted is not None and asked is not None and fitted != asked:
        out.append(("data.image_size", _size_text(fitted), _size_text(asked)))
    return out


def _size_text(size: tuple[int, int]) -> object:
    return size[0] if size[0] == size[1] else list(size)


def _value_text(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else str(value)


def _refuse_differences(ckpt: dict, ckpt_path: str | Path, model_config: dict, image_size, config_name: str) -> None:
    """RunError naming each structural difference with both values (one line)."""
    differences = structural_differences(ckpt, ckpt_path, model_config, image_size)
    if differences:
        text = "; ".join(
            f"{key} {_value_text(theirs)} ({config_name} has {_value_text(ours)})" for key, theirs, ours in differences
        )
        raise RunError(
            f"{ckpt_path} was fitted with {text}: use the config.yaml of the checkpoint's own run or fit a new model"
        )


def check_checkpoint_for_config(
    ckpt_path: str | Path,
    config_class_path: str,
    config_name: str = "the config",
    model_config: dict | None = None,
    image_size=None,
) -> None:
    """Checks of a checkpoint before LightningCLI uses it (tensors mapped, not read): refuse an unsafe or
    damaged file, a checkpoint of another model than the config builds (e.g. a PaDiM checkpoint for a
    PatchCore config; model classes this package does not know are not compared), a checkpoint whose structure
    (backbone, layers, tiling, input size: `structural_differences`) differs from `model_config` and
    `image_size`, and, for a checkpoint at `<run>/weights/model.ckpt`, a `<run>/thresholds.json` that disagrees
    with its thresholds.

    Raises:
        RunError: with a one-line message naming the file (and, for a structural difference, both values).
    """
    ckpt = read_checkpoint(ckpt_path, mmap=True)
    want = MODEL_CLASSES.get(str(config_class_path))
    have = MODEL_CLASSES.get(checkpoint_model_class(ckpt))
    if want is not None and have is not None and want != have:
        raise RunError(
            f"{ckpt_path} holds a {_model_label(have)} model, but {config_name} builds {_model_label(want)}: "
            "use the config.yaml of the checkpoint's own run"
        )
    if model_config is not None:
        _refuse_differences(ckpt, ckpt_path, model_config, image_size, "the command's config")
    run = RunDir.from_checkpoint(ckpt_path)
    state = ckpt.get("state_dict") or {}
    keys = ("image_threshold", "pixel_threshold")
    if run is not None and all(f"model.{k}" in state for k in keys):
        check_thresholds_file({k: float(state[f"model.{k}"]) for k in keys}, run)


def load_checkpoint_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> AnomalyModule:
    """Build the model a checkpoint names and load its fitted state. Loads with `weights_only=True`:
    a checkpoint that carries pickled code is refused, never executed."""
    ckpt_path = Path(ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    hparams = dict(ckpt["hyper_parameters"])
    class_path = checkpoint_model_class(ckpt)
    hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    target = MODEL_CLASSES.get(class_path)
    if target is None:
        raise RunError(f"{ckpt_path} names model {class_path!r}; known: Padim, Patchcore")
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    hparams["weights"] = "none"  # the backbone weights come from the checkpoint itself
    try:
        model = cls(**hparams)
    except TypeError as exc:
        raise RunError(f"{ckpt_path}: hyper-parameters do not fit {cls_name}: {exc}") from exc
    try:
        model.on_load_checkpoint(ckpt)
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except (RuntimeError, ValueError) as exc:
        raise RunError(f"{ckpt_path} does not match its model: {str(exc).splitlines()[0]}") from exc
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RunError(f"{ckpt_path} does not match its model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if not model.model.is_fitted:
        raise RunError(f"{ckpt_path} holds an unfitted model")
    return model.to(device).eval()


def check_thresholds_file(thresholds: dict[str, float], run: RunDir) -> None:
    """The checkpoint's threshold buffers (`thresholds`: image_threshold, pixel_threshold) are what the model
    uses; a `thresholds.json` beside it that says otherwise (edited, or from another fit) is an error rather
    than a silent choice (`rundir.thresholds_file.check_thresholds_file`). No file, or a checkpoint without
    thresholds: nothing to check.

    Raises:
        RunError: unreadable thresholds.json, or a threshold in it that differs from the checkpoint's.
    """
    if not all(math.isfinite(v) for v in thresholds.values()):
        return
    check_thresholds_file_agrees(
        run.thresholds,
        thresholds,
        "does not match the checkpoint's",
        "the checkpoint's thresholds are the model's: restore the thresholds.json of this fit or refit, "
        "and set the defect sensitivity with --pixel_threshold_mult, not by editing the file",
        RunError,
        run.checkpoint,
    )


def _apply_search_settings(model: AnomalyModule, config: dict) -> None:
    """PatchCore's faiss index is a search setting, not saved with the model: take the run's config.yaml one."""
    init = (config.get("model") or {}).get("init_args") or {}
    if not hasattr(model.model, "index") or not init.get("index"):
        return
    try:
        model.model.use_index(str(init["index"]), init.get("index_params"))
    except ValueError as exc:
        raise RunError(f"model.init_args.index in config.yaml: {exc}") from exc


def load_run_model(
    run_dir: str | Path, device: str | torch.device = "cpu", require_thresholds: bool = True
) -> tuple[AnomalyModule, RunInfo]:
    """Model and facts of a run directory; with `require_thresholds`, a run without tuned thresholds, or with a
    thresholds.json that disagrees with the checkpoint, is an error.

    The model's `preprocessing` is the checkpoint's (what it was fitted with); for checkpoints written before
    it was recorded, it is built from config.yaml's `data.image_size` and the backbone's normalisation.

    Raises:
        RunError: missing run or checkpoint, a checkpoint of another model or structure (backbone, layers, tiling,
            input size) than config.yaml names, no thresholds.
    """
    info = read_run_info(run_dir)
    model = load_checkpoint_model(info.run.checkpoint, device)
    class_path = str((info.config.get("model") or {}).get("class_path", ""))
    want = MODEL_CLASSES.get(class_path)
    if want is None:
        log.warning(
            "%s names the model class %r, which this package does not know (known: %s); the checkpoint's %s is used",
            info.run.config,
            class_path,
            ", ".join(k for k in MODEL_CLASSES if k.count(".") == 2),
            type(model).__name__,
        )
    have = MODEL_CLASSES.get(type(model).__module__ + "." + type(model).__name__)
    if want is not None and have is not None and want != have:
        raise RunError(
            f"{info.run.checkpoint} holds a {_model_label(have)} model, but {info.run.config} names "
            f"{_model_label(want)}: the checkpoint belongs to another run"
        )
    _refuse_differences(
        read_checkpoint(info.run.checkpoint, mmap=True),
        info.run.checkpoint,
        info.config.get("model") or {},
        (info.config.get("data") or {}).get("image_size"),
        str(info.run.config),
    )
    _apply_search_settings(model, info.config)
    if model.preprocessing is None:  # a checkpoint written before it recorded its preprocessing
        model.preprocessing = model.make_preprocessing(info.image_size)
    if require_thresholds and not model.model.has_thresholds:
        raise RunError(
            f"{info.run.path} has no thresholds: fit it with the ThresholdTuning callback "
            "(e.g. `aoi fit --config experiments/patchcore_mvtec.yaml`), which writes thresholds.json"
        )
    if require_thresholds:
        check_module_thresholds(model, info.run)
    return model, info


def check_module_thresholds(module: AnomalyModule, run: RunDir) -> None:
    """The run's thresholds.json must agree with the threshold buffers of its loaded model (`check_thresholds_file`)."""
    keys = ("image_threshold", "pixel_threshold")
    check_thresholds_file({k: float(getattr(module.model, k)) for k in keys}, run)
