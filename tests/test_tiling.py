"""Tiled inference: the tiler's grid and blending, tiled PaDiM/PatchCore (per-tile thresholds, checkpoints, ONNX),
`aoi fit`/`aoi run` end to end, and the acceptance case: a small defect on a large board that only tiling finds."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from aoi_lightning.data.image_io import read_image, resize_image
from aoi_lightning.data.synthetic_board import BOARD_DEFECT, Board, generate_board_mvtec
from aoi_lightning.export.onnx_export import export_onnx
from aoi_lightning.models.components.base import MAX_TILE_GAIN
from aoi_lightning.models.components.tiler import Tiler, normalized_axis_weights, ramp_weights, tile_starts
from aoi_lightning.models.padim.torch_model import PadimModel
from aoi_lightning.models.patchcore.torch_model import PatchcoreModel
from aoi_lightning.rundir.loading import load_checkpoint_model


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small tensors: one intra-op thread is as fast, and does not stall when other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tiler ------------------------------------------------------------------------------------------------------


def test_tile_starts_exact_values() -> None:
    assert tile_starts(1024, 256, 64) == [0, 192, 384, 576, 768]  # divisible: a uniform grid
    assert tile_starts(1000, 256, 64) == [0, 192, 384, 576, 744]  # the last tile moves back to end at 1000
    assert tile_starts(2048, 256, 32) == [0, 224, 448, 672, 896, 1120, 1344, 1568, 1792]
    assert tile_starts(256, 256, 64) == [0]
    assert tile_starts(257, 256, 0) == [0, 1]
    with pytest.raises(ValueError, match="data.image_size >= tile_size"):
        tile_starts(255, 256, 0)


@pytest.mark.parametrize("tile,overlap", [(32, 0), (32, 8), (48, 20), (64, 63)])
def test_grid_covers_every_pixel_and_stays_inside(tile: int, overlap: int) -> None:
    for size in range(tile, 4 * tile + 7):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile  # flush with both borders
        assert all(b > a for a, b in zip(starts, starts[1:]))
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
        covered = np.zeros(size, int)
        for s in starts:
            covered[s : s + tile] += 1
        assert covered.min() >= 1


def test_ramp_weights_exact() -> None:
    torch.testing.assert_close(
        ramp_weights(8, 4), torch.tensor([1, 3, 5, 7, 7, 5, 3, 1], dtype=torch.float64) / 8, rtol=0, atol=0
    )
    ramp = ramp_weights(16, 4)
    assert ramp[:4].tolist() == [0.125, 0.375, 0.625, 0.875] and ramp[4:12].tolist() == [1.0] * 8
    assert ramp_weights(16, 0).tolist() == [1.0] * 16


def test_blending_weights_sum_to_one_and_ramps_are_a_partition_of_unity() -> None:
    for size, tile, overlap in [(100, 32, 8), (96, 32, 0), (1000, 256, 64), (1024, 256, 64), (77, 32, 31)]:
        weights = normalized_axis_weights(size, tile, overlap)
        total = torch.zeros(size, dtype=torch.float64)
        for w, s in zip(weights, tile_starts(size, tile, overlap)):
            total[s : s + tile] += w
        torch.testing.assert_close(total, torch.ones(size, dtype=torch.float64), rtol=0, atol=1e-12)
        assert bool((weights > 0).all())
    # on a uniform grid the ramps of two neighbours already add up to one: inner tiles keep their raw ramp
    weights = normalized_axis_weights(1024, 256, 64)
    torch.testing.assert_close(weights[1:-1], ramp_weights(256, 64).expand(3, 256), rtol=0, atol=1e-15)
    # 2-D: stitching tiles of ones gives exactly... ones (float64)
    tiler = Tiler(32, 12)
    ones = torch.ones(2 * tiler.num_tiles((70, 90)), 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(tiler.untile(ones, (70, 90)), torch.ones(2, 1, 70, 90, dtype=torch.float64))


def test_tile_and_untile_round_trip() -> None:
    tiler = Tiler(32, 10)
    images = torch.rand(2, 3, 75, 101, generator=torch.Generator().manual_seed(0))
    grid = tiler.grid(75, 101)
    assert grid.ys == (0, 22, 43) and grid.xs == (0, 22, 44, 66, 69) and grid.num_tiles == 15
    tiles = tiler.tile(images)
    assert tiles.shape == (2 * 15, 3, 32, 32)
    for b in range(2):  # tile k of image b is row b * T + k, tiles row-major
        for k, (y, x) in enumerate((y, x) for y in grid.ys for x in grid.xs):
            assert torch.equal(tiles[b * 15 + k], images[b, :, y : y + 32, x : x + 32])
    maps = images[:, :1]
    back = tiler.untile(tiler.tile(maps), (75, 101))
    torch.testing.assert_close(back, maps, rtol=0, atol=1e-6)  # a weighted average of equal values
    # pixels that only one tile covers come back bit for bit
    assert torch.equal(back[..., :22, :22], maps[..., :22, :22])


def test_stitching_is_a_weighted_average_of_the_tiles() -> None:
    """Where two tiles overlap, the stitched value lies between theirs, weighted by the ramps."""
    tiler = Tiler(32, 16)  # 48 wide: tiles at x = 0 and 16, overlap columns 16..31
    tile_maps = torch.stack([torch.full((1, 32, 32), 1.0), torch.full((1, 32, 32), 3.0)])
    out = tiler.untile(tile_maps, (32, 48))[0, 0, 0]
    assert out[:16].tolist() == [1.0] * 16 and out[32:].tolist() == [3.0] * 16
    ramp = ramp_weights(32, 16)
    left, right = ramp[16:32], ramp[:16]  # the falling end of tile 0, the rising start of tile 1
    expected = (1.0 * left + 3.0 * right) / (left + right)
    torch.testing.assert_close(out[16:32].double(), expected, rtol=0, atol=1e-6)
    assert bool((out[16:32].diff() > 0).all())  # a smooth cross-fade, no step


def test_tiler_rejects_bad_options() -> None:
    for kwargs in ({"tile_size": 16}, {"tile_size": 64, "overlap": 64}, {"tile_size": 64, "overlap": -1}):
        with pytest.raises(ValueError):
            Tiler(**kwargs)
    with pytest.raises(ValueError, match="need tile_size"):
        PatchcoreModel(weights="none", tile_thresholds="per_tile")
    with pytest.raises(ValueError, match="tile_thresholds"):
        PatchcoreModel(weights="none", tile_size=64, tile_thresholds="per_pixel")


# -- tiled models -------------------------------------------------------------------------------------------------


def _smooth_images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, height // 8, width // 8, generator=gen)
    noise = 0.05 * torch.rand(n, 3, height, width, generator=gen)
    return (torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear") * 0.9 + noise).clamp(0, 1)


def _padim(**kwargs) -> PadimModel:
    torch.manual_seed(0)  # the random backbone (weights none) is the same in every instance
    return PadimModel(weights="none", n_features=24, **kwargs).eval()


def _patchcore(**kwargs) -> PatchcoreModel:
    torch.manual_seed(0)
    return PatchcoreModel(weights="none", coreset_ratio=1.0, num_neighbors=3, **kwargs).eval()


def _fit(model, images: torch.Tensor):
    model.update(images[: len(images) // 2])
    model.update(images[len(images) // 2 :])
    model.finalize()
    return model


@pytest.mark.parametrize("make", [_padim, _patchcore])
def test_single_tile_equals_the_untiled_model(make) -> None:
    images = _smooth_images(6, 64, 64, seed=1)
    plain = _fit(make(), images)
    tiled = make(tile_size=64, tile_overlap=16)
    tiled.load_state_dict(plain.state_dict())
    unseen = _smooth_images(2, 64, 64, seed=2)
    with torch.no_grad():
        a, b = plain(unseen), tiled(unseen)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    # fitting on a single tile is fitting on the image
    refit = _fit(make(tile_size=64), images)
    with torch.no_grad():
        torch.testing.assert_close(refit(unseen).anomaly_map, a.anomaly_map, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_padim, _patchcore])
def test_tiled_forward_is_the_per_tile_model_stitched(make) -> None:
    """A tiled model on a (B, 3, 72, 104) input = its untiled twin on each 32 px crop, stitched; the image score
    is the max of the stitched map (PaDiM) or the max of the crops' scores (PatchCore)."""
    tiled = _fit(make(tile_size=32, tile_overlap=8), _smooth_images(4, 72, 104, seed=3))
    plain = make()
    plain.load_state_dict(tiled.state_dict())
    images = _smooth_images(2, 72, 104, seed=4)
    grid = tiled.tiler.grid(72, 104)
    with torch.no_grad():
        out = tiled(images)
        crops = [plain(images[:, :, y : y + 32, x : x + 32]) for y in grid.ys for x in grid.xs]
    assert out.anomaly_map.shape == (2, 1, 72, 104)
    stacked = torch.stack([c.anomaly_map for c in crops], dim=1).reshape(-1, 1, 32, 32)
    close = {"rtol": 1e-5, "atol": 1e-6 * float(out.anomaly_map.max())}  # batches of 24 vs 2 tiles: rounding
    torch.testing.assert_close(out.anomaly_map, tiled.tiler.untile(stacked, (72, 104)), **close)
    # the corner is covered by the first tile only
    torch.testing.assert_close(out.anomaly_map[:, :, :16, :16], crops[0].anomaly_map[:, :, :16, :16], **close)
    if isinstance(tiled, PatchcoreModel):
        expected = torch.stack([c.pred_score for c in crops], dim=1).amax(dim=1)
    else:
        expected = out.anomaly_map.amax(dim=(1, 2, 3))
    torch.testing.assert_close(out.pred_score, expected, **close)


