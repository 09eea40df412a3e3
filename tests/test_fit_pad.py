"""`data.resize: fit_pad`: inputs keep their aspect ratio (scaled to fit, centred, padded by repeating their edge
pixels), the padding
is cut from maps before defects are located and before pixel metrics, and a whole fit, export and `aoi run` keep
the mode from training to inference."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from aoi_lightning.data.datamodule import MVTecDataModule
from aoi_lightning.data.mvtec import DataError
from aoi_lightning.data.preprocess import MASK_PAD_VALUE, Preprocessing, PreprocessingError
from aoi_lightning.fileio import read_json, read_jsonl
from aoi_lightning.inference.folder import load_predictor
from aoi_lightning.metrics.evaluation import EvaluationCollector
from aoi_lightning.postprocess.prediction import ModelFacts, OutputOptions, postprocess_prediction

# -- geometry ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "original", "box"),
    [
        ((96, 96), (100, 300), (32, 0, 32, 96)),  # wide into a square: s = 0.32, 32 rows centred
        ((96, 96), (300, 100), (0, 32, 96, 32)),  # tall into a square
        ((96, 96), (50, 50), (0, 0, 96, 96)),  # same aspect ratio: no padding, even when it grows
        ((64, 160), (64, 64), (0, 48, 64, 64)),  # square into a wide input
        ((64, 160), (10, 1000), (31, 0, 2, 160)),  # s = 0.16: 1.6 rows round to 2
        ((32, 32), (1, 5000), (15, 0, 1, 32)),  # never below one pixel
        ((96, 96), (0, 0), (0, 0, 96, 96)),  # unknown size (unreadable image): the whole input
    ],
)
def test_content_box(size, original, box) -> None:
    assert Preprocessing(size, resize="fit_pad").content_box(original) == box
    assert Preprocessing(size).content_box(original) == (0, 0, *size)  # stretch: always the whole input


def test_fit_pad_input_is_the_scaled_image_centred_with_its_edges_repeated() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 300, 3), dtype=np.uint8)
    pre = Preprocessing((96, 96), resize="fit_pad")
    x = pre.to_model_input(image)
    assert x.shape == (3, 96, 96) and x.dtype == np.float32
    inner = cv2.resize(image, (96, 32), interpolation=cv2.INTER_AREA).transpose(2, 0, 1) / np.float32(255)
    assert np.array_equal(x[:, 32:64], inner.astype(np.float32))
    assert np.array_equal(x[:, :32], np.repeat(x[:, 32:33], 32, axis=1))  # the top row, repeated upwards
    assert np.array_equal(x[:, 64:], np.repeat(x[:, 63:64], 32, axis=1))  # the bottom row, downwards
    tall = pre.to_model_input(image.transpose(1, 0, 2).copy())  # 300 x 100: columns repeated sideways
    assert np.array_equal(tall[:, :, :32], np.repeat(tall[:, :, 32:33], 32, axis=2))
    # a reduced decoding of a large image is placed in the box of its full size, as the postprocessing maps it
    reduced = cv2.resize(image, (150, 51), interpolation=cv2.INTER_AREA)  # a rounding of 100 x 300 halved
    assert pre.content_box(reduced.shape[:2]) != pre.content_box((100, 300))
    placed = pre.to_model_input(reduced, original_size=(100, 300))
    expected = cv2.resize(reduced, (96, 32), interpolation=cv2.INTER_AREA).transpose(2, 0, 1) / np.float32(255)
    assert np.array_equal(placed[:, 32:64], expected.astype(np.float32))


def test_fit_pad_masks_follow_their_image() -> None:
    pre = Preprocessing((96, 96), resize="fit_pad")
    mask = np.zeros((100, 300), np.uint8)
    mask[:, 150:] = 1  # right half
    out = pre.resize_mask(mask)
    assert out.shape == (96, 96) and set(np.unique(out)) == {0, 1} and MASK_PAD_VALUE == 0
    assert out[32:64, 48:].all() and not out[32:64, :48].any() and not out[:32].any() and not out[64:].any()
    # a mask stored at half the image's size is stretched onto the image first: same result
    assert np.array_equal(pre.resize_mask(mask[::2, ::2], original_size=(100, 300)), out)


def test_unknown_resize_mode_is_a_one_line_error(tiny_mvtec_root: Path) -> None:
    with pytest.raises(PreprocessingError, match="resize 'crop' is not supported"):
        Preprocessing((64, 64), resize="crop")
    with pytest.raises(DataError, match=r"^data\.resize 'crop' is not supported \(supported: stretch, fit_pad\)$"):
        MVTecDataModule(root=str(tiny_mvtec_root), resize="crop")
    assert Preprocessing.from_dict(Preprocessing((64, 160), resize="fit_pad").to_dict()).resize == "fit_pad"


def test_datamodule_items_carry_the_content_box(tiny_mvtec_root: Path) -> None:
    dm = MVTecDataModule(root=str(tiny_mvtec_root), image_size=[64, 160], resize="fit_pad", num_workers=0)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["content_box"].tolist()[0] == [0, 48, 64, 64]  # the square 64 x 64 images, centred
    image = batch["image"]
    assert torch.equal(image[..., :48], image[..., 48:49].expand(-1, -1, -1, 48))  # left column, repeated
    assert torch.equal(image[..., 112:], image[..., 111:112].expand(-1, -1, -1, 48))
    assert batch["mask"][..., :48].sum() == 0 and batch["mask"][..., 112:].sum() == 0
    assert dm.summary()["resize"] == "fit_pad"


# -- the padding is no part of the answer --------------------------------------------------------------------


FACTS = ModelFacts("padim", "strip", (96, 96), image_threshold=1.0, pixel_threshold=2.0, resize="fit_pad")


def _map_with_pad_peak() -> np.ndarray:
    amap = np.zeros((96, 96), np.float32)
    amap[0:10, 0:10] = 50.0  # in the padding (rows 0-31 for a 100 x 300 image): must be ignored
    amap[40:44, 60:68] = 5.0  # a defect in the content box: rows 8-11, cols 60-67 of the 32 x 96 box
    return amap


def test_defects_come_from_the_content_box_only() -> None:
    pred = postprocess_prediction("a.png", 3.0, _map_with_pad_peak(), FACTS, OutputOptions(), (100, 300))
    assert pred.is_anomaly and pred.mask.shape == (32, 96)
    assert len(pred.defects) == 1
    d = pred.defects[0]
    assert d["bbox"] == [60, 8, 67, 11] and d["source"] == "pixel_threshold"
    x0, y0, x1, y1 = d["bbox_original"]  # the box x 3.125 in the 100 x 300 original
    assert 185 <= x0 <= 188 and 209 <= x1 <= 212 and 24 <= y0 <= 26 and 35 <= y1 <= 38, d["bbox_original"]
    # the same map read as stretch would have located the padding's peak as well
    stretch = ModelFacts("padim", "strip", (96, 96), image_threshold=1.0, pixel_threshold=2.0)
    whole = postprocess_prediction("a.png", 3.0, _map_with_pad_peak(), stretch, OutputOptions(), (100, 300))
    assert len(whole.defects) == 2


def test_ng_peak_region_lies_in_the_content_box() -> None:
    amap = np.zeros((96, 96), np.float32)
    amap[0:10, 0:10] = 50.0  # the padding's peak
    amap[50, 20] = 1.5  # the content's peak, under the pixel threshold
    pred = postprocess_prediction("a.png", 3.0, amap, FACTS, OutputOptions(), (100, 300))
    assert [d["source"] for d in pred.defects] == ["peak"]
    assert pred.defects[0]["bbox"] == [20, 18, 20, 18]  # row 50 - 32 of the box


def test_score_is_the_content_box_maximum() -> None:
    """With fit_pad the image score is the map's maximum over the content box, whatever the model: the padding's 50
    would make the image NG, the content's 0.5 keeps it OK; with stretch the model's own score stays."""
    amap = np.zeros((96, 96), np.float32)
    amap[0:10, 0:10] = 50.0
    amap[50, 20] = 0.5
    for model in ("padim", "patchcore"):
        facts = ModelFacts(model, "s", (96, 96), 1.0, 2.0, resize="fit_pad")
        pred = postprocess_prediction("a.png", 50.0, amap, facts, OutputOptions(), (100, 300))
        assert pred.record["pred_score"] == 0.5 and not pred.is_anomaly and pred.defects == []
    stretch = ModelFacts("patchcore", "s", (96, 96), 1.0, 2.0)
    assert postprocess_prediction("a.png", 42.0, amap, stretch, OutputOptions(), (100, 300)).record["pred_score"] == 42


def test_pixel_metrics_skip_the_padding() -> None:
    amap = np.zeros((2, 1, 96, 96), np.float32)
    amap[:, 0, :32] = 100.0  # the padding scores high on both images
    amap[1, 0, 40:44, 60:68] = 5.0
    mask = torch.zeros(2, 1, 96, 96, dtype=torch.uint8)
    mask[1, 0, 40:44, 60:68] = 1
    batch = {
        "split": ["test", "test"],
        "defect_type": ["good", "crack"],
        "label": torch.tensor([0, 1]),
        "image_path": ["g.png", "d.png"],
        "has_mask": torch.tensor([True, True]),
        "mask": mask,
        "content_box": torch.tensor([[32, 0, 32, 96], [32, 0, 32, 96]]),
    }
    collector = EvaluationCollector()
    collector.update(batch, torch.tensor([0.5, 100.0]), torch.from_numpy(amap), pixel_threshold=2.0)
    metrics = collector.metrics(("test",))
    assert metrics["pixel_auroc"] == pytest.approx(1.0) and metrics["pixel_aupro"] == pytest.approx(1.0)
    assert collector.records[0]["map_max"] == 0.0 and collector.records[1]["map_max"] == 5.0
    assert [r["pred_score"] for r in collector.records] == [0.0, 5.0]  # the content box's maxima, not 0.5 / 100
    assert collector.confusion["test/crack"] == [32.0, 0.0, 0.0]  # the padding's 100s are no false positive
    del batch["content_box"]  # without boxes the padding counts, and ruins the metrics
    whole = EvaluationCollector()
    whole.update(batch, torch.tensor([0.5, 5.0]), torch.from_numpy(amap), pixel_threshold=2.0)
    assert whole.metrics(("test",))["pixel_auroc"] < 0.9
    assert [r["pred_score"] for r in whole.records] == [0.5, 5.0]  # the models' own scores


# -- a whole fit, export and `aoi run` -------------------------------------------------------------------------

PAD_SIZE = (64, 128)


@pytest.fixture(scope="module", params=["Padim", "Patchcore"])
def pad_run(request, aoi_cli, tiny_fit_argv, tiny_mvtec_root: Path, tmp_path_factory) -> Path:
    """A fit of each model at [64, 128] with fit_pad on the tiny square set: every image sits in the middle."""
    runs = tmp_path_factory.mktemp("pad_runs")
    argv = tiny_fit_argv(f"aoi_lightning.models.{request.param}", tiny_mvtec_root, runs, "pad", "--seed", "0")
    argv[argv.index("--data.image_size") + 1] = f"[{PAD_SIZE[0]}, {PAD_SIZE[1]}]"
    assert aoi_cli([*argv, "--data.resize", "fit_pad"]) == 0
    return runs / request.param.lower() / "synthetic" / "pad"


def test_fit_records_fit_pad_through_checkpoint_and_export(pad_run: Path) -> None:
    assert yaml.safe_load((pad_run / "config.yaml").read_text())["data"]["resize"] == "fit_pad"
    assert read_json(pad_run / "meta.json")["data"]["resize"] == "fit_pad"
    ckpt = torch.load(pad_run / "weights" / "model.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["aoi"]["preprocessing"]["resize"] == "fit_pad"
    meta = read_json(pad_run / "export" / "export_meta.json")
    assert meta["preprocessing"]["resize"] == "fit_pad" and "keeping the aspect ratio" in meta["input"]["resize"]
    assert read_json(pad_run / "export" / "consistency.json")["status"] == "PASSED"
    metrics = read_json(pad_run / "metrics.json")["test"]
    assert metrics["image_auroc"] > 0.5 and metrics["pixel_auroc"] > 0.5  # the square set, learned through padding


def test_training_scores_are_content_box_maxima(pad_run: Path) -> None:
    """preds_train.jsonl, scored from the fit pass's embeddings, holds each training image's map maximum over its
    content box (the 64 x 64 images sit at columns 32-95 of the 64 x 128 input), as a separate forward gives it."""
    predictor = load_predictor("torch", pad_run, "cpu")
    records = read_jsonl(pad_run / "preds_train.jsonl")
    assert len(records) == 12
    for rec in records[:4]:
        loaded = predictor.preprocessing.load(rec["image_path"])
        _, maps = predictor.predict(loaded.model_input[None])
        assert rec["pred_score"] == pytest.approx(float(maps[0][:, 32:96].max()), rel=1e-4)


def test_aoi_run_masks_are_the_content_box_of_the_map(
    run_records, pad_run: Path, tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    """Test images cut to 64 x 32 sit at columns 48-79 of the 64 x 128 input, at scale 1: each written mask at the
    original size is exactly `map[:, 48:80] > pixel threshold` of the torch model for NG images (empty for OK),
    and both back ends agree."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted((tiny_mvtec_root / "synthetic" / "test").glob("*/*.png")):
        cv2.imwrite(str(inputs / f"{path.parent.name}_{path.stem}.png"), cv2.imread(str(path))[:, 16:48])
    records = {backend: run_records(pad_run, backend, inputs, tmp_path / backend) for backend in ("torch", "onnx")}
    predictor = load_predictor("torch", pad_run, "cpu")
    threshold = predictor.facts.pixel_threshold
    checked = 0
    for name, rec in records["torch"].items():
        assert rec["model_input_size"] == list(PAD_SIZE) and rec["image_size"] == [64, 32]
        assert records["onnx"][name]["pred_score"] == pytest.approx(rec["pred_score"], rel=1e-3)
        loaded = predictor.preprocessing.load(inputs / name)
        edges = loaded.model_input[:, :, 48:49], loaded.model_input[:, :, 79:80]
        assert np.array_equal(loaded.model_input[:, :, :48], np.repeat(edges[0], 48, axis=2))
        assert np.array_equal(loaded.model_input[:, :, 80:], np.repeat(edges[1], 48, axis=2))
        _, maps = predictor.predict(loaded.model_input[None])
        assert rec["pred_score"] == pytest.approx(float(maps[0][:, 48:80].max()), rel=1e-6)  # the box's maximum
        written = cv2.imread(str(tmp_path / "torch" / rec["mask_path"]), cv2.IMREAD_UNCHANGED) > 0
        if not rec["is_anomaly"]:
            assert not written.any()
        elif all(d["source"] == "pixel_threshold" for d in rec["defects"]):
            np.testing.assert_array_equal(written, maps[0][:, 48:80] > threshold)
            assert all(0 <= d["bbox"][0] <= d["bbox"][2] < 32 for d in rec["defects"])  # x in the box's pixels
            checked += 1
    assert checked >= 2, checked
