"""Untrusted or mismatched run files through the commands: one clear line naming the file, exit code 2, no
traceback and nothing written. (Library-level checkpoint checks are in test_loading.py.)"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from aoi_lightning.fileio import read_jsonl
from tests.conftest import run_aoi


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"aoi {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _copy_run(run: Path, target: Path) -> Path:
    return Path(shutil.copytree(run, target, ignore=shutil.ignore_patterns("predictions", "logs", "eval")))


@pytest.fixture(scope="module")
def one_image(tmp_path_factory: pytest.TempPathFactory, tiny_mvtec_root: Path) -> Path:
    folder = tmp_path_factory.mktemp("one_image")
    shutil.copy(tiny_mvtec_root / "synthetic" / "test" / "good" / "000.png", folder / "000.png")
    return folder


def _lightning_argv(command: str, config: Path, ckpt: Path, *extra) -> list:
    return [command, "--config", config, "--ckpt_path", ckpt, "--trainer.enable_progress_bar", "false", *extra]


# -- a checkpoint of another model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["test", "predict"])
def test_lightning_commands_refuse_a_checkpoint_of_another_model(
    command, aoi_cli, padim_run: Path, patchcore_run: Path, capsys
) -> None:
    """LightningCLI would silently build the checkpoint's model instead of the config's."""
    before = _tree(padim_run)
    ckpt = padim_run / "weights" / "model.ckpt"
    assert aoi_cli(_lightning_argv(command, patchcore_run / "config.yaml", ckpt)) == 2
    line = _error_line(capsys, command)
    assert line == (
        f"aoi {command}: error: {ckpt} holds a Padim model, but the config (--config / --model) builds Patchcore: "
        "use the config.yaml of the checkpoint's own run"
    )
    assert _tree(padim_run) == before  # no eval/, logs/ or predictions/ written into the checkpoint's run


def test_run_refuses_a_checkpoint_copied_from_another_run(
    aoi_cli, padim_run: Path, patchcore_run: Path, one_image: Path, tmp_path: Path, capsys
) -> None:
    run = _copy_run(patchcore_run, tmp_path / "patchcore_run")
    shutil.copyfile(padim_run / "weights" / "model.ckpt", run / "weights" / "model.ckpt")
    out = tmp_path / "out"
    assert aoi_cli(["run", "--model_dir", run, "--input_dir", one_image, "--output_dir", out, "--no_progress"]) == 2
    line = _error_line(capsys, "run")
    assert line == (
        f"aoi run: error: {run / 'weights' / 'model.ckpt'} holds a Padim model, but {run / 'config.yaml'} names "
        "Patchcore: the checkpoint belongs to another run"
    )
    assert not out.exists()


# -- damaged and unsafe checkpoints through LightningCLI -----------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["truncated", "pickled_code"])
def test_lightning_commands_refuse_a_damaged_or_unsafe_checkpoint(
    kind, aoi_cli, patchcore_run: Path, tmp_path: Path, capsys
) -> None:
    ckpt, marker = tmp_path / "model.ckpt", tmp_path / "executed"
    if kind == "truncated":
        data = (patchcore_run / "weights" / "model.ckpt").read_bytes()
        ckpt.write_bytes(data[: len(data) // 3])
        expected = f"cannot read {ckpt}: truncated or corrupt file"
    else:
        with open(ckpt, "wb") as handle:
            pickle.dump({"state_dict": _RunsCode(marker), "hyper_parameters": {}}, handle)
        expected = f"refusing to load {ckpt}: it holds pickled Python objects"
    assert aoi_cli(_lightning_argv("test", patchcore_run / "config.yaml", ckpt)) == 2
    assert _error_line(capsys, "test").startswith(f"aoi test: error: {expected}")
    assert not marker.exists()


# -- thresholds.json that disagrees with the checkpoint ------------------------------------------------------------


@pytest.fixture
def edited_thresholds_run(patchcore_run: Path, tmp_path: Path) -> Path:
    """A copy of the PatchCore run whose thresholds.json was edited after the fit (image threshold x 1.5)."""
    run = _copy_run(patchcore_run, tmp_path / "edited")
    info = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))
    info["image_threshold"] = info["image_threshold"] * 1.5
    (run / "thresholds.json").write_text(json.dumps(info), encoding="utf-8")
    return run


@pytest.mark.parametrize("command", ["run", "run_onnx", "test", "predict"])
def test_thresholds_json_that_disagrees_with_the_checkpoint_is_an_error(
    command, aoi_cli, edited_thresholds_run: Path, one_image: Path, tmp_path: Path, capsys
) -> None:
    run = edited_thresholds_run
    before = _tree(run)
    edited = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))["image_threshold"]
    out = tmp_path / "out"
    if command.startswith("run"):
        backend = ["--backend", "onnx"] if command == "run_onnx" else []
        argv = ["run", "--model_dir", run, "--input_dir", one_image, "--output_dir", out, *backend]
    else:
        argv = _lightning_argv(command, run / "config.yaml", run / "weights" / "model.ckpt")
    assert aoi_cli(argv) == 2
    line = _error_line(capsys, argv[0])
    assert line.startswith(f"aoi {argv[0]}: error: {run / 'thresholds.json'}: image_threshold {edited} ")
    if command == "run_onnx":
        assert "differs from the export's" in line and "the export is stale or the file was edited" in line
    else:
        assert "does not match the checkpoint's" in line and "--pixel_threshold_mult" in line
    assert not out.exists() and _tree(run) == before


def test_without_thresholds_json_the_checkpoint_thresholds_are_used(
    aoi_cli, patchcore_run: Path, one_image: Path, tmp_path: Path
) -> None:
    run = _copy_run(patchcore_run, tmp_path / "no_file")
    expected = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))
    (run / "thresholds.json").unlink()
    out = tmp_path / "out"
    assert aoi_cli(["run", "--model_dir", run, "--input_dir", one_image, "--output_dir", out, "--no_progress"]) == 0
    (record,) = read_jsonl(out / "preds.jsonl")
    assert record["image_threshold"] == pytest.approx(expected["image_threshold"], rel=1e-6)
    assert record["pixel_threshold"] == pytest.approx(expected["pixel_threshold"], rel=1e-6)


# -- an ONNX file whose input size differs from export_meta.json ---------------------------------------------------


@pytest.fixture
def resized_onnx_run(patchcore_run: Path, tmp_path: Path) -> Path:
    """A copy of the run whose export/model.onnx declares 96 x 96 inputs (export_meta.json says 64 x 64)."""
    run = _copy_run(patchcore_run, tmp_path / "resized")
    path = run / "export" / "model.onnx"
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 96, 96
    onnx.save(proto, str(path))
    return run


def test_run_onnx_refuses_an_input_size_that_differs_from_export_meta(
    aoi_cli, resized_onnx_run: Path, one_image: Path, tmp_path: Path, capsys
) -> None:
    run, out = resized_onnx_run, tmp_path / "out"
    assert aoi_cli(["run", "--model_dir", run, "--input_dir", one_image, "--output_dir", out, "--backend", "onnx"]) == 2
    # the graph of another size is another file than the one export_meta.json describes
    assert _error_line(capsys, "run") == (
        f"aoi run: error: {run / 'export' / 'model.onnx'} is not the file "
        f"{run / 'export' / 'export_meta.json'} describes (sha256 differs): re-export with `aoi export --run_dir {run}`"
    )
    assert not out.exists()


def test_consistency_refuses_an_input_size_that_differs_from_export_meta(
    aoi_cli, resized_onnx_run: Path, capsys
) -> None:
    run = resized_onnx_run
    before = _tree(run)
    assert aoi_cli(["consistency", "--run_dir", run]) == 2
    assert _error_line(capsys, "consistency") == (
        f"aoi consistency: error: {run / 'export' / 'model.onnx'} takes 96x96 images but export_meta.json says "
        f"(64, 64): re-export with `aoi export --run_dir {run}`"
    )
    assert _tree(run) == before


def test_run_onnx_works_from_a_copy_of_the_export_folder_alone(
    aoi_cli, patchcore_run: Path, one_image: Path, tmp_path: Path
) -> None:
    """No thresholds.json beside the export: the export's own thresholds are used (nothing to disagree with)."""
    export = Path(shutil.copytree(patchcore_run / "export", tmp_path / "export"))
    out = tmp_path / "out"
    assert aoi_cli(["run", "--model_dir", export, "--input_dir", one_image, "--output_dir", out, "--backend", "onnx",
                    "--no_progress"]) == 0  # fmt: skip
    meta = json.loads((export / "export_meta.json").read_text(encoding="utf-8"))
    (record,) = read_jsonl(out / "preds.jsonl")
    assert record["image_threshold"] == pytest.approx(meta["thresholds"]["image_threshold"], rel=1e-6)
    mask = cv2.imdecode(np.fromfile(str(out / record["mask_path"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == tuple(record["image_size"])


def test_unknown_class_path_in_config_is_named_and_the_checkpoint_decides(
    patchcore_run: Path, one_image: Path, tmp_path: Path, caplog
) -> None:
    run = tmp_path / "run"
    shutil.copytree(patchcore_run, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("aoi_lightning.models.Patchcore", "aoi_lightning.models.PatchcoreX"))
    caplog.set_level("WARNING")
    out = tmp_path / "out"
    argv = ["run", "--model_dir", run, "--input_dir", one_image, "--output_dir", out, "--backend", "torch"]
    assert run_aoi([*argv, "--no_progress"]) == 0
    assert "names the model class 'aoi_lightning.models.PatchcoreX', which this package does not know" in caplog.text
    records = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"patchcore"}
