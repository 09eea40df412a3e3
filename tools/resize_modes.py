#!/usr/bin/env python
"""`data.resize: stretch` against `fit_pad` on images whose aspect ratio varies: whole `aoi fit` runs, metrics.json.

Writes `<work_dir>/data/<category>_varied`: every image of the category (train and test, masks alike) cut to a
centred crop that keeps the full height and a seeded random share of the width, or the full width and a share of the
height (the share drawn uniformly from [--min_share, 1]). The part stays centred and at its size, as when a line
crops each picture to a detected part or mixes camera formats. Then, for each model, `aoi fit --config
experiments/<model>_mvtec.yaml` on the unchanged category and on the cropped one, once per resize mode, each in
its own process, and a table of test image AUROC, pixel AUROC, AUPRO and the fit wall time.

    python tools/resize_modes.py --root ../shared/datasets/mvtec_ad --category transistor \
        --work_dir /tmp/resize_modes --output tools/results/resize_modes_transistor
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import data_parser, markdown_table  # noqa: E402
from profile_commands import timed  # noqa: E402

MODES = ("stretch", "fit_pad")


def centred_crop(image: np.ndarray, share: float, keep_height: bool) -> np.ndarray:
    """The centred crop of `image` with its full height and `share` of its width (or the other way round)."""
    h, w = image.shape[:2]
    if keep_height:
        cw = max(1, round(w * share))
        return image[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    ch = max(1, round(h * share))
    return image[(h - ch) // 2 : (h - ch) // 2 + ch]


def make_varied_set(root: Path, category: str, out_root: Path, min_share: float, seed: int) -> str:
    """Write `<out_root>/<category>_varied` (see the module doc); returns its category name."""
    name = f"{category}_varied"
    src, dst = root / category, out_root / name
    if dst.is_dir():
        shutil.rmtree(dst)
    rng = np.random.default_rng(seed)
    for path in sorted(src.glob("train/good/*.png")) + sorted(src.glob("test/*/*.png")):
        share, keep_height = float(rng.uniform(min_share, 1.0)), bool(rng.integers(2))
        rel = path.relative_to(src)
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), centred_crop(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), share, keep_height))
        mask = src / "ground_truth" / rel.parent.name / f"{path.stem}_mask.png"
        if rel.parts[0] == "test" and mask.is_file():
            out = dst / "ground_truth" / rel.parent.name / mask.name
            out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out), centred_crop(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED), share, keep_height))
    return name


def main(argv: list[str] | None = None) -> int:
    parser = data_parser(__doc__)
    parser.add_argument("--aoi", default=shutil.which("aoi") or "aoi", help="the aoi executable")
    parser.add_argument("--work_dir", default="resize_modes_work")
    parser.add_argument("--min_share", type=float, default=0.5, help="smallest kept share of the cropped side")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops")
    parser.add_argument("--fit_args", nargs="*", default=[], help="extra `aoi fit` options")
    parser.add_argument("--output", default="resize_modes", help="writes OUTPUT.json and OUTPUT.md")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    varied = make_varied_set(Path(args.root).resolve(), args.category, work / "data", args.min_share, args.seed)
    sets = [(args.category, Path(args.root).resolve()), (varied, work / "data")]
    rows = []
    for model in args.models:
        for category, root in sets:
            for mode in MODES:
                run_id = mode
                print(f"aoi fit {model} {category} --data.resize {mode} ...", file=sys.stderr, flush=True)
                cmd = [args.aoi, "fit", "--config", f"experiments/{model}_mvtec.yaml", "--data.root", str(root),
                       "--data.category", category, "--data.resize", mode, "--runs_root", str(work / "runs"),
                       "--run_id", run_id, "--trainer.enable_progress_bar", "false", *args.fit_args]  # fmt: skip
                wall = timed(cmd, logs / f"{model}_{category}_{mode}.log")
                test = json.loads((work / "runs" / model / category / run_id / "metrics.json").read_text())["test"]
                rows.append({"model": model, "data": category, "resize": mode, "fit_wall_s": wall,
                             **{k: test.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}})  # fmt: skip

    def cell(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    body = [
        [r["data"], r["model"], r["resize"], cell(r["image_auroc"], 3), cell(r["pixel_auroc"], 3),
         cell(r["pixel_aupro"], 3), cell(r["fit_wall_s"], 1)]
        for r in rows
    ]  # fmt: skip
    text = markdown_table(["data", "model", "resize", "image AUROC", "pixel AUROC", "AUPRO", "aoi fit s"], body)
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    output.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
