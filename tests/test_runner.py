"""End to end: `aoi run` on a folder with good and broken files, and `aoi predict` with the PredictionWriter."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from aoi_lightning.fileio import read_json, read_jsonl


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_mvtec_root: Path) -> Path:
    """Two good and two defective images (two share a file name in different subfolders), a text file named
    .png, a zero-byte .png and a file that is not an image by extension."""
    src = tiny_mvtec_root / "synthetic" / "test"
    folder = tmp_path_factory.mktemp("inputs")
    defect = sorted(p for p in src.iterdir() if p.name != "good")[0]
    (folder / "lot 1").mkdir()
    (folder / "lot_ü").mkdir()
    shutil.copy(src / "good" / "000.png", folder / "lot 1" / "000.png")
    shutil.copy(src / "good" / "001.png", folder / "lot_ü" / "000.png")
    shutil.copy(sorted(defect.glob("*.png"))[0], folder / "d0.png")
    shutil.copy(sorted(defect.glob("*.png"))[1], folder / "d1.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored")
    return folder


def test_run_writes_one_line_per_file(aoi_cli, patchcore_run: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = aoi_cli(["run", "--model_dir", patchcore_run, "--input_dir", inputs, "--output_dir", out,
                    "--batch_size", "3", "--device", "cpu", "--num_workers", "2", "--no_progress"])  # fmt: skip
    assert code == 0
    records = read_jsonl(out / "preds.jsonl")
    assert len(records) == 6
    by_name = {Path(r["image_path"]).relative_to(inputs.resolve()).as_posix(): r for r in records}
    assert sorted(by_name) == ["d0.png", "d1.png", "empty.png", "lot 1/000.png", "lot_ü/000.png", "notes.png"]
    assert set(by_name["notes.png"]) == {"image_path", "error"} and set(by_name["empty.png"]) == {"image_path", "error"}
    good = [r for r in records if "error" not in r]
    assert len({r["mask_path"] for r in good}) == 4 and len({r["overlay_path"] for r in good}) == 4
    for rec in good:
        assert rec["model"] == "patchcore" and rec["category"] == "synthetic" and rec["model_input_size"] == [64, 64]
        mask = cv2.imdecode(np.fromfile(str(out / rec["mask_path"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert list(mask.shape) == rec["image_size"] and set(np.unique(mask).tolist()) <= {0, 255}
        assert (out / rec["overlay_path"]).is_file()
        assert rec["label"] == ("NG" if rec["pred_score"] > rec["image_threshold"] else "OK")
        assert rec["is_anomaly"] == (rec["num_defects"] >= 1)
    report = read_json(out / "report.json")
    assert report["num_images"] == 4 and report["num_errors"] == 2
    assert report["num_ng"] == sum(r["is_anomaly"] for r in good) and report["num_ok"] == 4 - report["num_ng"]
    assert report["run_id"] == patchcore_run.name
    assert report["defect_stats"]["total_defects"] == sum(r["num_defects"] for r in good)


def test_run_options_and_top_level_only(aoi_cli, patchcore_run: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "flat"
    flags = ["--no_save_masks", "--no_save_overlays", "--pixel_threshold_mult", "0.5", "--no_progress"]
    code = aoi_cli(["run", "--model_dir", patchcore_run, "--input_dir", inputs, "--output_dir", out, *flags,
                    "--recursive", "false"])  # fmt: skip
    assert code == 0
    records = read_jsonl(out / "preds.jsonl")
    assert len(records) == 4  # --recursive false: the subfolders are skipped
    assert not any("mask_path" in r or "overlay_path" in r for r in records)
    assert all(
        r["effective_pixel_threshold"] == pytest.approx(0.5 * r["pixel_threshold"]) for r in records if "error" not in r
    )


def test_run_missing_folders_exit_2(aoi_cli, patchcore_run: Path, inputs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    assert aoi_cli(["run", "--model_dir", tmp_path / "nope", "--input_dir", inputs, "--output_dir", out]) == 2
    assert aoi_cli(["run", "--model_dir", patchcore_run, "--input_dir", tmp_path / "nope", "--output_dir", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("aoi run: error: --input_dir") and "Traceback" not in "".join(err)
    config = patchcore_run / "config.yaml"
    assert aoi_cli(["run", "--model_dir", config, "--input_dir", inputs, "--output_dir", out]) == 2
    assert capsys.readouterr().err.strip() == (
        f"aoi run: error: --model_dir: {config} is a file; give the run directory that holds it"
    )
    argv = ["run", "--model_dir", patchcore_run, "--input_dir", inputs, "--output_dir", out]
    assert aoi_cli([*argv, "--pixel_threshold_mult", "nan"]) == 2
    assert capsys.readouterr().err.strip().endswith("--pixel_threshold_mult: expected a finite number, got nan")
    assert not out.exists()


def _predict_argv(run: Path, *extra) -> list:
    # no logger: the run's config names the fit's CSV log folder, which predict must not touch
    return ["predict", "--config", run / "config.yaml", "--ckpt_path", run / "weights" / "model.ckpt",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *extra]  # fmt: skip


def test_predict_writes_run_predictions_like_run(aoi_cli, patchcore_run: Path, tiny_mvtec_root: Path, tmp_path: Path):
    code = aoi_cli(_predict_argv(patchcore_run))
    assert code == 0
    pred_dir = patchcore_run / "predictions"
    records = read_jsonl(pred_dir / "preds.jsonl")
    test_dir = tiny_mvtec_root / "synthetic" / "test"
    expected = sorted(p.relative_to(test_dir).as_posix() for p in test_dir.rglob("*.png"))
    assert [Path(r["image_path"]).relative_to(test_dir).as_posix() for r in records] == expected  # dataset order
    assert not list(pred_dir.glob("preds.rank*.jsonl"))
    assert all((pred_dir / r["mask_path"]).is_file() and (pred_dir / r["overlay_path"]).is_file() for r in records)
    assert {r["gt_label"] for r in records} == {0, 1}
    report = read_json(pred_dir / "report.json")
    assert report["num_images"] == len(records) and report["run_id"] == patchcore_run.name
    assert report["num_ng"] == sum(r["is_anomaly"] for r in records)

    # the runner gives the same scores on the same files
    out = tmp_path / "run"
    assert aoi_cli(["run", "--model_dir", patchcore_run, "--input_dir", test_dir, "--output_dir", out, "--recursive",
                    "--no_save_overlays", "--no_progress", "--device", "cpu"]) == 0  # fmt: skip
    scores = {
        Path(r["image_path"]).relative_to(test_dir.resolve()): r["pred_score"] for r in read_jsonl(out / "preds.jsonl")
    }
    assert len(scores) == len(records)
    for rec in records:
        assert scores[Path(rec["image_path"]).relative_to(test_dir)] == pytest.approx(rec["pred_score"], rel=1e-4)


def test_predict_on_an_empty_folder_writes_a_zero_report(aoi_cli, patchcore_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy_of_run"
    shutil.copytree(patchcore_run, run, ignore=shutil.ignore_patterns("predictions", "logs"))
    empty = tmp_path / "nothing"
    empty.mkdir()
    code = aoi_cli(_predict_argv(run, "--data.predict_dir", empty))
    assert code == 0
    report = read_json(run / "predictions" / "report.json")  # the run of the checkpoint, not the original
    assert report["num_images"] == 0 and report["defect_stats"] is None and report["run_id"] == "copy_of_run"
    assert (run / "predictions" / "preds.jsonl").read_text() == ""


def test_run_folder_writes_in_input_order_and_raises_a_writer_error_keeping_earlier_lines(tmp_path: Path) -> None:
    """The writer thread keeps input order (errors included), and an error while writing image k stops the run
    with that error and leaves the lines of images 0..k-1 complete."""
    from aoi_lightning.data.preprocess import Preprocessing
    from aoi_lightning.inference.folder import run_folder
    from aoi_lightning.postprocess.outputs import PredictionOutputs
    from aoi_lightning.postprocess.prediction import ModelFacts, OutputOptions

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"{i:02d}.png" for i in range(11)]
    for name in names:
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    (folder / "03.png").write_text("not an image")

    class Constant:
        facts = ModelFacts.from_thresholds("fake", "synthetic", (16, 16), 0.5, 0.5)
        preprocessing = Preprocessing.from_image_size((16, 16))
        run_id = "r"

        def predict(self, images):
            return images.mean(axis=(1, 2, 3)), images.mean(axis=1)

    paths = [folder / n for n in names]
    options = OutputOptions(save_masks=False, save_overlays=False)
    run_folder(Constant(), paths, tmp_path / "ok", options, input_root=folder, batch_size=4, progress=False)
    records = read_jsonl(tmp_path / "ok" / "preds.jsonl")
    assert [Path(r["image_path"]).name for r in records] == names
    assert [("error" in r) for r in records] == [n == "03.png" for n in names]

    real = PredictionOutputs.write

    def failing(self, image_path, *args, **kwargs):
        if image_path.endswith("06.png"):
            raise OSError("disk full")
        return real(self, image_path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PredictionOutputs, "write", failing)
        with pytest.raises(OSError, match="disk full"):
            run_folder(Constant(), paths, tmp_path / "bad", options, input_root=folder, batch_size=4, progress=False)
    kept = read_jsonl(tmp_path / "bad" / "preds.jsonl")
    assert [Path(r["image_path"]).name for r in kept] == names[:6]


def test_a_symbolic_link_loop_is_an_error_record(aoi_cli, patchcore_run: Path, tiny_mvtec_root: Path, tmp_path: Path):
    """`l1.png -> l2.png -> l1.png` among the images: one error record each, the real image inspected."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(next((tiny_mvtec_root / "synthetic" / "test" / "good").glob("*.png")), folder / "a.png")
    (folder / "l1.png").symlink_to("l2.png")
    (folder / "l2.png").symlink_to("l1.png")
    argv = ["run", "--model_dir", patchcore_run, "--input_dir", folder, "--output_dir", tmp_path / "out"]
    assert aoi_cli([*argv, "--backend", "onnx", "--device", "cpu", "--no_progress"]) == 0
    records = {Path(r["image_path"]).name: r for r in read_jsonl(tmp_path / "out" / "preds.jsonl")}
    assert sorted(records) == ["a.png", "l1.png", "l2.png"]
    assert records["a.png"]["label"] in ("OK", "NG") and not records["a.png"].get("error")
    assert all(records[n]["error"] for n in ("l1.png", "l2.png"))


