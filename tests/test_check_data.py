"""`aoi check-data`: counts, sizes and modes, and planted problems (orphan and missing masks, unreadable files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from aoi_lightning.commands.check_data import LABEL_WIDTH
from aoi_lightning.data.check import aspect_ratios, check_category, summary_lines
from aoi_lightning.data.synthetic import DEFECT_TYPES
from aoi_lightning.fileio import read_json


@pytest.fixture()
def planted(tiny_mvtec_root: Path, tmp_path: Path) -> Path:
    """A copy of the tiny tree with: an orphan mask, an unreadable test image, a defective image whose mask was
    deleted, a 16-bit grey training image, a mask of the wrong size, a non-image file and a mask folder of a
    defect type that has no test folder."""
    root = tmp_path / "data"
    shutil.copytree(tiny_mvtec_root / "synthetic", root / "synthetic")
    cat = root / "synthetic"
    cv2.imwrite(str(cat / "ground_truth" / "scratch" / "099_mask.png"), np.full((64, 64), 255, np.uint8))
    (cat / "test" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    cv2.imwrite(str(cat / "train" / "good" / "grey16.png"), np.full((64, 64), 40000, np.uint16))
    cv2.imwrite(str(cat / "ground_truth" / "missing_pad" / "000_mask.png"), np.full((32, 32), 255, np.uint8))
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    (cat / "ground_truth" / "dent").mkdir()
    cv2.imwrite(str(cat / "ground_truth" / "dent" / "000_mask.png"), np.full((64, 64), 255, np.uint8))
    return root


def test_clean_tree_has_no_problems(tiny_mvtec_root: Path) -> None:
    report, groups = check_category(tiny_mvtec_root, "synthetic")
    assert report["num_problems"] == 0, report["problems"]
    assert report["counts"] == {"train": {"good": 12}, "test": {**{t: 2 for t in sorted(DEFECT_TYPES)}, "good": 4}}
    assert report["image_sizes"]["train/good"] == {"64x64": 12}
    assert report["image_modes"]["test/good"] == {"RGB 8-bit": 4}
    assert report["masks"] == {t: 2 for t in DEFECT_TYPES}
    assert [g.name for g in groups][0] == "train/good"


def test_planted_problems_are_listed_not_fatal(aoi_cli, planted: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "check"
    argv = ["check-data", "--root", planted, "--category", "synthetic", "--output_dir", out, "--samples", "3",
            "--tile_size", "64"]  # fmt: skip
    assert aoi_cli(argv) == 0
    printed = capsys.readouterr()
    assert "problem(s)" in printed.out and "Traceback" not in printed.err
    report = read_json(out / "data_check.json")
    cat = planted / "synthetic"
    assert report["counts"]["train"]["good"] == 13 and report["counts"]["test"]["good"] == 5
    assert [u["path"] for u in report["unreadable"]] == [str(cat / "test" / "good" / "broken.png")]
    assert report["missing_masks"] == [str(cat / "test" / "crack" / "001.png")]
    assert sorted(report["orphan_masks"]) == sorted(
        [str(cat / "ground_truth" / "scratch" / "099_mask.png"), str(cat / "ground_truth" / "dent" / "000_mask.png")]
    )
    assert [m["mask"] for m in report["mask_size_mismatch"]] == [
        str(cat / "ground_truth" / "missing_pad" / "000_mask.png")
    ]
    assert report["image_modes"]["train/good"] == {"RGB 8-bit": 12, "L 16-bit": 1}
    assert report["ignored_files"] == [str(cat / "train" / "good" / "notes.txt")]
    assert report["num_problems"] == len(report["problems"]) == 5
    assert aoi_cli([*argv, "--strict"]) == 1

    preview = cv2.imread(str(out / "preview.png"), cv2.IMREAD_COLOR)
    groups = 2 + len(DEFECT_TYPES)  # train/good, test/good, one row per defect type
    assert preview.shape[:2] == (36 + groups * (64 + 4), LABEL_WIDTH + 3 * (64 + 4))
    red = (preview[:, :, 2] > 200) & (preview[:, :, 1] < 60) & (preview[:, :, 0] < 60)
    assert red.sum() > 50  # mask outlines drawn


def test_aspect_ratio_is_reported_and_fit_pad_suggested_when_it_varies(aoi_cli, tiny_mvtec_root, tmp_path, capsys):
    report, _ = check_category(tiny_mvtec_root, "synthetic")
    assert report["aspect_ratio"] == {"min": 1.0, "median": 1.0, "max": 1.0, "varies": False}
    root = tmp_path / "data"
    shutil.copytree(tiny_mvtec_root / "synthetic", root / "synthetic")
    train = sorted((root / "synthetic" / "train" / "good").glob("*.png"))
    for path, width in zip(train[:3], (32, 48, 56)):  # 64 x 32, 64 x 48 and 64 x 56 crops: w/h 0.5, 0.75, 0.875
        cv2.imwrite(str(path), cv2.imread(str(path))[:, :width])
    report, _ = check_category(root, "synthetic")
    assert report["aspect_ratio"] == {"min": 0.5, "median": 1.0, "max": 1.0, "varies": True}
    assert aoi_cli(["check-data", "--root", root, "--category", "synthetic", "--output_dir", tmp_path / "out"]) == 0
    printed = capsys.readouterr().out
    assert "aspect ratio (width / height) varies: 0.50 to 1.00, median 1.00; `--data.resize fit_pad`" in printed
    assert read_json(tmp_path / "out" / "data_check.json")["aspect_ratio"]["varies"] is True


def test_images_in_nested_subfolders_are_named_as_unused(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    """Training and test read the top level of each folder: images below it are a problem, not silently dropped."""
    root = tmp_path / "data"
    shutil.copytree(tiny_mvtec_root / "synthetic", root / "synthetic")
    good = root / "synthetic" / "train" / "good"
    nested = good / "day2" / "late"
    nested.mkdir(parents=True)
    first = sorted(good.glob("*.png"))[0]
    shutil.copy(first, nested / "extra.png")
    (good / "empty_dir").mkdir()
    report, _ = check_category(root, "synthetic")
    assert report["problems"] == [
        f"1 image(s) in the subfolder {good / 'day2'} are not used (only the top level of {good})"
    ]
    assert report["ignored_files"] == [f"{good / 'day2'}/", f"{good / 'empty_dir'}/"]


def test_missing_category_is_a_one_line_error(aoi_cli, tiny_mvtec_root: Path, tmp_path: Path, capsys) -> None:
    code = aoi_cli(["check-data", "--root", tiny_mvtec_root, "--category", "nosuch", "--output_dir", tmp_path])
    err = capsys.readouterr().err
    assert code == 2 and "aoi check-data: error:" in err and "available: synthetic" in err
    assert not (tmp_path / "preview.png").exists()


def test_aspect_ratio_of_very_tall_images_keeps_its_digits() -> None:
    """A 5 x 3000 image is 0.00167 wide per height unit: not rounded away to 0.00."""
    ratio = aspect_ratios([(3000, 5), (100, 100), (5, 3000)])
    assert ratio == {"min": 0.001667, "median": 1.0, "max": 600.0, "varies": True}
    report = {"root": "r", "category": "c", "num_images": 3, "counts": {}, "image_sizes": {}, "image_modes": {},
              "aspect_ratio": ratio, "masks": {}, "missing_masks": [], "orphan_masks": [], "unreadable": [],
              "ignored_files": [], "problems": [], "num_problems": 0, "mask_size_mismatch": [], "empty_masks": [],
              "multi_level_masks": []}  # fmt: skip
    assert any("varies: 0.00167 to 600.00, median 1.00" in line for line in summary_lines(report))


def test_good_folders_are_found_in_any_case(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    """`train/Good` and `test/Good` (as some tools write them) hold good images, not a defect type `Good`."""
    from aoi_lightning.data.mvtec import scan_mvtec

    root = tmp_path / "cased"
    shutil.copytree(tiny_mvtec_root / "synthetic", root / "synthetic")
    (root / "synthetic" / "train" / "good").rename(root / "synthetic" / "train" / "Good")
    (root / "synthetic" / "test" / "good").rename(root / "synthetic" / "test" / "GOOD")
    train_ref, test_ref = scan_mvtec(tiny_mvtec_root, "synthetic")
    train, test = scan_mvtec(root, "synthetic")
    assert len(train) == len(train_ref) and {s.defect_type for s in train} == {"good"}
    assert sorted((s.label, s.defect_type) for s in test) == sorted((s.label, s.defect_type) for s in test_ref)
    report, _ = check_category(root, "synthetic")
    assert report["num_problems"] == 0, report["problems"]
    assert report["counts"]["train"] == {"good": len(train)}
    assert report["counts"]["test"]["good"] == sum(s.defect_type == "good" for s in test_ref)
