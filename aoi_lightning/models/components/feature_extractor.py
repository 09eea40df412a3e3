"""timm `features_only` backbone with named layers, in-graph normalisation and explicit weight sources."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import nn

from aoi_lightning.models.components.weights import (
    IMAGENET_MEAN_STD,
    LITE_MEAN_STD,
    WeightsError,
    imagenet_hint,
    load_package_state_dict,
    load_user_state_dict,
)

#: `weights` values that are not file paths.
WEIGHT_KEYWORDS = ("package", "imagenet", "none")


class LayerError(ValueError):
    """An unknown backbone or layer name; `key` is the config key it concerns."""

    def __init__(self, message: str, key: str = "model.layers") -> None:
        super().__init__(message)
        self.key = key


def available_layers(backbone: str) -> list[str]:
    """Feature layer names of a timm backbone, from its `feature_info` (no forward pass)."""
    model = _create(backbone, out_indices=None, pretrained=False)
    return list(model.feature_info.module_name())


def _create(backbone: str, out_indices: Sequence[int] | None, pretrained: bool) -> nn.Module:
    if backbone not in timm.list_models() and backbone not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:12]
        raise LayerError(
            f"unknown backbone {backbone!r}; timm names such as: {', '.join(close) or 'resnet18'}", key="model.backbone"
        )
    kwargs = {"features_only": True, "pretrained": pretrained, "exportable": True}
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    return timm.create_model(backbone, **kwargs)


def resolve_layer_indices(backbone: str, layers: Sequence[str]) -> list[int]:
    """Indices into timm's `feature_info` for the given module names; an unknown name lists the valid ones."""
    names = available_layers(backbone)
    indices = []
    for layer in layers:
        if layer not in names:
            raise LayerError(f"unknown layer {layer!r} for backbone {backbone!r}; valid layers: {', '.join(names)}")
        indices.append(names.index(layer))
    if indices != sorted(indices) or len(set(indices)) != len(indices):
        raise LayerError(f"layers must be distinct and in network order; got {list(layers)} (order: {names})")
    return indices


def default_mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation the backbone was trained with (timm's pretrained config)."""
    if backbone.startswith("tf_efficientnet_lite"):
        return LITE_MEAN_STD
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is not None and getattr(cfg, "mean", None):
        return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN_STD


class FeatureExtractor(nn.Module):
    """Backbone truncated after the last requested layer; input images in [0, 1], normalised inside.

    Args:
        backbone: timm model name, e.g. `tf_efficientnet_lite0`, `resnet18`, `wide_resnet50_2`.
        layers: module names from `feature_info`, e.g. `("blocks.1", "blocks.2", "blocks.4")`.
        weights: `package` (pip-installed EfficientNet-Lite0/1/2 weights, see `weights.PACKAGE_WEIGHTS`),
            `imagenet` (timm download/cache),
            a local file path, or `none` (random weights; tests only).
    """

    def __init__(self, backbone: str, layers: Sequence[str], weights: str = "package") -> None:
        super().__init__()
        self.backbone_name = backbone
        self.layers = tuple(layers)
        indices = resolve_layer_indices(backbone, self.layers)
        self.body = self._build(backbone, indices, weights)
        self.body.eval()
        for param in self.body.parameters():
            param.requires_grad_(False)
        # channels-last convolutions: on CPU 1.2x faster at batch 1 and 1.8x at batch 32 for EfficientNet-Lite0
        self.body.to(memory_format=torch.channels_last)
        mean, std = default_mean_std(backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())

    @staticmethod
    def _build(backbone: str, indices: list[int], weights: str) -> nn.Module:
        if weights == "imagenet":
            try:
                return _create(backbone, indices, pretrained=True)
            except LayerError:
                raise
            except Exception as exc:  # noqa: BLE001 - network/cache errors come in many types
                raise WeightsError(imagenet_hint(backbone)) from exc
        model = _create(backbone, indices, pretrained=False)
        if weights == "none":
            return model
        if weights == "package":
            state = load_package_state_dict(backbone)
        else:
            state = load_user_state_dict(weights)
        _load_subset(model, state, source=weights)
        return model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> feature maps [(B, C_i, H/s_i, W/s_i)]."""
        return self.body((images - self.mean) / self.std)


def _load_subset(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the keys the truncated model needs; every one of them must be present with the right shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"weights {source!r} do not fit this backbone: {len(missing)} missing keys, e.g. {missing[:3]}"
        )
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise WeightsError(f"weights {source!r} do not fit this backbone: shape mismatch at {bad[:3]}")
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def layers_for_strides(backbone: str, strides: Sequence[int]) -> tuple[str, ...]:
    """The deepest `feature_info` layer at each requested stride (e.g. 4/8/16), from timm's metadata."""
    model = _create(backbone, out_indices=None, pretrained=False)
    names = list(model.feature_info.module_name())
    reductions = list(model.feature_info.reduction())
    chosen = []
    for stride in strides:
        matches = [n for n, r in zip(names, reductions) if r == stride]
        if not matches:
            raise LayerError(
                f"backbone {backbone!r} has no feature layer at stride {stride}; layers: "
                + ", ".join(f"{n} (stride {r})" for n, r in zip(names, reductions))
            )
        chosen.append(matches[-1])
    return tuple(chosen)


def fix_same_padding(model: nn.Module, example: torch.Tensor) -> int:
    """Replace every timm `Conv2dSame` in `model` by a fixed `ZeroPad2d` and a plain `Conv2d` for the input size
    of `example`; the numbers are the same.

    TensorFlow's 'SAME' padding (the `tf_` EfficientNets) depends on the input size, so `Conv2dSame` computes it
    at each call. Traced into ONNX with a dynamic batch axis, that is a chain of Shape/Gather/Ceil nodes ending in a
    Pad whose amounts are only known at run time, which ONNX Runtime runs as a separate pass over the activations.
    With constant amounts it folds the Pad into the Conv (asymmetric `pads`). Use on a copy, for one input size.

    A convolution that sees inputs of more than one size in the forward pass of `example` keeps its dynamic
    padding.

    Args:
        model: module holding the convolutions (changed in place).
        example: (B, 3, H, W) input at the size the model will run at.

    Returns:
        the number of convolutions replaced.
    """
    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding

    sizes: dict[str, set[tuple[int, int]]] = {}

    def record(name: str):
        def hook(module, args) -> None:
            sizes.setdefault(name, set()).add((int(args[0].shape[-2]), int(args[0].shape[-1])))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, Conv2dSame)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    fixed = 0
    for name, seen in sizes.items():
        if len(seen) != 1:  # inputs of several sizes (e.g. tiles of unequal size): the padding stays dynamic
            continue
        (ih, iw), conv = next(iter(seen)), model.get_submodule(name)
        ph = get_same_padding(ih, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pw = get_same_padding(iw, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        plain = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
        )
        plain.weight, plain.bias = conv.weight, conv.bias
        pad = nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # as timm's pad_same: extra at the end
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Sequential(pad, plain))
        fixed += 1
    return fixed
