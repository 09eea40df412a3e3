"""Ground-truth masks read by their content whatever the encoding, the binarisation rule for masks of more than
two levels (reported by `aoi check-data`), and image / mask names matched literally whatever characters they hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from aoi_lightning.compare.samples import RunImages, choose_cases
from aoi_lightning.compare.table import RunSummary
from aoi_lightning.data.check import check_category
from aoi_lightning.data.image_io import ImageReadError, binarise_mask, mask_values, read_mask
from aoi_lightning.data.mvtec import AnomalyDataset, find_mask, masks_by_stem, scan_mvtec
from aoi_lightning.data.synthetic import DEFECT_TYPES
from aoi_lightning.fileio import read_json
from aoi_lightning.metrics.evaluation import EvaluationCollector
from aoi_lightning.report.gallery import gt_mask_path, image_key


def _save_grey255(binary: np.ndarray, path: Path) -> None:
    Image.fromarray(binary * 255).save(path)


def _save_grey01(binary: np.ndarray, path: Path) -> None:
    Image.fromarray(binary).save(path)


def _save_rgb(binary: np.ndarray, path: Path) -> None:
    Image.fromarray(np.dstack([binary * 255] * 3)).save(path)


def _save_rgba_opaque(binary: np.ndarray, path: Path) -> None:
    """What annotation tools write: black background, white defect, alpha 255 everywhere."""
    Image.fromarray(np.dstack([binary * 255] * 3 + [np.full_like(binary, 255)]), mode="RGBA").save(path)


def _save_palette(binary: np.ndarray, path: Path) -> None:
    """Indices 0 / 1 through a palette of black and red."""
    image = Image.fromarray(binary, mode="L").convert("P")
    image.putpalette([0, 0, 0, 200, 0, 0] + [0, 0, 0] * 254)
    image.save(path)


def _save_grey16(binary: np.ndarray, path: Path) -> None:
    cv2.imwrite(str(path), binary.astype(np.uint16) * 65535)


ENCODINGS = {
    "grey255": _save_grey255,
    "grey01": _save_grey01,
    "rgb": _save_rgb,
    "rgba_opaque": _save_rgba_opaque,
    "palette": _save_palette,
    "grey16": _save_grey16,
}


@pytest.fixture(scope="module")
def encoded_roots(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One copy of the tiny tree per mask encoding, every ground-truth mask re-saved in that encoding."""
    roots = {}
    for name, save in ENCODINGS.items():
        root = tmp_path_factory.mktemp(f"masks_{name}")
        shutil.copytree(tiny_mvtec_root / "synthetic", root / "synthetic")
        for path in sorted((root / "synthetic" / "ground_truth").rglob("*_mask.png")):
            binary = (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
            path.unlink()
            save(binary, path)
        roots[name] = root
    return roots


def test_every_encoding_decodes_to_the_same_binary_mask(encoded_roots: dict[str, Path]) -> None:
    reference = encoded_roots["grey255"] / "synthetic" / "ground_truth"
    files = sorted(p.relative_to(reference) for p in reference.rglob("*_mask.png"))
    assert len(files) == 2 * len(DEFECT_TYPES)
    modes = {n: Image.open(root / "synthetic" / "ground_truth" / files[0]).mode for n, root in encoded_roots.items()}
    assert modes == {
        "grey255": "L",
        "grey01": "L",
        "rgb": "RGB",
        "rgba_opaque": "RGBA",
        "palette": "P",
        "grey16": "I;16",
    }
    for rel in files:
        expected = (cv2.imread(str(reference / rel), cv2.IMREAD_GRAYSCALE) == 255).astype(np.uint8)
        assert 0 < expected.sum() < expected.size / 2, rel
        for name, root in encoded_roots.items():
            mask = read_mask(root / "synthetic" / "ground_truth" / rel)
            assert mask.dtype == np.uint8, name
            np.testing.assert_array_equal(mask, expected, err_msg=f"{name}: {rel}")


def _items(root: Path) -> list[dict]:
    _, test = scan_mvtec(root, "synthetic")
    return [AnomalyDataset(test, (64, 64))[i] for i in range(len(test))]


def _pixel_metrics(root: Path, mean_train: torch.Tensor) -> dict:
    """Test-split metrics of a fixed anomaly map (distance to the mean training image) over `root`'s masks."""
    _, test = scan_mvtec(root, "synthetic")
    collector = EvaluationCollector()
    for batch in DataLoader(AnomalyDataset(test, (64, 64)), batch_size=4):
        amap = (batch["image"] - mean_train).abs().sum(dim=1, keepdim=True)
        collector.update(batch, amap.amax(dim=(1, 2, 3)), amap, pixel_threshold=0.5)
    return collector.metrics(("test",), pixel_threshold=0.5)


def test_every_encoding_gives_the_same_dataset_items_and_pixel_metrics(encoded_roots: dict[str, Path]) -> None:
    reference = _items(encoded_roots["grey255"])
    defective = [item for item in reference if item["label"] == 1]
    assert defective and all(item["has_mask"] and 0 < int(item["mask"].sum()) < 64 * 64 / 2 for item in defective)
    train, _ = scan_mvtec(encoded_roots["grey255"], "synthetic")
    mean_train = torch.stack([AnomalyDataset(train, (64, 64))[i]["image"] for i in range(len(train))]).mean(0)
    expected = _pixel_metrics(encoded_roots["grey255"], mean_train)
    # reference pixel AUROC over the same maps and masks, computed directly
    maps = np.concatenate(
        [(item["image"] - mean_train).abs().sum(0).numpy().ravel() for item in reference if item["has_mask"]]
    )
    truth = np.concatenate([item["mask"].numpy().ravel() for item in reference if item["has_mask"]])
    assert expected["pixel_auroc"] == pytest.approx(roc_auc_score(truth, maps), abs=2e-3)
    assert expected["pixel_auroc"] > 0.8 and expected["pixel_aupro"] > 0.3, expected
    for name, root in encoded_roots.items():
        items = _items(root)
        assert len(items) == len(reference), name
        for got, want in zip(items, reference):
            assert got["image_path"].replace(str(root), "") == want["image_path"].replace(
                str(encoded_roots["grey255"]), ""
            )
            assert torch.equal(got["mask"], want["mask"]) and got["has_mask"] == want["has_mask"], name
        metrics = _pixel_metrics(root, mean_train)
        for key in ("pixel_auroc", "pixel_aupro", "pixel_f1", "pixel_iou"):
            assert metrics[key] == expected[key], (name, key)


def test_encodings_report_no_problem(encoded_roots: dict[str, Path]) -> None:
    for name, root in encoded_roots.items():
        report, _ = check_category(root, "synthetic")
        assert report["num_problems"] == 0, (name, report["problems"])
        assert report["multi_level_masks"] == [] and report["empty_masks"] == []


# -- the binarisation rule ---------------------------------------------------------------------------------------
def test_binarisation_rule() -> None:
    assert binarise_mask(np.array([[0, 1]], np.uint8)).tolist() == [[0, 1]]
    assert binarise_mask(np.array([[0, 65535]], np.uint16)).tolist() == [[0, 1]]
    assert binarise_mask(np.array([[10, 200]], np.uint8)).tolist() == [[0, 1]]  # two levels: the higher is defect
    levels = np.array([[0, 60, 127, 128, 200, 255]], np.uint8)  # more levels: above the midpoint 127.5
    assert binarise_mask(levels).tolist() == [[0, 0, 0, 1, 1, 1]]
    assert binarise_mask(np.array([[0, 2, 3, 4]], np.uint8)).tolist() == [[0, 0, 1, 1]]  # midpoint 2
    assert binarise_mask(np.zeros((2, 2), np.uint8)).sum() == 0  # one value: empty when zero
    assert binarise_mask(np.full((2, 2), 7, np.uint8)).sum() == 4  # ... all defect otherwise
    assert binarise_mask(np.array([[0.0, 0.2, 0.9]], np.float32)).tolist() == [[0, 0, 1]]


def test_alpha_and_colour(tmp_path: Path) -> None:
    binary = np.zeros((8, 10), np.uint8)
    binary[2:5, 3:7] = 1
    # white defect on a transparent background: transparent pixels are background
    rgba = np.dstack([np.full_like(binary, 255)] * 3 + [binary * 255])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "transparent.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "transparent.png"), binary)
    # a defect drawn in pure blue on black counts (largest of R, G, B)
    Image.fromarray(np.dstack([np.zeros_like(binary)] * 2 + [binary * 255])).save(tmp_path / "blue.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "blue.png"), binary)
    # grey with an opaque alpha channel (LA)
    Image.fromarray(np.dstack([binary * 255, np.full_like(binary, 255)]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "la.png"), binary)
    assert mask_values(tmp_path / "la.png").tolist() == (binary * 255).tolist()
    (tmp_path / "text_mask.png").write_bytes(b"not a picture")
    with pytest.raises(ImageReadError, match="^not a readable mask: "):
        read_mask(tmp_path / "text_mask.png")
    with pytest.raises(ImageReadError, match="^cannot open mask "):
        read_mask(tmp_path / "absent_mask.png")


def test_multi_level_mask_is_binarised_and_reported(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_mvtec_root / "synthetic", tmp_path / "synthetic")
    path = tmp_path / "synthetic" / "ground_truth" / "crack" / "000_mask.png"
    binary = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0
    soft = np.where(binary, 255, 0).astype(np.uint8)
    edge = cv2.dilate(binary.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~binary
    soft[edge] = 100  # an anti-aliased rim below the midpoint
    inner = np.argwhere(binary)[0]
    soft[tuple(inner)] = 200  # one pixel above it
    cv2.imwrite(str(path), soft)
    np.testing.assert_array_equal(read_mask(path), binary.astype(np.uint8))
    report, _ = check_category(tmp_path, "synthetic")
    assert report["multi_level_masks"] == [
        {"path": str(path), "num_values": 4, "values": [0, 100, 200, 255], "defect_above": 127.5}
    ]
    assert report["problems"] == [f"mask is not two-level (4 values: 0, 100, 200, 255; defect above 127.5): {path}"]
    assert report["num_problems"] == 1


def test_check_data_command_lists_multi_level_masks(aoi_cli, tiny_mvtec_root: Path, tmp_path: Path, capsys) -> None:
    shutil.copytree(tiny_mvtec_root / "synthetic", tmp_path / "data" / "synthetic")
    path = tmp_path / "data" / "synthetic" / "ground_truth" / "scratch" / "001_mask.png"
    Image.open(path).convert("RGB").save(path.with_suffix(".jpg"), quality=60)  # lossy: many levels
    path.unlink()
    out = tmp_path / "check"
    assert aoi_cli(["check-data", "--root", tmp_path / "data", "--category", "synthetic", "--output_dir", out]) == 0
    report = read_json(out / "data_check.json")
    (entry,) = report["multi_level_masks"]
    assert entry["path"] == str(path.with_suffix(".jpg")) and entry["num_values"] > 2
    assert entry["values"][0] < entry["defect_above"] < 255
    assert f"not two-level ({entry['num_values']} values: " in capsys.readouterr().out


# -- names matched literally ---------------------------------------------------------------------------------------
ODD_STEMS = ("a[1]", "b*?", "c d#", "é")


@pytest.fixture()
def odd_names(tiny_mvtec_root: Path, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A copy of the tiny tree whose crack and scratch images (and their masks) carry glob metacharacters,
    spaces and non-ASCII letters; a decoy `a1_mask.png` is what the pattern `a[1]_mask.*` would match."""
    root = tmp_path / "data"
    shutil.copytree(tiny_mvtec_root / "synthetic", root / "synthetic")
    cat = root / "synthetic"
    expected = {}
    stems = iter(ODD_STEMS)
    for defect in ("crack", "scratch"):
        for old in ("000", "001"):
            stem = next(stems)
            (cat / "test" / defect / f"{old}.png").rename(cat / "test" / defect / f"{stem}.png")
            mask = cat / "ground_truth" / defect / f"{stem}_mask.png"
            (cat / "ground_truth" / defect / f"{old}_mask.png").rename(mask)
            expected[str(cat / "test" / defect / f"{stem}.png")] = mask
    return root, expected


def test_odd_names_find_their_masks_in_the_data_module(odd_names) -> None:
    root, expected = odd_names
    _, test = scan_mvtec(root, "synthetic")
    found = {s.image_path: s.mask_path for s in test if s.defect_type in ("crack", "scratch")}
    assert found == {image: str(mask) for image, mask in expected.items()}
    for image, mask in expected.items():
        assert find_mask(mask.parent, Path(image).stem, "_mask") == mask
    items = AnomalyDataset([s for s in test if s.image_path in expected], (64, 64))
    assert all(items[i]["has_mask"] and items[i]["mask"].sum() > 0 for i in range(len(items)))


def test_odd_names_are_matched_literally_not_as_patterns(odd_names) -> None:
    root, expected = odd_names
    crack = root / "synthetic" / "ground_truth" / "crack"
    shutil.copy(crack / "a[1]_mask.png", crack / "a1_mask.png")  # the decoy: an orphan
    (crack / "a[1]_mask.png").unlink()
    assert find_mask(crack, "a[1]", "_mask") is None  # the pattern a[1] would have matched a1
    by_stem, odd = masks_by_stem(crack, "_mask")
    assert sorted(by_stem) == ["a1", "b*?"] and odd == []


def test_odd_names_in_check_data(odd_names) -> None:
    root, expected = odd_names
    report, groups = check_category(root, "synthetic")
    assert report["num_problems"] == 0, report["problems"]
    masks = {image: mask for g in groups for image, mask in g.masks.items()}
    assert {image: masks[image] for image in expected} == expected


def _summary(root: Path) -> RunSummary:
    return RunSummary("A", root, "padim", "synthetic", "r", (64, 64), "_mask", {}, {"image_threshold": 1.0}, {})


def test_odd_names_in_compare(odd_names) -> None:
    root, expected = odd_names
    for image, mask in expected.items():
        assert gt_mask_path(image, Path(image).parent.name) == mask
    _, test = scan_mvtec(root, "synthetic")
    run = RunImages(_summary(root))
    for i, s in enumerate(test):
        run.scores[image_key(s.image_path)] = {
            "image_path": s.image_path,
            "defect_type": s.defect_type,
            "gt_label": s.label,
            "pred_score": 1.0 + i,
        }
    cases = {c.name: c for c in choose_cases([run])}
    for defect in ("crack", "scratch"):
        mild, severe = cases[f"{defect}_mild"], cases[f"{defect}_severe"]
        assert mild.measure_source.startswith("ground-truth mask area")  # every mask was found
        images = [image for image in expected if Path(image).parent.name == defect]
        areas = sorted(float(read_mask(expected[image]).mean()) for image in images)
        assert (mild.measure, severe.measure) == pytest.approx((areas[0], areas[-1]))
