#!/usr/bin/env python
"""Phase tables of the whole commands a user runs: `aoi fit` (per phase, from its timed log lines and meta.json)
and `aoi run` (whole-process wall time over one image and over the whole test folder, and the marginal time per
image).

Each command runs as its own process, one after the other, as a user types it. Run it with nothing else busy on
the machine and compare figures of the same run only.

    python tools/profile_commands.py --root ../shared/datasets/mvtec_ad --category transistor \
        --models padim patchcore --output tools/results/profile_transistor

`--make_large_set N_TRAIN N_TEST` first writes a larger MVTec-layout category `<category>_large` under
`--work_dir` from the category's images, each image repeated as flipped and rotated copies (masks alike), and
profiles that. `--aoi` runs another installation's `aoi` (e.g. an older checkout's) for a before/after table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import data_parser, markdown_table  # noqa: E402

#: Phase lines that `aoi fit` logs (`INFO: <name>: <seconds> s (...)`), in the order of the table.
FIT_PHASES = ("finalize", "coreset", "training-image scores", "ONNX export", "consistency check", "report")
PHASE_LINE = re.compile(r"INFO: ([A-Za-z][A-Za-z -]*): ([0-9.]+) s\b")
#: Flips and rotations that make distinct copies of a (square or not) image, as (name, function).
VARIANTS = (
    ("", lambda a: a),
    ("_h", lambda a: cv2.flip(a, 1)),
    ("_v", lambda a: cv2.flip(a, 0)),
    ("_hv", lambda a: cv2.flip(a, -1)),
    ("_r90", lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE)),
    ("_r270", lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)),
    ("_t", lambda a: cv2.transpose(a)),
    ("_tv", lambda a: cv2.flip(cv2.transpose(a), 0)),
)


def make_large_set(root: Path, category: str, out_root: Path, n_train: int, n_test: int) -> str:
    """Write `<out_root>/<category>_large` with `n_train` good training images and `n_test` test images (defect
    types kept, masks transformed like their images) made of flipped/rotated copies. Returns its category name."""
    name = f"{category}_large"
    src, dst = root / category, out_root / name
    if dst.is_dir():
        shutil.rmtree(dst)

    def copies(files: list[Path], count: int):
        for k in range(count):
            suffix, fn = VARIANTS[(k // len(files)) % len(VARIANTS)]
            yield files[k % len(files)], suffix, fn

    train = sorted((src / "train" / "good").glob("*.png"))
    for path, suffix, fn in copies(train, n_train):
        target = dst / "train" / "good" / f"{path.stem}{suffix}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), fn(cv2.imread(str(path), cv2.IMREAD_UNCHANGED)))
    test = sorted((src / "test").glob("*/*.png"))
    for path, suffix, fn in copies(test, n_test):
        defect = path.parent.name
        target = dst / "test" / defect / f"{path.stem}{suffix}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), fn(cv2.imread(str(path), cv2.IMREAD_UNCHANGED)))
        mask = src / "ground_truth" / defect / f"{path.stem}_mask.png"
        if mask.is_file():
            out = dst / "ground_truth" / defect / f"{path.stem}{suffix}_mask.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out), fn(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)))
    return name


def timed(cmd: list[str], log: Path) -> float:
    """Run `cmd` with stdout+stderr to `log`; wall seconds. Errors stop the profile."""
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    return wall


def profile_fit(aoi: str, model: str, root: Path, category: str, runs: Path, extra: list[str], logs: Path) -> dict:
    run_id = "profile"
    log = logs / f"fit_{model}_{category}.log"
    wall = timed(
        [aoi, "fit", "--config", f"experiments/{model}_mvtec.yaml", "--data.root", str(root), "--data.category",
         category, "--runs_root", str(runs), "--run_id", run_id, "--trainer.enable_progress_bar", "false", *extra],
        log,
    )  # fmt: skip
    run = runs / model / category / run_id
    timings = json.loads((run / "meta.json").read_text(encoding="utf-8"))["timings"]
    phases: dict[str, float] = {}
    for match in PHASE_LINE.finditer(log.read_text(encoding="utf-8", errors="replace")):
        name = match.group(1).strip()
        if name in FIT_PHASES:
            phases[name] = phases.get(name, 0.0) + float(match.group(2))
    row = {"command": f"aoi fit {model}", "category": category, "wall_s": wall, "run_dir": str(run)}
    row["feature extraction"] = timings.get("feature_extraction_s", 0.0)
    for name in FIT_PHASES:
        row[name] = phases.get(name, 0.0)
    if "finalize" in phases and "coreset" in phases:
        row["finalize"] -= phases["coreset"]  # the coreset runs inside the finalize phase
    # the checkpoint write, and the second pass over the training images when the fit pass kept no embeddings
    row["checkpoint"] = timings.get("checkpoint_s", 0.0)
    row["preds_train (second pass)"] = timings.get("score_train_s", 0.0)
    row["test pass"] = timings.get("test_s", 0.0) - phases.get("report", 0.0)
    fit_loop = timings.get("fit_s", 0.0)
    inside = sum(phases.get(n, 0.0) for n in ("finalize", "training-image scores", "ONNX export", "consistency check"))
    row["validation + thresholds"] = max(0.0, fit_loop - row["feature extraction"] - inside)
    known = fit_loop + row["checkpoint"] + row["preds_train (second pass)"] + timings.get("test_s", 0.0)
    row["start-up, loading, exit"] = wall - known
    row["num_train"] = timings.get("num_fit_images")
    return row


def profile_run(aoi: str, run_dir: str, test_dir: Path, backend: str, work: Path, logs: Path) -> dict:
    one = work / "one_image"
    if one.is_dir():
        shutil.rmtree(one)
    one.mkdir(parents=True)
    images = sorted(test_dir.rglob("*.png"))
    shutil.copy(images[0], one / images[0].name)
    row = {"command": f"aoi run --backend {backend}", "run_dir": run_dir, "images": len(images)}
    for label, folder, flags in (
        ("1 image", one, ["--no_save_masks", "--no_save_overlays"]),
        ("all", test_dir, ["--no_save_masks", "--no_save_overlays"]),
        ("1 image + pictures", one, []),
        ("all + pictures", test_dir, []),
    ):
        out = work / "run_out"
        if out.is_dir():
            shutil.rmtree(out)
        cmd = [aoi, "run", "--model_dir", run_dir, "--input_dir", str(folder), "--output_dir", str(out),
               "--backend", backend, "--no_progress", *flags]  # fmt: skip
        log = logs / f"run_{Path(run_dir).parts[-3]}_{backend}_{label.replace(' ', '_')}.log"
        row[f"{label} wall_s"] = timed(cmd, log)
    n = max(1, len(images) - 1)
    row["marginal ms/image"] = (row["all wall_s"] - row["1 image wall_s"]) / n * 1000
    row["marginal ms/image + pictures"] = (row["all + pictures wall_s"] - row["1 image + pictures wall_s"]) / n * 1000
    return row


def markdown(rows: list[dict], keys: list[str]) -> str:
    def text(value) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    return markdown_table(keys, [[text(row.get(k, "")) for k in keys] for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = data_parser(__doc__)
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx", "openvino"])
    parser.add_argument("--aoi", default=shutil.which("aoi") or "aoi", help="the aoi executable to profile")
    parser.add_argument("--work_dir", default="profile_work", help="runs, logs and the larger set go here")
    parser.add_argument("--make_large_set", nargs=2, type=int, metavar=("N_TRAIN", "N_TEST"), default=None)
    parser.add_argument("--fit_args", nargs=argparse.REMAINDER, default=[], help="extra `aoi fit` options (last)")
    parser.add_argument("--output", default="profile", help="writes OUTPUT.json and OUTPUT.md")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root, category = Path(args.root).resolve(), args.category
    if args.make_large_set:
        category = make_large_set(root, category, work / "data", *args.make_large_set)
        root = work / "data"
        print(f"wrote {root / category}", file=sys.stderr)
    fits, runs = [], []
    for model in args.models:
        print(f"aoi fit {model} {category} ...", file=sys.stderr, flush=True)
        fits.append(profile_fit(args.aoi, model, root, category, work / "runs", args.fit_args, logs))
    for fit in fits:
        for backend in args.backends:
            print(f"aoi run {fit['command']} {backend} ...", file=sys.stderr, flush=True)
            runs.append(profile_run(args.aoi, fit["run_dir"], root / category / "test", backend, work, logs))
    fit_keys = ["command", "category", "num_train", "wall_s", "start-up, loading, exit", "feature extraction",
                "finalize", "coreset", "training-image scores", "validation + thresholds", "ONNX export",
                "consistency check", "checkpoint", "preds_train (second pass)", "test pass", "report"]  # fmt: skip
    run_keys = ["command", "run_dir", "images", "1 image wall_s", "all wall_s", "marginal ms/image",
                "1 image + pictures wall_s", "all + pictures wall_s", "marginal ms/image + pictures"]  # fmt: skip
    text = (
        f"`aoi fit` phases, seconds ({root / category}):\n\n{markdown(fits, fit_keys)}\n\n"
        f"`aoi run` whole command, seconds (marginal: all minus one image, per image):\n\n{markdown(runs, run_keys)}\n"
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({"fit": fits, "run": runs}, indent=2) + "\n", encoding="utf-8")
    output.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
