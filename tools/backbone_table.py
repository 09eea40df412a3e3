#!/usr/bin/env python
"""Accuracy against cost of the offline backbones (EfficientNet-Lite0/1/2) for PaDiM and PatchCore.

For every backbone x model x working size, one `tools/benchmark.py` configuration in a fresh process: fit on the
training images, image AUROC, pixel AUROC and AUPRO on the full test set, fit time, batch-1 latency and peak RSS.
On the real category at `--sizes`; on the built-in synthetic set at the first size only, once per `--seeds`
(each seed draws another synthetic set, so the spread over seeds shows how much a difference means).

    python tools/backbone_table.py --root ../shared/datasets/mvtec_ad --category transistor \
        --sizes 256 320 --seeds 0 1 2 --output tools/results/backbones
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import data_parser, markdown_table  # noqa: E402
from benchmark import run_isolated  # noqa: E402

BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_total_s", "batch1_ms", "peak_rss_mb")


def config(model: str, backbone: str, size: int, root: str, category: str, repeats: int) -> dict:
    return {
        "model": model, "root": root, "category": category, "backbone": backbone, "weights": "package",
        "image_size": size, "coreset_ratio": 0.01 if model == "patchcore" else None, "projection_dim": 32,
        "n_features": None, "repeats": repeats, "threads": 2, "workers": 2, "train_images": 0, "onnx": False,
        "stats_dtype": "float16" if model == "padim" else None,
    }  # fmt: skip


def summarise(rows: list[dict]) -> dict:
    """Mean and (for several rows) the spread max - min of each metric."""
    out = {}
    for key in METRICS:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        if values:
            out[key] = statistics.fmean(values)
            out[f"{key}_spread"] = max(values) - min(values) if len(values) > 1 else None
    return out


def table(rows: list[dict]) -> str:
    head = ("data", "model", "backbone", "size", "runs", "image AUROC", "pixel AUROC", "AUPRO", "fit s", "batch-1 ms",
            "peak RSS MB")  # fmt: skip
    metrics = (("image_auroc", 3), ("pixel_auroc", 3), ("pixel_aupro", 3), ("fit_total_s", 1), ("batch1_ms", 1),
               ("peak_rss_mb", 0))  # fmt: skip

    def cell(r: dict, key: str, digits: int) -> str:
        value, spread = r.get(key), r.get(f"{key}_spread")
        if value is None:
            return "-"
        return f"{value:.{digits}f}" + (f" (±{spread / 2:.{digits}f})" if spread else "")

    body = [
        [r["data"], r["model"], r["backbone"].replace("tf_efficientnet_", ""), str(r["size"]), str(r["runs"])]
        + [cell(r, key, digits) for key, digits in metrics]
        for r in rows
    ]
    return markdown_table(head, body)


def main(argv: list[str] | None = None) -> int:
    parser = data_parser(__doc__)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 320])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="synthetic sets (none: skip)")
    parser.add_argument("--synthetic_dir", default="backbone_table_data")
    parser.add_argument("--repeats", type=int, default=7, help="batch-1 latency repeats (median)")
    parser.add_argument("--output", default="backbones")
    args = parser.parse_args(argv)

    from aoi_lightning.data.synthetic import generate_synthetic_mvtec

    sets = [(args.category, [(args.root, args.category)], args.sizes)]
    if args.seeds:
        synthetic = []
        for seed in args.seeds:
            root = Path(args.synthetic_dir) / f"seed{seed}"
            generate_synthetic_mvtec(root, category="synthetic", image_size=args.sizes[0], seed=seed)
            synthetic.append((str(root), "synthetic"))
        sets.append(("synthetic", synthetic, args.sizes[:1]))
    raw, rows = [], []
    for data, sources, sizes in sets:
        for size in sizes:
            for model in args.models:
                for backbone in args.backbones:
                    done = []
                    for root, category in sources:
                        print(f"{data} {model} {backbone} {size} ({root}) ...", file=sys.stderr, flush=True)
                        result = run_isolated(config(model, backbone, size, root, category, args.repeats))
                        result["data"] = data
                        raw.append(result)
                        done.append(result)
                    rows.append({"data": data, "model": model, "backbone": backbone, "size": size,
                                 "runs": len(done), **summarise(done)})  # fmt: skip
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps({"rows": rows, "runs": raw}, indent=2) + "\n", encoding="utf-8")
    text = table(rows)
    output.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