def test_an_output_folder_with_results_needs_resume_or_overwrite(
    aoi_cli, patchcore_run: Path, inputs: Path, tmp_path: Path, capsys
):
    """A second `aoi run` into a folder that holds results (another model, another input) used to replace its
    records and leave the earlier masks behind: now one line, nothing touched; `--overwrite` starts clean."""
    out = tmp_path / "out"
    argv = ["run", "--model_dir", patchcore_run, "--output_dir", out, "--backend", "onnx", "--no_progress"]
    assert aoi_cli([*argv, "--input_dir", inputs]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted(inputs.rglob("*.png"))[0], one / "only.png")
    capsys.readouterr()
    assert aoi_cli([*argv, "--input_dir", one]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds results" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert aoi_cli([*argv, "--input_dir", one, "--resume", "--overwrite"]) == 2
    assert aoi_cli([*argv, "--input_dir", one, "--overwrite"]) == 0
    records = read_jsonl(out / "preds.jsonl")
    assert [Path(r["image_path"]).name for r in records] == ["only.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [Path(records[0]["mask_path"]).name]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [Path(records[0]["overlay_path"]).name]


def test_a_second_writer_of_one_output_folder_is_refused(tmp_path: Path) -> None:
    """Two `aoi run` (or a run and a watcher) on one folder would mix their records in one preds.jsonl: the
    second is refused while the first writes, and may go once the first has finished."""
    from aoi_lightning.postprocess.outputs import OutputsInUse, PredictionOutputs
    from aoi_lightning.postprocess.prediction import ModelFacts, OutputOptions

    facts = ModelFacts("patchcore", "synthetic", (64, 64), 1.0, 1.0)
    first = PredictionOutputs(tmp_path, facts, OutputOptions()).open()
    with pytest.raises(OutputsInUse, match="in use by another aoi run or aoi watch"):
        PredictionOutputs(tmp_path, facts, OutputOptions()).open(resume=True)
    other = PredictionOutputs(tmp_path, facts, OutputOptions(), jsonl_name="preds_rank1.jsonl").open()
    other.close()  # another records file of the same folder (a rank of a distributed predict) is free
    first.close()
    PredictionOutputs(tmp_path, facts, OutputOptions()).open(resume=True).close()


def test_resume_refuses_a_damaged_record_before_any_work(
    aoi_cli, patchcore_run: Path, inputs: Path, tmp_path: Path, capsys
):
    """A record of valid JSON but edited (`"label": 5`) used to crash the report after all the work was done."""
    import json

    out = tmp_path / "out"
    argv = ["run", "--model_dir", patchcore_run, "--input_dir", inputs, "--output_dir", out, "--backend", "onnx"]
    assert aoi_cli([*argv, "--no_progress"]) == 0
    lines = (out / "preds.jsonl").read_text(encoding="utf-8").splitlines()
    damaged = json.loads(lines[1])
    damaged["label"] = 5
    (out / "preds.jsonl").write_text("\n".join([lines[0], json.dumps(damaged)]) + "\n", encoding="utf-8")
    report_before = (out / "report.json").read_bytes()
    capsys.readouterr()
    assert aoi_cli([*argv, "--no_progress", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "preds.jsonl record 2: `label` is not OK or NG" in err
    assert (out / "report.json").read_bytes() == report_before


def test_a_full_disk_is_one_line_naming_the_folder_and_keeps_the_lines(
    aoi_cli, patchcore_run: Path, inputs: Path, tmp_path: Path, capsys, monkeypatch
):
    import errno

    from aoi_lightning.postprocess.outputs import PredictionOutputs

    original, calls = PredictionOutputs._append, []

    def append_until_full(self, record, extra):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, record, extra)

    monkeypatch.setattr(PredictionOutputs, "_append", append_until_full)
    out = tmp_path / "out"
    argv = ["run", "--model_dir", patchcore_run, "--input_dir", inputs, "--output_dir", out, "--backend", "onnx"]
    assert aoi_cli([*argv, "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write {out}: No space left on device" in err[0]
    assert len(read_jsonl(out / "preds.jsonl")) == 2
