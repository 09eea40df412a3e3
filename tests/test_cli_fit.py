"""End to end: `aoi fit` / `aoi test` on the tiny synthetic tree for both models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aoi_lightning.data.synthetic import DEFECT_TYPES

RUN_FILES = {
    "config.yaml",
    "meta.json",
    "weights",
    "weights/model.ckpt",
    "preds_train.jsonl",
    "preds_val.jsonl",
    "preds_test.jsonl",
    "metrics.json",
    "thresholds.json",
    "report.html",
    "logs",
}
TEST_KEYS = {
    "image_auroc", "pixel_auroc", "pixel_aupro", "num_images",
    "image_f1", "false_reject_rate", "escape_rate", "pixel_f1", "pixel_iou",
}  # fmt: skip
EXPORT_FILES = ("model.onnx", "export_meta.json", "consistency.json")
FULL_TEST_KEYS = {"image_auroc", "pixel_auroc", "pixel_aupro", "num_images"}
THRESHOLD_KEYS = {"image_threshold", "pixel_threshold", "method", "metric", "split", "value"}
# tiny tree: 12 train, 4 good + 2 per defect type in test, half of each type for validation
NUM_TEST_IMAGES = 4 + 2 * len(DEFECT_TYPES)

MODELS = ["padim_run", "patchcore_run"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(params=MODELS)
def fitted_run(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


@pytest.mark.parametrize("fixture", MODELS)
def test_run_directory_has_exactly_the_spec_files(fixture: str, request, fit_listings) -> None:
    run = request.getfixturevalue(fixture)
    files = set(fit_listings[run.name])
    assert RUN_FILES <= files
    # nothing outside the SPEC's run directory table; export/ comes from the export callbacks of the experiment
    extra = {f for f in files - RUN_FILES if not f.startswith(("logs/", "predictions", "export"))}
    assert not extra
    export = {f for f in files if f.startswith("export/")}
    assert not export or export == {f"export/{n}" for n in EXPORT_FILES}
    assert any(f.startswith("logs/") and f.endswith(".csv") for f in files)  # CSV logs
    assert not any(p.name.endswith(".tmp") for p in run.rglob("*"))  # atomic writes leave nothing behind


def test_metrics_json_has_the_spec_shape(fitted_run: Path) -> None:
    metrics = _json(fitted_run / "metrics.json")
    assert metrics["split_policy"] == "test_half"
    assert metrics["optimistic"] is False
    assert TEST_KEYS <= set(metrics["test"])
    assert FULL_TEST_KEYS <= set(metrics["full_test"])
    assert "image_f1" in metrics["val"]
    assert sorted(metrics["per_defect_type"]) == sorted(DEFECT_TYPES)
    assert metrics["full_test"]["num_images"] == NUM_TEST_IMAGES
    assert metrics["test"]["num_images"] + metrics["val"]["num_images"] == NUM_TEST_IMAGES
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= metrics["full_test"][key] <= 1.0
    assert metrics["full_test"]["pixel_auroc"] > 0.6  # pretrained features see the synthetic defects


def test_thresholds_json_and_predictions_agree(fitted_run: Path) -> None:
    thresholds = _json(fitted_run / "thresholds.json")
    assert THRESHOLD_KEYS <= set(thresholds)
    assert thresholds["method"] == "f1" and thresholds["split"] == "val"
    image_t = thresholds["image_threshold"]
    counts = {"train": 12, "val": NUM_TEST_IMAGES // 2, "test": NUM_TEST_IMAGES // 2}
    for split, count in counts.items():
        records = _jsonl(fitted_run / f"preds_{split}.jsonl")
        assert len(records) == count
        for rec in records:
            assert {"image_path", "pred_score", "gt_label", "label", "is_anomaly"} <= set(rec)
            assert rec["is_anomaly"] is (rec["pred_score"] > image_t)
            assert rec["label"] == ("NG" if rec["is_anomaly"] else "OK")
    assert {r["split"] for r in _jsonl(fitted_run / "preds_test.jsonl")} == {"test"}


def test_validation_f1_in_metrics_equals_the_tuned_value(fitted_run: Path) -> None:
    """The F1 that thresholds.json says the threshold reached on validation is what metrics.json reports."""
    thresholds = _json(fitted_run / "thresholds.json")
    val = _json(fitted_run / "metrics.json")["val"]
    assert val["image_f1"] == pytest.approx(thresholds["value"], abs=1e-9)
    if "pixel_value" in thresholds:
        assert val["pixel_f1"] == pytest.approx(thresholds["pixel_value"], abs=1e-9)


def test_checkpoint_loads_weights_only(fitted_run: Path) -> None:
    ckpt = torch.load(fitted_run / "weights" / "model.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert bool(state["model.fitted"])
    thresholds = _json(fitted_run / "thresholds.json")
    assert float(state["model.image_threshold"]) == pytest.approx(thresholds["image_threshold"], rel=1e-6)
    assert float(state["model.pixel_threshold"]) == pytest.approx(thresholds["pixel_threshold"], rel=1e-6)


def test_meta_json(fitted_run: Path) -> None:
    meta = _json(fitted_run / "meta.json")
    text = json.dumps(meta)
    for word in ("seed", "created_at", "torch"):
        assert word in text


@pytest.fixture(scope="module", params=MODELS)
def aoi_test_pass(request: pytest.FixtureRequest, aoi_cli) -> tuple[Path, Path, dict[str, bytes]]:
    """Runs `aoi test` on a fixture run: (run dir, its new eval/test-* folder, fit log files before the test)."""
    run = request.getfixturevalue(request.param)
    logs_before = {p.relative_to(run).as_posix(): p.read_bytes() for p in (run / "logs").rglob("*") if p.is_file()}
    before = set((run / "eval").glob("test-*"))
    code = aoi_cli(
        [
            "test",
            "--config", run / "config.yaml",
            "--ckpt_path", run / "weights" / "model.ckpt",
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    assert code == 0
    new = sorted(set((run / "eval").glob("test-*")) - before)
    assert new, "aoi test wrote no eval/test-*/ folder"
    return run, new[-1], logs_before


def test_aoi_test_reproduces_fit_metrics(aoi_test_pass) -> None:
    """Same metrics to float rounding: the fit's test pass takes the validation images' outputs from its
    validation pass, where they were computed in other batches (last-bit differences)."""
    run, eval_dir, _ = aoi_test_pass
    evaluated = _json(eval_dir / "metrics.json")
    fitted = _json(run / "metrics.json")

    def same(a, b, where: str) -> None:
        if isinstance(a, dict):
            assert isinstance(b, dict) and sorted(a) == sorted(b), where
            for key in a:
                same(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, float) and isinstance(b, float):
            assert a == pytest.approx(b, abs=1e-9, rel=0, nan_ok=True), where
        else:
            assert a == b, where

    for section in ("test", "full_test", "val", "per_defect_type"):
        same(evaluated[section], fitted[section], section)


def test_aoi_test_keeps_the_fit_logs(aoi_test_pass) -> None:
    """`aoi test --config RUN/config.yaml` must not overwrite the CSV logs that the fit wrote."""
    run, _, logs_before = aoi_test_pass
    for name, content in logs_before.items():
        assert (run / name).is_file(), f"{name} was deleted by aoi test"
        assert (run / name).read_bytes() == content, f"{name} was overwritten by aoi test"


def test_a_second_aoi_test_keeps_the_first_ones_files(aoi_test_pass, aoi_cli) -> None:
    """Two evaluations of a run (here within the same second) write two eval/ and logs/ folders; the second
    leaves every file of the first, and of the fit, as it was."""
    run, first_eval, _ = aoi_test_pass
    files_before = {p: p.read_bytes() for folder in ("logs", "eval") for p in (run / folder).rglob("*") if p.is_file()}
    evals_before = set((run / "eval").iterdir())
    argv = ["test", "--config", run / "config.yaml", "--ckpt_path", run / "weights" / "model.ckpt"]
    assert aoi_cli([*argv, "--trainer.enable_progress_bar", "false"]) == 0
    new = sorted(set((run / "eval").iterdir()) - evals_before)
    assert len(new) == 1 and new[0] != first_eval and (new[0] / "metrics.json").is_file()
    assert (run / "logs" / new[0].name / "metrics.csv").is_file()  # the command's logs under the same name
    for path, content in files_before.items():
        assert path.read_bytes() == content, f"{path.relative_to(run)} was overwritten by a second aoi test"


def test_seed_makes_fit_reproducible(patchcore_run: Path, tiny_mvtec_root, tiny_runs_root, aoi_cli, tiny_fit_argv):
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, tiny_runs_root, "patchcore_again")
    assert aoi_cli([*argv, "--seed", "0"]) == 0
    again = patchcore_run.parent / "patchcore_again"
    for name in ("preds_train.jsonl", "preds_val.jsonl", "preds_test.jsonl", "thresholds.json", "metrics.json"):
        assert (again / name).read_text() == (patchcore_run / name).read_text(), name


def test_a_second_fit_into_a_run_is_refused(patchcore_run: Path, tiny_mvtec_root, aoi_cli, tiny_fit_argv, capsys):
    """The same --run_id again (a re-run script, a re-fit on new data) would put a new model beside the first
    one's predictions and evaluations, and replace a model a line may use: one line, exit 2, nothing touched."""
    files = {p: p.read_bytes() for p in patchcore_run.rglob("*") if p.is_file()}
    runs_root = patchcore_run.parents[2]
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, runs_root, patchcore_run.name)
    assert aoi_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--run_id" in err
    assert {p: p.read_bytes() for p in patchcore_run.rglob("*") if p.is_file()} == files


