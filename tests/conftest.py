"""Shared fixtures: an isolated cache, a tiny synthetic MVTec tree, and tiny fits of both models via the CLI."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from aoi_lightning.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "experiments" / "quickstart.yaml"
TINY_SIZE = 64
#: False in the torch-free line install, where only the modules marked `torchfree` are collected.
HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without torch, leave out the test modules that do not mark themselves `pytest.mark.torchfree` (importing
    them would fail)."""
    if HAS_TORCH or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return True if "pytest.mark.torchfree" not in collection_path.read_text(encoding="utf-8") else None


def run_aoi(argv: list[str]) -> int:
    """Run the `aoi` entry point in-process and return its exit code (jsonargparse errors raise SystemExit)."""
    try:
        return int(main([str(a) for a in argv]) or 0)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)


def tiny_fit_args(model: str, data_root: Path, runs_root: Path, run_id: str, *extra: str) -> list[str]:
    """Arguments of a fast CPU fit on the tiny synthetic tree (64 px, no worker processes)."""
    return [
        "fit",
        "--config", QUICKSTART,
        "--model", model,
        "--data.root", data_root,
        "--data.category", "synthetic",
        "--data.image_size", str(TINY_SIZE),
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--runs_root", runs_root,
        "--run_id", run_id,
        *extra,
    ]  # fmt: skip


def aoi_run_records(model_dir: Path, backend: str, images: Path, out: Path, *extra: str) -> dict[str, dict]:
    """`aoi run` of `model_dir` with `backend` on CPU over `images` into `out` (exit code 0 asserted); its
    preds.jsonl records by file name."""
    argv = ["run", "--model_dir", model_dir, "--input_dir", images, "--output_dir", out, "--backend", backend]
    assert run_aoi([*argv, "--device", "cpu", "--no_progress", *extra]) == 0
    lines = (Path(out) / "preds.jsonl").read_text(encoding="utf-8").splitlines()
    return {Path(r["image_path"]).name: r for r in map(json.loads, lines)}


@pytest.fixture(scope="session")
def run_records():
    """`run_records(model_dir, backend, images, out, *extra) -> {file name: record}`: an `aoi run` in-process."""
    return aoi_run_records


@pytest.fixture(scope="session", autouse=True)
def isolated_aoi_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point AOI_CACHE_DIR at a session temp dir so no test touches ~/.cache."""
    cache = tmp_path_factory.mktemp("aoi_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AOI_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec AD tree: `<root>/synthetic/{train,test,ground_truth}`, 64 x 64 images."""
    from aoi_lightning.data.synthetic import generate_synthetic_mvtec

    root = tmp_path_factory.mktemp("tiny_mvtec")
    return Path(generate_synthetic_mvtec(root, n_train=12, n_test_good=4, n_test_per_defect=2, image_size=TINY_SIZE))


@pytest.fixture(scope="session")
def tiny_runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs root shared by the session's CLI fits."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def aoi_cli():
    """`aoi_cli(argv) -> exit code`: the `aoi` entry point run in-process."""
    return run_aoi


@pytest.fixture(scope="session")
def tiny_fit_argv():
    """`tiny_fit_argv(model, data_root, runs_root, run_id, *extra)`: argv of a fast CPU fit on a tiny tree."""
    return tiny_fit_args


@pytest.fixture(scope="session")
def fit_listings() -> dict[str, list[str]]:
    """Files of each fixture run directory right after `aoi fit` (later commands may add eval/ etc.)."""
    return {}


def _listing(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))


def _fit(model: str, name: str, root: Path, runs_root: Path, listings: dict[str, list[str]]) -> Path:
    code = run_aoi(tiny_fit_args(model, root, runs_root, name, "--seed", "0"))
    assert code == 0, f"aoi fit of {model} failed with exit code {code}"
    run = runs_root / model.rsplit(".", 1)[-1].lower() / "synthetic" / name
    assert run.is_dir(), run
    listings[name] = _listing(run)
    return run


@pytest.fixture(scope="session")
def padim_run(tiny_mvtec_root: Path, tiny_runs_root: Path, fit_listings: dict[str, list[str]]) -> Path:
    """Run directory of a PaDiM fit on the tiny tree (seed 0)."""
    return _fit("aoi_lightning.models.Padim", "padim_tiny", tiny_mvtec_root, tiny_runs_root, fit_listings)


@pytest.fixture(scope="session")
def patchcore_run(tiny_mvtec_root: Path, tiny_runs_root: Path, fit_listings: dict[str, list[str]]) -> Path:
    """Run directory of a PatchCore fit on the tiny tree (seed 0)."""
    return _fit("aoi_lightning.models.Patchcore", "patchcore_tiny", tiny_mvtec_root, tiny_runs_root, fit_listings)


@pytest.fixture(scope="session")
def tiny_onnx_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding only a tiny ONNX export (written with the `onnx` helper API, no torch): anomaly map
    = channel mean of the 32 x 32 input, score = its maximum, thresholds 0.5 (see tests/tiny_onnx.py)."""
    pytest.importorskip("onnx")
    from tiny_onnx import make_tiny_onnx_run

    return make_tiny_onnx_run(tmp_path_factory.mktemp("tiny_onnx_run"))
