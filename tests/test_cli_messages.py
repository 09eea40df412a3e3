"""What a user sees: one-line option errors with the closest match, `--help`, `--print_config` / `--config`,
no run directory after a fit that never started, `aoi run` on MVTec-style folders, each log line once."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from aoi_lightning.fileio import read_json, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "experiments" / "quickstart.yaml"
AOI = "import sys; from aoi_lightning.cli import main; sys.exit(main(sys.argv[1:]))"


def _aoi(*argv, timeout: int = 600) -> subprocess.CompletedProcess:
    """`aoi argv` in a child process (its own logging set-up, as on a terminal)."""
    return subprocess.run(
        [sys.executable, "-c", AOI, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_model_option_typo_is_one_line_with_the_closest_match(tmp_path: Path) -> None:
    res = _aoi("fit", "--config", QUICKSTART, "--model.init_args.corset_ratio", "0.1", "--runs_root", tmp_path)
    assert res.returncode == 2
    assert _lines(res.stderr) == [
        "aoi fit: error: model.init_args.corset_ratio: not an option of Patchcore; did you mean coreset_ratio? "
        "(options of Patchcore: backbone, layers, weights, coreset_ratio, num_neighbors, projection_dim, seed, "
        "bank_dtype, search, sigma, index, index_params, tile_size, tile_overlap, tile_thresholds, tile_batch, "
        "fit_embeddings_mb)"
    ], res.stderr
    assert not (tmp_path / "patchcore").exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("coreset_ratio: 0.01", "corset_ratio: 0.01"),
            "model.init_args.corset_ratio: not an option of Patchcore; did you mean coreset_ratio?",
        ),
        (
            ("  category: synthetic", "  categry: synthetic"),
            "data.categry: unknown option; did you mean data.category? (options of data: root, category, image_size,",
        ),
        (
            ("seed_everything: 0", "seed_everythin: 0"),
            "seed_everythin: unknown option; did you mean seed_everything? "
            "(options: seed_everything, trainer, model, data, run_id, runs_root, ckpt_path",
        ),
        (
            ("class_path: aoi_lightning.models.Patchcore", "class_path: Patchcor"),
            "model: 'Patchcor' is not a class name or class path; did you mean Patchcore? (classes: Padim, Patchcore)",
        ),
    ],
    ids=["model-key", "data-key", "top-level-key", "model-class"],
)
def test_yaml_typo_is_one_line_with_the_closest_match(edit, expected, tmp_path: Path, aoi_cli, capsys) -> None:
    config = tmp_path / "typo.yaml"
    text = QUICKSTART.read_text(encoding="utf-8")
    assert edit[0] in text
    config.write_text(text.replace(edit[0], edit[1]), encoding="utf-8")
    assert aoi_cli(["fit", "--config", config, "--runs_root", tmp_path / "runs"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"aoi fit: error: {expected}"), err
    assert not (tmp_path / "runs").exists()


def test_wrong_type_is_one_line_and_debug_keeps_the_full_report(aoi_cli, capsys) -> None:
    argv = ["fit", "--config", QUICKSTART, "--data.num_workers", "many"]
    assert aoi_cli(argv) == 2
    assert _lines(capsys.readouterr().err) == ["aoi fit: error: data.num_workers: expected int, got many"]
    assert aoi_cli([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: aoi [options] fit") and len(_lines(err)) > 20
    assert 'Parser key "data.num_workers"' in err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.init_args.tile_size", "abc"], "model.init_args.tile_size: expected int or null, got abc"),
        (
            ["--model.init_args.tile_thresholds", "tile"],
            "model.init_args.tile_thresholds: expected one of global, per_tile, got tile; did you mean per_tile?",
        ),
        (
            ["--model", "Padm"],
            "model: 'Padm' is not a class name or class path; did you mean Padim? (classes: Padim, Patchcore)",
        ),
        (
            ["--trainer.acelerator", "cpu"],
            "trainer.acelerator: unknown option; did you mean trainer.accelerator? "
            "(options of trainer: accelerator, strategy, devices,",
        ),
    ],
    ids=["nested-union", "nested-literal", "model-class", "trainer-key"],
)
def test_nested_errors_are_one_line(extra, expected, aoi_cli, capsys) -> None:
    assert aoi_cli(["fit", "--config", QUICKSTART, *extra]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"aoi fit: error: {expected}"), err


def test_unknown_command_names_the_closest(aoi_cli, capsys) -> None:
    assert aoi_cli(["fti"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith("aoi: error: unknown command 'fti'; did you mean fit? commands: fit, validate, test, ")
    assert "run, export, consistency, compare, check-data, report" in err[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--batch_sise", "3"],
            "aoi run: error: --batch_sise: unknown option; did you mean --batch_size? (options: "
            "--model_dir, --input_dir, --output_dir, --recursive, --pixel_threshold_mult,",
        ),
        (["--batch_size", "x"], "aoi run: error: --batch_size: expected int, got x"),
        (["--device", "gpu"], "aoi run: error: --device: expected one of cpu, cuda, auto, got gpu"),
        (["--recursive", "maybe"], "aoi run: error: --recursive: expected bool, got maybe"),
    ],
    ids=["unknown", "int", "literal", "bool"],
)
def test_inspection_option_errors_are_one_line(argv, expected, tmp_path: Path, aoi_cli, capsys) -> None:
    base = ["run", "--model_dir", tmp_path, "--input_dir", tmp_path, "--output_dir", tmp_path / "out"]
    assert aoi_cli([*base, *argv]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "out").exists()


def test_missing_required_options_are_named(aoi_cli, capsys) -> None:
    assert aoi_cli(["compare", "--run_dir_a", "a"]) == 2
    assert _lines(capsys.readouterr().err) == ["aoi compare: error: --run_dir_b, --output_dir are required"]


def test_run_help_lists_the_options_with_types_and_defaults(aoi_cli, capsys) -> None:
    assert aoi_cli(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the help wraps lines
    for text in (
        "--model_dir MODEL_DIR trained run directory",
        "(required, type: str)",
        "--recursive [{true,false}] also take images from subfolders",
        "(type: bool, default: True)",
        "--batch_size BATCH_SIZE images per forward pass (>= 1). (type: int, default: 8)",
        "--pixel_threshold_mult PIXEL_THRESHOLD_MULT",
        "(type: float, default: 1.0)",
        "--backend {torch,onnx,openvino}",
        "--config CONFIG",
        "--print_config",
    ):
        assert text in out, text


def test_fit_help_says_how_to_see_the_model_options(aoi_cli, capsys) -> None:
    assert aoi_cli(["fit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "`aoi fit --model.help Padim` or `aoi fit --model.help Patchcore`" in out
    assert aoi_cli(["fit", "--model.help", "Patchcore"]) == 0
    out = capsys.readouterr().out
    assert "--model.coreset_ratio" in out and "--model.backbone" in out
    assert aoi_cli(["fit", "--model.help", "aoi_lightning.models.Padim"]) == 0
    assert "--model.n_features" in capsys.readouterr().out


def test_print_config_feeds_back_through_config(tiny_mvtec_root: Path, tmp_path: Path, aoi_cli, capsys) -> None:
    out = tmp_path / "check"
    argv = ["--root", tiny_mvtec_root, "--category", "synthetic", "--output_dir", out, "--samples", "2", "--strict"]
    assert aoi_cli(["check-data", *argv, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "samples: 2" in printed and "strict: true" in printed and "tile_size: 160" in printed
    config = tmp_path / "check.yaml"
    config.write_text(printed, encoding="utf-8")
    assert aoi_cli(["check-data", "--config", config, "--print_config"]) == 0
    assert capsys.readouterr().out == printed
    assert not out.exists()  # --print_config only prints
    assert aoi_cli(["check-data", "--config", config, "--tile_size", "64"]) == 0  # the tiny tree has no problems
    report = read_json(out / "data_check.json")
    assert report["num_problems"] == 0 and (out / "preview.png").is_file()
    config.write_text(printed.replace("samples: 2", "sampels: 2"), encoding="utf-8")
    assert aoi_cli(["check-data", "--config", config]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(
        "aoi check-data: error: --sampels: unknown option; did you mean --samples?"
    )


def test_failed_fit_leaves_no_run_directory(tiny_mvtec_root, tmp_path: Path, aoi_cli, tiny_fit_argv, capsys) -> None:
    runs = tmp_path / "runs"
    (runs / "padim" / "synthetic" / "older").mkdir(parents=True)
    (runs / "padim" / "synthetic" / "older" / "metrics.json").write_text("{}", encoding="utf-8")
    argv = tiny_fit_argv(
        "aoi_lightning.models.Patchcore", tiny_mvtec_root, runs, "never", "--data.root", tmp_path / "x"
    )
    assert aoi_cli(argv) == 2
    assert "data.root: folder not found" in capsys.readouterr().err
    assert sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*")) == [
        "padim", "padim/synthetic", "padim/synthetic/older", "padim/synthetic/older/metrics.json",
    ]  # fmt: skip

    # a run directory that held files before is kept as it was
    kept = runs / "patchcore" / "synthetic" / "kept"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine", encoding="utf-8")
    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, runs, "kept", "--data.root", tmp_path / "x")
    assert aoi_cli(argv) == 2
    assert (kept / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_run_takes_the_images_of_subfolders(aoi_cli, patchcore_run: Path, tiny_mvtec_root: Path, tmp_path, capsys):
    """MVTec layout: test/<defect type>/*.png, no image at the top level."""
    test_dir = tiny_mvtec_root / "synthetic" / "test"
    expected = sorted(p.relative_to(test_dir).as_posix() for p in test_dir.rglob("*.png"))
    assert expected and not list(test_dir.glob("*.png"))
    out = tmp_path / "out"
    argv = ["run", "--model_dir", patchcore_run, "--input_dir", test_dir, "--output_dir", out, "--no_progress"]
    assert aoi_cli([*argv, "--no_save_overlays", "--device", "cpu"]) == 0
    records = read_jsonl(out / "preds.jsonl")
    assert sorted(Path(r["image_path"]).relative_to(test_dir.resolve()).as_posix() for r in records) == expected
    assert read_json(out / "report.json")["num_images"] == len(expected)

    top = tmp_path / "top"
    assert aoi_cli([*argv[:-3], "--output_dir", top, "--no_progress", "--recursive", "false"]) == 2
    err = _lines(capsys.readouterr().err)
    assert err == [
        f"aoi run: error: --input_dir: no images (png, jpg, jpeg, bmp, tif, tiff, webp) at the top level of "
        f"{test_dir.resolve()}; {len(expected)} in its subfolders (leave out --recursive false)"
    ]
    assert not top.exists()


def test_run_on_a_folder_without_images_says_so(aoi_cli, patchcore_run: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here", encoding="utf-8")
    out = tmp_path / "out"
    assert aoi_cli(["run", "--model_dir", patchcore_run, "--input_dir", empty, "--output_dir", out]) == 2
    assert _lines(capsys.readouterr().err) == [
        f"aoi run: error: --input_dir: no images (png, jpg, jpeg, bmp, tif, tiff, webp) in {empty.resolve()} "
        "or its subfolders"
    ]
    assert not out.exists()


def test_fit_prints_each_log_line_once(tiny_mvtec_root: Path, tmp_path: Path, tiny_fit_argv) -> None:
    argv = tiny_fit_argv("aoi_lightning.models.Padim", tiny_mvtec_root, tmp_path / "runs", "logs_once")
    res = _aoi(*argv, "--trainer.callbacks", "[]")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = _lines(res.stderr)
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, repeated
    assert sum("Seed set to 0" in line for line in lines) == 1, lines
    assert not [line for line in lines if "litlogger" in line or "Tip:" in line]
    assert any("run directory:" in line for line in lines)


def test_fit_logs_one_timed_line_per_phase(tiny_mvtec_root: Path, tmp_path: Path, tiny_fit_argv) -> None:
    """finalize, coreset, ONNX export, consistency check and report: one `<phase>: <s> s (...)` line each, with
    the seconds that meta.json records."""
    import re

    argv = tiny_fit_argv("aoi_lightning.models.Patchcore", tiny_mvtec_root, tmp_path / "runs", "phases")
    res = _aoi(*argv)
    assert res.returncode == 0, res.stderr[-3000:]
    pattern = re.compile(r"\b(finalize|coreset|ONNX export|consistency check|report): (\d+\.\d) s(?: \((.*)\))?$")
    found: dict[str, list[tuple[float, str]]] = {}
    for line in _lines(res.stderr):
        match = pattern.search(line)
        if match:
            found.setdefault(match[1], []).append((float(match[2]), match[3] or ""))
    assert sorted(found) == sorted(["finalize", "coreset", "ONNX export", "consistency check", "report"]), found
    assert all(len(v) == 1 for v in found.values()), found
    run = tmp_path / "runs" / "patchcore" / "synthetic" / "phases"
    timings = read_json(run / "meta.json")["timings"]
    assert found["finalize"][0][0] == pytest.approx(timings["fit_finalize_s"], abs=0.051)
    assert re.fullmatch(r"Patchcore fitted on \d+ images", found["finalize"][0][1]), found
    assert re.fullmatch(r"[\d.]+% of [\d,]+ patches: [\d,]+ kept", found["coreset"][0][1]), found
    consistency = read_json(run / "export" / "consistency.json")
    assert found["consistency check"][0][1] == f"{consistency['num_images']} images, PASSED"
    assert found["ONNX export"][0][1].endswith(f"MB, written to {run / 'export' / 'model.onnx'}")
    assert found["report"][0][1] == f"written to {run / 'report.html'}"
