"""Every validation split policy runs end to end and is reported as what it is."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize(
    ("policy", "optimistic", "method", "split"),
    [("none", False, "quantile", "train"), ("same_as_test", True, "f1", "val")],
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
