"""Every validation split policy runs end to end and is reported as what it is."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize(
    ("policy", "optimistic", "method", "split"),
    [("none", False, "quantile", "holdout"), ("same_as_test", True, "f1", "val")],
)
def test_split_policy_fit(policy, optimistic, method, split, tiny_mvtec_root, tmp_path, aoi_cli, tiny_fit_argv):
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, tmp_path, policy)
    assert aoi_cli([*argv, "--data.val_split", policy]) == 0
    run = tmp_path / "patchcore" / "synthetic" / policy
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    thresholds = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))
    assert metrics["split_policy"] == policy
    assert metrics["optimistic"] is optimistic
    assert (thresholds["method"], thresholds["split"]) == (method, split)
    assert metrics["test"]["num_images"] == metrics["full_test"]["num_images"]  # nothing held out of the test folder
    assert "image_f1" in metrics["test"]


@pytest.mark.parametrize("policy", ["none", "test_half"])
def test_thresholds_never_come_from_the_fitted_images_when_others_exist(
    policy, tiny_mvtec_root, tmp_path, aoi_cli, tiny_fit_argv
):
    """No good validation image (`none`; a test folder of defective images only): good training images are held
    out of the fit and the thresholds set on them. PaDiM's scores of its own training images lie far below any
    unseen good part's, so a threshold from them rejects every good part."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_mvtec_root / "synthetic", root / "synthetic")
    good_test = sorted((root / "synthetic" / "test" / "good").iterdir())
    if policy == "test_half":  # a test folder without good images: the validation split has none either
        shutil.rmtree(root / "synthetic" / "test" / "good")
    argv = tiny_fit_argv("aoi_lightning.models.Padim", root, tmp_path / "runs", policy)
    assert aoi_cli([*argv, "--data.val_split", policy, "--data.calibration_fraction", "0.25"]) == 0
    run = tmp_path / "runs" / "padim" / "synthetic" / policy
    thresholds = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))
    meta = json.loads((run / "meta.json").read_text(encoding="utf-8"))
    assert thresholds["split"] == "holdout" and thresholds["in_sample"] is False
    assert thresholds["num_images"] == 3 and meta["data"]["num_holdout"] == 3  # 25 % of the 12 good training images
    assert meta["data"]["num_train"] == 9
    train_scores = [json.loads(line)["pred_score"] for line in (run / "preds_train.jsonl").read_text().splitlines()]
    assert len(train_scores) == 9
    assert thresholds["image_threshold"] > max(train_scores)  # the held-out images score as unseen parts do
    if policy == "none":  # the unseen good test images are not all rejected
        from aoi_lightning.inference.folder import load_predictor, run_folder
        from aoi_lightning.postprocess.prediction import OutputOptions

        predictor = load_predictor("torch", run, "cpu")
        report = run_folder(predictor, good_test, tmp_path / "out", OutputOptions(), progress=False)
        assert report["num_ok"] >= 1, report


def test_a_data_set_without_test_images_fits_exports_and_checks_the_export(
    tiny_mvtec_root, tmp_path, aoi_cli, tiny_fit_argv
):
    """Only train/good (a new line's first data set): the fit sets its thresholds on held-out good images, writes
    no test metrics, and checks the ONNX export on the training images instead of stopping after the export."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_mvtec_root / "synthetic" / "train", root / "synthetic" / "train")
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", root, tmp_path / "runs", "trainonly")
    assert aoi_cli(argv) == 0
    run = tmp_path / "runs" / "patchcore" / "synthetic" / "trainonly"
    assert (run / "weights" / "model.ckpt").is_file() and not (run / "metrics.json").exists()
    assert json.loads((run / "thresholds.json").read_text(encoding="utf-8"))["split"] == "holdout"
    consistency = json.loads((run / "export" / "consistency.json").read_text(encoding="utf-8"))
    assert consistency["status"] == "PASSED" and consistency["images"] == "training images (no test images)"
    assert aoi_cli(["consistency", "--run_dir", str(run)]) == 0  # the command takes the same images
    again = json.loads((run / "export" / "consistency.json").read_text(encoding="utf-8"))
    assert again["images"] == consistency["images"] and again["num_available"] == 12
