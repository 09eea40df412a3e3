"""`aoi run`'s folders: which files are inputs (linked folders, earlier result folders), output folders that
cannot be used, `--resume` only with the settings that made the records, and the exit status when nothing could
be read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from aoi_lightning.data.image_io import list_images
from aoi_lightning.fileio import read_jsonl
from tests.conftest import run_aoi


@pytest.fixture(scope="module")
def images(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    for i, src in enumerate(sorted((tiny_mvtec_root / "synthetic" / "test").rglob("*.png"))[:4]):
        shutil.copy(src, folder / f"img_{i}.png")
    return folder


def _argv(run: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model_dir", run, "--input_dir", inputs, "--output_dir", out, "--backend", "onnx",
            "--no_progress", *extra]  # fmt: skip


def _names(out: Path) -> list[str]:
    return sorted(Path(r["image_path"]).name for r in read_jsonl(out / "preds.jsonl"))


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_linked_folders_are_followed_once_and_loops_end(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    shutil.copy(images / "img_0.png", root / "top.png")
    (root / "sub" / "linked").symlink_to(images, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)  # above the input: not walked
    shutil.copy(images / "img_0.png", tmp_path / "sibling.png")
    found = [p.relative_to(root).as_posix() for p in list_images(root, recursive=True)]
    assert found == ["sub/linked/img_0.png", "sub/linked/img_1.png", "sub/linked/img_2.png", "sub/linked/img_3.png",
                     "top.png"]  # fmt: skip
    assert [p.name for p in list_images(root)] == ["top.png"]  # top level only


def test_earlier_result_folders_are_not_inputs(patchcore_run: Path, images: Path, tmp_path: Path, caplog) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(images, inputs)
    assert run_aoi(_argv(patchcore_run, inputs, inputs / "results_monday")) == 0
    assert (inputs / "results_monday" / "masks").is_dir()
    caplog.set_level("INFO")
    assert run_aoi(_argv(patchcore_run, inputs, tmp_path / "tuesday")) == 0
    assert _names(tmp_path / "tuesday") == ["img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    assert "left out 1 folder(s) of earlier results" in caplog.text and "results_monday" in caplog.text


@pytest.mark.parametrize("case", ["is_input", "holds_input", "is_file", "under_file"])
def test_unusable_output_dir_is_one_line_before_any_work(
    patchcore_run: Path, images: Path, tmp_path: Path, capsys, case: str
) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(images, inputs)
    (tmp_path / "afile").write_text("x")
    out = {"is_input": inputs, "holds_input": tmp_path, "is_file": tmp_path / "afile",
           "under_file": tmp_path / "afile" / "sub"}[case]  # fmt: skip
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert run_aoi(_argv(patchcore_run, inputs, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    expected = {"is_input": "is --input_dir or holds it", "holds_input": "is --input_dir or holds it",
                "is_file": "is a file, not a folder", "under_file": "cannot create"}[case]  # fmt: skip
    assert expected in err, err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_without_write_permission(patchcore_run: Path, images: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert run_aoi(_argv(patchcore_run, images, locked)) == 2
    finally:
        locked.chmod(0o700)
    assert "--output_dir: cannot write in" in capsys.readouterr().err


def test_settings_json_records_what_made_the_records(patchcore_run: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_aoi(_argv(patchcore_run, images, out, "--pixel_threshold_mult", "0.5", "--min_defect_area", "3")) == 0
    settings = json.loads((out / "settings.json").read_text())
    record = read_jsonl(out / "preds.jsonl")[0]
    assert settings["run_id"] == json.loads((out / "report.json").read_text())["run_id"]
    assert settings["input_dir"] == str(images.resolve())
    assert (settings["pixel_threshold_mult"], settings["min_defect_area"]) == (0.5, 3)
    assert (settings["save_masks"], settings["save_overlays"]) == (True, True)
    assert settings["input_size"] == record["model_input_size"]
    assert settings["pixel_threshold"] * 0.5 == pytest.approx(record["effective_pixel_threshold"])


@pytest.mark.parametrize(
    "change, named",
    [
        (["--pixel_threshold_mult", "0.5"], "pixel_threshold_mult 1.0 -> 0.5"),
        (["--min_defect_area", "7"], "min_defect_area 0 -> 7"),
        (["--no_save_overlays"], "save_overlays True -> False"),
        ("other_model", "model 'patchcore' -> 'padim'"),
        ("other_input", "input_dir"),
    ],
)
def test_resume_with_other_settings_is_refused_and_changes_nothing(
    patchcore_run: Path, padim_run: Path, images: Path, tmp_path: Path, capsys, change, named: str
) -> None:
    out = tmp_path / "out"
    assert run_aoi(_argv(patchcore_run, images, out)) == 0
    lines = (out / "preds.jsonl").read_bytes()
    report = (out / "report.json").read_bytes()
    run, inputs, extra = patchcore_run, images, []
    if change == "other_model":
        run = padim_run
    elif change == "other_input":
        inputs = tmp_path / "elsewhere"
        shutil.copytree(images, inputs)
    else:
        extra = change
    capsys.readouterr()
    assert run_aoi(_argv(run, inputs, out, "--resume", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds records made with other settings" in err and named in err and len(err.splitlines()) == 1
    assert (out / "preds.jsonl").read_bytes() == lines and (out / "report.json").read_bytes() == report


def test_resume_with_the_same_settings_and_another_backend(
    patchcore_run: Path, images: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert run_aoi(_argv(patchcore_run, images, out, "--min_defect_area", "2")) == 0
    first = read_jsonl(out / "preds.jsonl")
    (out / "preds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first[:2]))
    argv = _argv(patchcore_run, images, out, "--min_defect_area", "2", "--resume")
    argv[argv.index("onnx")] = "torch"
    assert run_aoi(argv) == 0
    assert _names(out) == ["img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    capsys.readouterr()
    assert run_aoi(argv) == 0  # nothing left to do: no speed figure for zero images
    summary = capsys.readouterr().out
    assert "4 images (" in summary and "images/s" not in summary


def test_damaged_middle_line_names_the_file_and_line(patchcore_run: Path, images: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert run_aoi(_argv(patchcore_run, images, out)) == 0
    lines = (out / "preds.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:30] + "\n"
    (out / "preds.jsonl").write_text("".join(lines))
    capsys.readouterr()
    assert run_aoi(_argv(patchcore_run, images, out, "--resume")) == 2
    assert f"{out / 'preds.jsonl'} line 2 is not valid JSON" in capsys.readouterr().err


def test_nothing_readable_exits_3(patchcore_run: Path, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "bad"
    inputs.mkdir()
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "text.png").write_text("not an image")
    assert run_aoi(_argv(patchcore_run, inputs, tmp_path / "out")) == 3
    captured = capsys.readouterr()
    assert "0 images (0 OK, 0 NG), 2 errors ->" in captured.out and "images/s" not in captured.out
    assert "nothing was inspected" in captured.err
    assert len(read_jsonl(tmp_path / "out" / "preds.jsonl")) == 2
