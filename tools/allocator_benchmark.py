#!/usr/bin/env python
"""The backbone forward on CPU with glibc's default allocator settings against the ones `aoi` sets
(`aoi_lightning.allocator`: freed memory kept for reuse): ms per image and minor page faults per image.

Each measurement is a fresh process (the settings apply to a whole process), the two settings alternate round by
round so that load drifts hit both alike, and the table gives the median over rounds. Random input images: the
cost measured is the allocator's, not the data's.

    python tools/allocator_benchmark.py --batch_sizes 1 8 32 --rounds 5 --output tools/results/allocator

Whole commands: `AOI_SYSTEM_ALLOCATOR=1 python tools/profile_commands.py ...` gives the phase tables with glibc's
defaults, to set beside the same command without the variable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table  # noqa: E402

SETTINGS = {"glibc defaults": {"AOI_SYSTEM_ALLOCATOR": "1"}, "aoi (freed memory kept)": {"AOI_SYSTEM_ALLOCATOR": "0"}}


def measure(backbone: str, layers: list[str], image_size: int, batch_sizes: list[int], images: int) -> dict:
    """In this process: {batch size: (median ms per image, minor page faults per image)} of the forward."""
    import resource
    import time

    import torch

    from aoi_lightning.allocator import keep_freed_memory
    from aoi_lightning.models.components.feature_extractor import FeatureExtractor

    applied = keep_freed_memory()
    extractor = FeatureExtractor(backbone, layers, weights="none")
    out = {"applied": applied}
    with torch.no_grad():
        for batch in batch_sizes:
            x = torch.rand(batch, 3, image_size, image_size)
            extractor(x)  # first call: kernel choices and the first allocations
            times = []
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            calls = max(3, images // batch)
            for _ in range(calls):
                start = time.perf_counter()
                extractor(x)
                times.append(time.perf_counter() - start)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            out[str(batch)] = (1000.0 * statistics.median(times) / batch, faults / (calls * batch))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.1", "blocks.2", "blocks.4"])
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--images", type=int, default=64, help="images per batch size and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="allocator", help="writes OUTPUT.json and OUTPUT.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.backbone, args.layers, args.image_size, args.batch_sizes, args.images)))
        return 0
    child = [sys.executable, __file__, "--child", "--backbone", args.backbone, "--layers", *args.layers,
             "--image_size", str(args.image_size), "--images", str(args.images),
             "--batch_sizes", *map(str, args.batch_sizes)]  # fmt: skip
    samples: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        for name, env in SETTINGS.items():
            print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            done = subprocess.run(child, env={**os.environ, **env}, capture_output=True, text=True, check=True)
            samples[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows, cells = [], []
    for batch in map(str, args.batch_sizes):
        row = {"batch": int(batch)}
        for name in SETTINGS:
            row[f"{name} ms/image"] = statistics.median(s[batch][0] for s in samples[name])
            row[f"{name} faults/image"] = statistics.median(s[batch][1] for s in samples[name])
        default, kept = (row[f"{name} ms/image"] for name in SETTINGS)
        row["speed-up"] = default / kept
        rows.append(row)
        cells.append([batch, *(f"{row[f'{n} ms/image']:.1f}" for n in SETTINGS),
                      *(f"{row[f'{n} faults/image']:.0f}" for n in SETTINGS), f"{row['speed-up']:.2f}x"])  # fmt: skip
    header = ["batch", *(f"{n}: ms/image" for n in SETTINGS), *(f"{n}: page faults/image" for n in SETTINGS),
              "speed-up"]  # fmt: skip
    text = (
        f"{args.backbone} forward ({', '.join(args.layers)}), {args.image_size} px, random weights and images, "
        f"median of {args.rounds} alternating rounds, a fresh process each:\n\n" + markdown_table(header, cells)
    )
    applied = all(s["applied"] for s in samples["aoi (freed memory kept)"])
    if not applied:
        text += "\n\nThe settings did not apply on this system (not glibc): both columns are glibc's defaults."
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({"rows": rows, "applied": applied}, indent=2) + "\n")
    output.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
