"""Non-square working sizes `data.image_size: [h, w]`: option parsing, model shapes, tiling, a whole fit with export,
consistency and `aoi run`, and strips whose small defect is found at their aspect ratio and lost when squashed."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torchmetrics.functional.classification import binary_auroc

from aoi_lightning.data.datamodule import MVTecDataModule, parse_image_size
from aoi_lightning.data.mvtec import DataError
from aoi_lightning.data.synthetic_strip import STRIP_DEFECT, Strip, generate_strip_mvtec
from aoi_lightning.export.onnx_export import onnx_input_size
from aoi_lightning.fileio import read_json
from aoi_lightning.models.padim.torch_model import PadimModel
from aoi_lightning.models.patchcore.torch_model import PatchcoreModel
from aoi_lightning.rundir.loading import read_run_info

H, W = 64, 160


# --- the option --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(64, (64, 64)), ([96, 320], (96, 320)), ((320, 96), (320, 96)), ([32, 1024], (32, 1024))]
)
def test_parse_image_size(value, expected) -> None:
    assert parse_image_size(value) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([100, 320], "height 100 must be a multiple of 16 and >= 32 \\(e.g. 96\\)"),
        ([96, 330], "width 330 must be a multiple of 16"),
        (16, "height 16 must be a multiple of 16 and >= 32"),
        ([0, 64], "positive integers"),
        ([96], "an integer or \\[h, w\\]"),
        ([96, 96, 96], "an integer or \\[h, w\\]"),
        ([96.5, 320], "positive integers"),
        (True, "an integer or \\[h, w\\]"),
    ],
)
def test_bad_image_size_is_one_line_error(value, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        parse_image_size(value)
    assert "\n" not in str(info.value)


def test_datamodule_batches_at_h_w(tiny_mvtec_root: Path) -> None:
    dm = MVTecDataModule(root=str(tiny_mvtec_root), image_size=[H, W], num_workers=0, eval_batch_size=4)
    assert dm.image_size == (H, W)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert tuple(batch["image"].shape[1:]) == (3, H, W) and tuple(batch["mask"].shape[1:]) == (1, H, W)
    assert dm.summary()["image_size"] == [H, W]


# --- models ------------------------------------------------------------------------------------------------------


def _images(n: int, seed: int, size: tuple[int, int] = (H, W)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size[0] // 8, size[1] // 8, generator=gen)
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear").clamp(0, 1)


def test_padim_statistics_at_quarter_resolution() -> None:
    torch.manual_seed(0)
    model = PadimModel(weights="none", n_features=20).eval()
    model.update(_images(4, seed=1))
    model.finalize()
    mean = model.stats.mean
    assert tuple(mean.shape) == (20, (H // 4) * (W // 4)), mean.shape
    out = model(_images(2, seed=2))
    assert tuple(out.anomaly_map.shape) == (2, 1, H, W) and tuple(out.pred_score.shape) == (2,)
    emb = model.embed(_images(1, seed=2))
    assert tuple(emb.shape[-2:]) == (H // 4, W // 4)


def test_patchcore_map_and_tiles_at_h_w() -> None:
    torch.manual_seed(0)
    model = PatchcoreModel(weights="none", coreset_ratio=0.5).eval()
    model.allocate(4, (H, W))
    model.update(_images(4, seed=1))
    model.finalize()
    out = model(_images(2, seed=2))
    assert tuple(out.anomaly_map.shape) == (2, 1, H, W)
    assert model.memory_bank.shape[0] == round(0.5 * 4 * (H // 8) * (W // 8))  # (h/8) x (w/8) patches an image
    tiled = PatchcoreModel(weights="none", coreset_ratio=0.5, tile_size=64, tile_overlap=16).eval()
    assert tiled.tiler.grid(H, W).shape == (1, 3)
    tiled.allocate(4, (H, W))
    tiled.update(_images(4, seed=1))
    tiled.finalize()
    assert tuple(tiled(_images(2, seed=2)).anomaly_map.shape) == (2, 1, H, W)


# --- a whole run at [h, w] ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["Padim", "Patchcore"])
def wide_run(request, aoi_cli, tiny_fit_argv, tiny_mvtec_root: Path, tmp_path_factory) -> Path:
    """A fit of each model at [64, 160] on the tiny (square) synthetic set: images are stretched to the size."""
    runs = tmp_path_factory.mktemp("wide_runs")
    argv = tiny_fit_argv(f"aoi_lightning.models.{request.param}", tiny_mvtec_root, runs, "wide", "--seed", "0")
    argv[argv.index("--data.image_size") + 1] = f"[{H}, {W}]"
    assert aoi_cli(argv) == 0
    return runs / request.param.lower() / "synthetic" / "wide"


def test_fit_export_consistency_at_h_w(wide_run: Path) -> None:
    config = yaml.safe_load((wide_run / "config.yaml").read_text())
    assert config["data"]["image_size"] == [H, W]
    assert read_run_info(wide_run).image_size == (H, W)
    assert read_json(wide_run / "meta.json")["data"]["image_size"] == [H, W]
    meta = read_json(wide_run / "export" / "export_meta.json")
    assert meta["image_size"] == [H, W]
    assert onnx_input_size(wide_run / "export" / "model.onnx") == (H, W)  # fixed H x W in the graph
    assert read_json(wide_run / "export" / "consistency.json")["status"] == "PASSED"
    assert f"{H}x{W}" in (wide_run / "report.html").read_text(encoding="utf-8")
    ckpt = torch.load(wide_run / "weights" / "model.ckpt", map_location="cpu", weights_only=True)
    if "padim" in wide_run.parts:
        assert ckpt["state_dict"]["model.stats.mean"].shape[-1] == (H // 4) * (W // 4)


def test_aoi_run_on_other_sizes_at_h_w(run_records, wide_run: Path, tiny_mvtec_root: Path, tmp_path: Path) -> None:
    source = cv2.imread(str(sorted((tiny_mvtec_root / "synthetic" / "test" / "good").glob("*.png"))[0]))
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = {"tall.png": (200, 90), "wide.png": (75, 330), "square.png": (64, 64)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(inputs / name), cv2.resize(source, (w, h)))
    scores = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        records = run_records(wide_run, backend, inputs, out)
        assert sorted(records) == sorted(sizes)
        for name, rec in records.items():
            assert rec["model_input_size"] == [H, W]
            assert rec["image_size"] == list(sizes[name])
            mask = cv2.imread(str(out / rec["mask_path"]), cv2.IMREAD_UNCHANGED)
            assert mask.shape == sizes[name]
            for d in rec["defects"]:
                x0, y0, x1, y1 = d["bbox"]
                assert 0 <= x0 <= x1 < W and 0 <= y0 <= y1 < H  # model-input coordinates: (h, w), not squares
        scores[backend] = np.array([records[n]["pred_score"] for n in sorted(sizes)])
    np.testing.assert_allclose(scores["onnx"], scores["torch"], rtol=1e-3)


# --- strips: found at their aspect ratio, lost when squashed ------------------------------------------------------


def test_strip_generator(tmp_path: Path) -> None:
    strip = Strip(96, 320, seed=0)
    image, mask = strip.defective(0, defect_size=8)
    assert image.shape == (96, 320, 3) and mask.shape == (96, 320) and int((mask > 0).sum()) == 64
    # the smear keeps the mean of every horizontal pixel pair: halving the width hides it
    clean = strip.clean
    ys, xs = np.nonzero(mask)
    region = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    assert xs.min() % 2 == 0
    halves = clean.reshape(96, 160, 2, 3).mean(axis=2)
    smeared = clean.copy()
    smeared[region] = clean[region].reshape(8, 4, 2, 3).mean(axis=2, keepdims=True).repeat(2, axis=2).reshape(8, 8, 3)
    np.testing.assert_allclose(smeared.reshape(96, 160, 2, 3).mean(axis=2), halves, atol=1e-4)
    root = generate_strip_mvtec(tmp_path, n_train=2, n_test_good=1, n_test_defect=1)
    written = cv2.imread(str(root / "strip" / "test" / STRIP_DEFECT / "000.png"))
    assert written.shape == (96, 320, 3)
    with pytest.raises(ValueError, match="width >= 2"):
        Strip(96, 96)


def _fit_and_score(root: Path, size: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """PatchCore at `size` on the strips: test scores, labels, and per defect image whether the map's peak lies on
    the defect (mask dilated by 8 px at the working size)."""
    dm = MVTecDataModule(root=str(root), category="strip", image_size=size, val_split="none", num_workers=0)
    dm.setup()
    torch.manual_seed(0)
    model = PatchcoreModel(weights="package", coreset_ratio=0.1).eval()
    model.allocate(len(dm.train_samples), dm.image_size)
    for batch in dm.train_dataloader():
        model.update(batch["image"])
    model.finalize()
    scores, labels, on_defect = [], [], []
    for batch in dm.test_dataloader():
        with torch.no_grad():
            out = model(batch["image"])
        scores.append(out.pred_score)
        labels.append(batch["label"])
        for amap, mask, label in zip(out.anomaly_map[:, 0], batch["mask"][:, 0], batch["label"]):
            if label == 1:
                near = cv2.dilate(mask.numpy(), np.ones((17, 17), np.uint8)) > 0
                peak = np.unravel_index(int(amap.argmax()), amap.shape)
                on_defect.append(bool(near[peak]))
    return torch.cat(scores), torch.cat(labels), on_defect


def test_strip_defect_found_at_h_w_and_lost_when_squashed(tmp_path: Path) -> None:
    root = generate_strip_mvtec(tmp_path, n_train=12, n_test_good=5, n_test_defect=5, defect_size=8, seed=0)
    scores, labels, on_defect = _fit_and_score(root, [96, 320])
    good_max, defect_min = float(scores[labels == 0].max()), float(scores[labels == 1].min())
    assert float(binary_auroc(scores, labels)) == 1.0 and defect_min > good_max
    assert all(on_defect)  # the map's peak is on the smear in every defective strip
    # a square of about the same number of pixels (25,600 vs 30,720): the width is halved and the smear averaged away
    sq_scores, sq_labels, sq_on_defect = _fit_and_score(root, [160, 160])
    sq_auroc = float(binary_auroc(sq_scores, sq_labels))
    assert sq_auroc <= 0.85, sq_auroc
    assert float(sq_scores[sq_labels == 1].min()) < float(sq_scores[sq_labels == 0].max())
    assert sum(sq_on_defect) < len(sq_on_defect)