def test_the_leftover_of_a_failed_fit_does_not_block_its_run_id(tiny_mvtec_root, tmp_path, aoi_cli, tiny_fit_argv):
    """A fit that failed (e.g. on its data) leaves config.yaml and logs: fitting the same --run_id again works."""
    leftover = tmp_path / "runs" / "patchcore" / "synthetic" / "again"
    (leftover / "logs" / "fit-again").mkdir(parents=True)
    (leftover / "config.yaml").write_text("model: {}\n", encoding="utf-8")
    (leftover / "logs" / "fit-again" / "hparams.yaml").write_text("{}\n", encoding="utf-8")
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, tmp_path / "runs", "again")
    assert aoi_cli(argv) == 0
    assert (leftover / "weights" / "model.ckpt").is_file()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data.category", "nosuch"], ["data.category", "nosuch", "available: synthetic"]),
        (["--data.root", "{missing}"], ["data.root", "not found"]),
        (["--model.layers", "[blocks.1,bogus]"], ["bogus", "blocks.2", "blocks.4"]),
    ],
    ids=["unknown-category", "missing-root", "unknown-layer"],
)
def test_user_errors_exit_2_with_one_line(extra, expected, tiny_mvtec_root, tmp_path, aoi_cli, tiny_fit_argv, capsys):
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, tmp_path / "runs", "bad")
    argv += [a.format(missing=tmp_path / "missing") for a in extra]
    code = aoi_cli(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("aoi fit: error:")
    for word in expected:
        assert word in lines[0], lines[0]


def test_config_typo_exit_2_naming_the_key(tiny_mvtec_root, tmp_path, aoi_cli, tiny_fit_argv, capsys) -> None:
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, tmp_path / "runs", "bad")
    code = aoi_cli([*argv, "--data.image_size", "abc"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert "data.image_size" in err


@pytest.mark.parametrize("run_id", ["../../escape", "a/b", ".."])
def test_a_run_id_is_a_folder_name(run_id, tiny_mvtec_root, tmp_path, aoi_cli, tiny_fit_argv, capsys) -> None:
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, tmp_path / "runs", run_id)
    assert aoi_cli(argv) == 2
    assert "a folder name is expected" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()
