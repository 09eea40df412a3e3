"""Loading a trained run: the model from `weights/model.ckpt` (weights_only) and the facts of its config."""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from aoi_lightning.models.lightning_base import AnomalyModule
from aoi_lightning.runs.layout import RunDir

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
    except yaml.YAMLError as exc:
        raise RunError(f"cannot parse {run.config}: {str(exc).splitlines()[0]}") from exc
    model_cfg = config.get("model") or {}
    class_path = str(model_cfg.get("class_path", ""))
    data_cfg = config.get("data") or {}
    size = data_cfg.get("image_size", 256)
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return RunInfo(run, class_path.rsplit(".", 1)[-1].lower(), str(data_cfg.get("category", "")), size, config)


def load_checkpoint_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> AnomalyModule:
    """Build the model a checkpoint names and load its fitted state. Loads with `weights_only=True`:
    a checkpoint that carries pickled code is refused, never executed."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise RunError(f"checkpoint not found: {ckpt_path}; train a run with `aoi fit --config ...`")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RunError(
            f"refusing to load {ckpt_path}: it holds pickled Python objects beyond plain tensors and containers "
            "(they could run code); only weights-only checkpoints written by `aoi fit` are accepted"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways
        first = str(exc).strip().split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"cannot read {ckpt_path}: truncated or corrupt file ({first})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise RunError(f"{ckpt_path} is not an AOI model checkpoint")
    hparams = dict(ckpt["hyper_parameters"])
    class_path = str(hparams.pop("_class_path", "") or ckpt.get("hparams_name", ""))
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


def load_run_model(
    run_dir: str | Path, device: str | torch.device = "cpu", require_thresholds: bool = True
) -> tuple[AnomalyModule, RunInfo]:
    """Model and facts of a run directory; with `require_thresholds`, a run without tuned thresholds is an error."""
    info = read_run_info(run_dir)
    model = load_checkpoint_model(info.run.checkpoint, device)
    if require_thresholds and not model.model.has_thresholds:
        raise RunError(
            f"{info.run.path} has no thresholds: fit it with the ThresholdTuning callback "
            "(e.g. `aoi fit --config experiments/patchcore_mvtec.yaml`), which writes thresholds.json"
        )
    return model, info