def test_patchcore_bank_preallocation_counts_every_tile() -> None:
    model = _patchcore(tile_size=32, tile_overlap=8)
    model.allocate(3, (72, 104))
    images = _smooth_images(3, 72, 104, seed=5)
    model.update(images)
    stride = model.feature_extractor.strides[0]
    patches = model.take_training_patches()
    assert patches.shape[0] == 3 * 3 * 4 * (32 // stride) ** 2  # 3 x 4 tiles per image


@pytest.mark.parametrize("make", [_padim, _patchcore])
def test_per_tile_gains_are_calibrated_and_applied(make) -> None:
    model = _fit(make(tile_size=32, tile_overlap=8, tile_thresholds="per_tile"), _smooth_images(6, 72, 104, seed=6))
    assert model.needs_tile_calibration
    calibration = _smooth_images(4, 72, 104, seed=7)
    with torch.no_grad():
        raw = model(calibration)  # not calibrated yet: gains are not applied
        tile_maps = model._forward_fitted(model.tiler.tile(calibration)).anomaly_map.reshape(4, 12, -1)
    gain = model.calibrate_tiles([calibration[:2], calibration[2:]])
    assert not model.needs_tile_calibration and gain.shape == (3, 4)
    q = tile_maps.amax(dim=2).double().mean(dim=0)
    median = q.median()
    expected = median / torch.maximum(q, median / MAX_TILE_GAIN)
    torch.testing.assert_close(gain.flatten().double(), expected, rtol=1e-6, atol=0)
    assert float(gain.max()) <= MAX_TILE_GAIN
    # after scaling, each unclamped tile position's mean max on the calibration images is the median
    scaled = (q * gain.flatten().double())[q >= median / MAX_TILE_GAIN]
    torch.testing.assert_close(scaled, torch.full_like(scaled, float(median)), rtol=1e-6, atol=0)
    with torch.no_grad():
        out = model(calibration)
    torch.testing.assert_close(out.anomaly_map, model._forward_tiled(calibration, model.tile_gain).anomaly_map)
    assert not torch.allclose(out.pred_score, raw.pred_score)
    with pytest.raises(ValueError, match="tile grid"):
        model(_smooth_images(1, 64, 64, seed=8))  # another grid than the calibrated one


@pytest.mark.parametrize("make", [_padim, _patchcore])
def test_tile_batch_runs_groups_of_tiles_with_the_same_result(make) -> None:
    train, images = _smooth_images(4, 72, 104, seed=12), _smooth_images(3, 72, 104, seed=13)
    whole = _fit(make(tile_size=32, tile_overlap=8), train)
    grouped = _fit(make(tile_size=32, tile_overlap=8, tile_batch=5), train)  # 12 tiles: passes of 5, 5 and 2
    assert [p.shape[0] for p in grouped.tile_batches(images)] == [15, 15, 6]
    with torch.no_grad():
        a, b = whole(images), grouped(images)
    scale = float(a.anomaly_map.max())
    torch.testing.assert_close(b.pred_score, a.pred_score, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(b.anomaly_map, a.anomaly_map, rtol=1e-5, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="tile_batch"):
        make(tile_size=32, tile_batch=0)


@pytest.mark.parametrize("make", [_padim, _patchcore])
def test_tiled_state_dict_round_trip_and_onnx_export(make, tmp_path: Path) -> None:
    """Per-tile gains travel in the state dict and in the ONNX graph (tiles in passes of 5: a graph with groups)."""
    model = make(tile_size=32, tile_overlap=8, tile_thresholds="per_tile", tile_batch=5)
    model = _fit(model, _smooth_images(6, 72, 104, seed=9))
    model.calibrate_tiles([_smooth_images(3, 72, 104, seed=10)])
    model.set_thresholds(1.0, 2.0)
    other = make(tile_size=32, tile_overlap=8, tile_thresholds="per_tile", tile_batch=5)
    other.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True)
    assert torch.equal(other.tile_gain, model.tile_gain)
    images = _smooth_images(3, 72, 104, seed=11)
    with torch.no_grad():
        a, b = model(images), other(images)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    # a state dict from before tiling existed (no tile_gain) still loads, as a model without gains
    legacy = {k: v for k, v in model.state_dict().items() if k != "tile_gain"}
    old = make(tile_size=32, tile_overlap=8)
    old.load_state_dict(legacy, strict=True)
    assert old.tile_gain.numel() == 0

    path = export_onnx(model, (72, 104), tmp_path / "model.onnx", {"model": "t"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 72, 104]  # static tile grid, dynamic batch
    meta = json.loads((tmp_path / "export_meta.json").read_text())
    assert (
        meta["tiling"]["tile_size"] == 32 and meta["tiling"]["tile_overlap"] == 8 and meta["tiling"]["tile_batch"] == 5
    )
    assert np.allclose(meta["tiling"]["tile_gain"], model.tile_gain.numpy())
    for batch in (images[:1], images):
        scores, maps = session.run(None, {"image": batch.numpy()})
        with torch.no_grad():
            ref = model(batch)
        scale = float(ref.anomaly_map.abs().max())
        np.testing.assert_allclose(scores, ref.pred_score.numpy(), rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(maps, ref.anomaly_map.numpy(), rtol=1e-4, atol=1e-4 * scale)


# -- end to end on the tiny synthetic set ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["Padim", "Patchcore"])
def test_aoi_fit_tiled_per_tile_end_to_end(
    model: str, aoi_cli, tiny_fit_argv, tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    """`aoi fit` (96 px working size, 64 px tiles, per-tile thresholds, ONNX export and consistency check), the
    checkpoint round trip, and `aoi run` on images twice the working size: boxes in original coordinates."""
    runs = tmp_path / "runs"
    argv = tiny_fit_argv(f"aoi_lightning.models.{model}", tiny_mvtec_root, runs, "tiled", "--seed", "0")
    argv[argv.index("--data.image_size") + 1] = "96"
    extra = ["--model.tile_size", "64", "--model.tile_overlap", "32", "--model.tile_thresholds", "per_tile"]
    assert aoi_cli([*argv, *extra]) == 0
    run = runs / model.lower() / "synthetic" / "tiled"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: config["model"]["init_args"][k] for k in ("tile_size", "tile_overlap", "tile_thresholds")} == {
        "tile_size": 64,
        "tile_overlap": 32,
        "tile_thresholds": "per_tile",
    }
    consistency = json.loads((run / "export" / "consistency.json").read_text())
    assert consistency["status"] == "PASSED"
    meta = json.loads((run / "export" / "export_meta.json").read_text())
    assert meta["image_size"] == [96, 96] and meta["tiling"]["tile_size"] == 64

    module = load_checkpoint_model(run / "weights" / "model.ckpt")
    torch_model = module.model
    assert torch_model.tiler.tile_size == 64 and torch_model.tiler.overlap == 32
    assert torch_model.tile_gain.shape == (2, 2) and not torch.equal(torch_model.tile_gain, torch.ones(2, 2))
    assert torch_model.has_thresholds
    # the thresholds were tuned on the per-tile scaled scores: the training scores recorded in preds_train.jsonl
    # are those of the calibrated model
    train = [json.loads(line) for line in (run / "preds_train.jsonl").read_text().splitlines()]
    first = read_image(train[0]["image_path"])
    x = torch.from_numpy(resize_image(first, (96, 96)).transpose(2, 0, 1).copy()).float()[None] / 255
    with torch.no_grad():
        assert float(torch_model(x).pred_score) == pytest.approx(train[0]["pred_score"], rel=1e-5)

    # `aoi run` on 192 px copies of test images: defects are reported at both resolutions
    big = tmp_path / "big"
    big.mkdir()
    for path in sorted((tiny_mvtec_root / "synthetic" / "test" / "crack").glob("*.png"))[:2]:
        image = resize_image(read_image(path), (192, 192))
        cv2.imwrite(str(big / path.name), image[..., ::-1])
    out = tmp_path / "out"
    argv = ["run", "--model_dir", run, "--input_dir", big, "--output_dir", out, "--pixel_threshold_mult", "0.5"]
    assert aoi_cli([*argv, "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    assert [r["image_size"] for r in records] == [[192, 192]] * 2
    assert all(r["model_input_size"] == [96, 96] for r in records)
    defects = [d for r in records for d in r["defects"]]
    assert defects, "expected defects at half the pixel threshold"
    for d in defects:
        x0, y0, x1, y1 = d["bbox"]
        assert d["bbox_original"] == [2 * x0, 2 * y0, 2 * x1 + 1, 2 * y1 + 1]


# -- acceptance: a small defect on a large board ---------------------------------------------------------------------

BOARD_SIZE = 512  # a board 4x the tile: the resize to one tile shrinks it 4x, like 1024 -> 256
TILE = 128


def _board_config(path: Path, root: Path, image_size: int, tiled: bool) -> Path:
    init_args = {"backbone": "tf_efficientnet_lite0", "weights": "package", "coreset_ratio": 0.1}
    if tiled:
        init_args.update({"tile_size": TILE, "tile_overlap": 32})
    config = {
        "seed_everything": 0,
        "model": {"class_path": "aoi_lightning.models.Patchcore", "init_args": init_args},
        "data": {
            "root": str(root),
            "category": "board",
            "image_size": image_size,
            "val_split": "calibration",
            "calibration_fraction": 0.375,
            "num_workers": 0,
        },
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "aoi_lightning.callbacks.ThresholdTuning", "init_args": {"method": "conformal"}}
            ],
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _overlaps(box: list[int], mask: np.ndarray) -> bool:
    x0, y0, x1, y1 = box
    return bool(mask[y0 : y1 + 1, x0 : x1 + 1].any())


@pytest.mark.parametrize("seed", [0, 1, 2])  # three board designs
def test_small_defect_on_a_large_board_is_found_with_tiles_and_missed_without(aoi_cli, tmp_path: Path, seed: int):
    """512 px boards (8 good: 5 for the fit, 3 held out to calibrate the thresholds on good parts only),
    two test boards with a 12x12 px smear. PatchCore with 128 px tiles at the full resolution flags both boards
    and boxes the smear; PatchCore on the same boards resized to 128 px (the whole board in one model input)
    passes them or boxes elsewhere: the smear keeps every 4x4 block mean, so the shrunk board does not show it."""
    root = generate_board_mvtec(
        tmp_path / "data", n_train=8, n_test_good=1, n_test_defect=2, image_size=BOARD_SIZE, seed=seed
    )
    masks = [read_image(p)[..., 0] > 0 for p in sorted((root / "board" / "ground_truth" / BOARD_DEFECT).glob("*.png"))]
    results = {}
    for name, size, tiled in (("tiled", BOARD_SIZE, True), ("whole", TILE, False)):
        config = _board_config(tmp_path / f"{name}.yaml", root, size, tiled)
        assert aoi_cli(["fit", "--config", config, "--runs_root", tmp_path / "runs", "--run_id", name]) == 0
        run = tmp_path / "runs" / "patchcore" / "board" / name
        thresholds = json.loads((run / "thresholds.json").read_text())
        assert thresholds["method"] == "conformal" and thresholds["split"] == "val"
        out = tmp_path / f"out_{name}"
        code = aoi_cli(["run", "--model_dir", run, "--input_dir", root / "board" / "test" / BOARD_DEFECT,
                        "--output_dir", out, "--no_save_overlays", "--device", "cpu"])  # fmt: skip
        assert code == 0
        results[name] = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    for k, mask in enumerate(masks):
        assert mask.sum() == 144  # the 12 x 12 smear, in original pixels
        tiled, whole = results["tiled"][k], results["whole"][k]
        assert tiled["image_size"] == whole["image_size"] == [BOARD_SIZE, BOARD_SIZE]
        found = tiled["label"] == "NG" and any(_overlaps(d["bbox_original"], mask) for d in tiled["defects"])
        assert found, f"tiled PatchCore missed the smear of board {k}: {tiled['pred_score']} {tiled['defects']}"
        hit = whole["label"] == "NG" and any(_overlaps(d["bbox_original"], mask) for d in whole["defects"])
        assert not hit, f"whole-board PatchCore boxed the smear of board {k}"
        # not a near miss: the tiled score clears its threshold by a wide margin (1.4x to 2x over boards 0-5)
        assert tiled["pred_score"] > 1.25 * tiled["image_threshold"]


def test_board_smear_is_invisible_once_shrunk_by_four() -> None:
    board = Board(256, seed=3)
    image, reference, mask = board.defective(0, defect_size=12)
    ys, xs = np.nonzero(mask)
    assert mask.sum() // 255 == 144 and xs.max() - xs.min() == 11 and ys.max() - ys.min() == 11
    assert xs.min() % 4 == 0 and ys.min() % 4 == 0
    assert np.abs(image.astype(int) - reference.astype(int)).max() > 20  # plain to see at full resolution
    small, small_ref = resize_image(image, (64, 64)), resize_image(reference, (64, 64))
    assert np.abs(small.astype(int) - small_ref.astype(int)).max() <= 1  # rounding only
    again = Board(256, seed=3).defective(0, defect_size=12)[0]
    assert np.array_equal(image, again)
