#!/usr/bin/env python
"""Latency of tiled PatchCore and PaDiM on large images: ms per image at batch 1 (median), torch and ONNX Runtime.

Each configuration runs in its own process, so that its peak RSS is its own. The input is a synthetic circuit
board (`aoi_lightning.data.synthetic_board`) at `--image_size`. The models carry fitted statistics of the size a
real fit would give, so that the timing is that of a trained model:

- PatchCore: a memory bank of round(coreset_ratio x train_images x tiles x patches per tile) rows, drawn at
  random from the patches of one board (with `search: faiss` flat and the exported matmul search, the cost
  depends on the bank's size, not on which patches it holds; the greedy coreset itself is not timed here).
- PaDiM: Gaussians fitted on the tiles of two boards (the cost of inference does not depend on the values).

    python tools/tiling_benchmark.py --image_size 2048 --tile_size 256 --tile_overlap 32 --runs 5 \
        --tile_batch 9 --configs patchcore_tiled patchcore_tiled_onnx patchcore_256 padim_tiled --output tiling.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = (
    "patchcore_tiled",  # tiles at image_size, torch (faiss search)
    "patchcore_tiled_onnx",  # the same model exported, ONNX Runtime (matmul search)
    "patchcore_whole",  # the whole image at image_size in one pass, no tiles (for the cost of the overlap)
    "patchcore_256",  # the whole image resized to the tile size (what runs without tiling)
    "padim_tiled",
    "padim_tiled_onnx",
)


def _board_input(image_size: int, size: int):
    import torch

    from aoi_lightning.data.preprocess import Preprocessing
    from aoi_lightning.data.synthetic_board import Board

    image = Board(image_size, seed=0).good("test", 0)
    return torch.from_numpy(Preprocessing((size, size)).to_model_input(image)).unsqueeze(0)


def _build(cfg: dict):
    """A model with fitted statistics of a realistic size, and its input (1, 3, S, S)."""
    import torch

    from aoi_lightning.models.padim.torch_model import PadimModel
    from aoi_lightning.models.patchcore.torch_model import PatchcoreModel

    name, size, tile = cfg["name"], cfg["image_size"], cfg["tile_size"]
    tiled = "tiled" in name
    input_size = tile if name == "patchcore_256" else size
    image = _board_input(size, input_size)
    tiling = {"tile_size": tile, "tile_overlap": cfg["tile_overlap"], "tile_batch": cfg["tile_batch"]} if tiled else {}
    torch.manual_seed(0)
    if name.startswith("padim"):
        model = PadimModel(**tiling).eval()
        train = torch.cat([_board_input(size, input_size), image])
        model.update(train)
        model.finalize()
        info = {"positions_per_tile": int(model.stats.mean.shape[1]), "channels": int(model.stats.mean.shape[0])}
        return model, image, info
    model = PatchcoreModel(coreset_ratio=cfg["coreset_ratio"], **tiling).eval()
    with torch.no_grad():
        emb = model.embed(model.tile_input(image))
    patches = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    rows = max(1, round(cfg["coreset_ratio"] * cfg["train_images"] * patches.shape[0]))
    gen = torch.Generator().manual_seed(0)
    model.memory_bank = patches[torch.randint(patches.shape[0], (rows,), generator=gen)].clone()
    model.fitted.fill_(True)
    tiles = model.tiler.num_tiles((input_size, input_size)) if tiled else 1
    return model, image, {"memory_bank_rows": rows, "patches_per_image": int(patches.shape[0]), "tiles": tiles}


def run_one(cfg: dict) -> dict:
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    model, image, info = _build(cfg)
    build_s = time.perf_counter() - start
    if cfg["name"].endswith("_onnx"):
        import onnxruntime as ort

        from aoi_lightning.export.onnx_export import export_onnx

        model.set_thresholds(1.0, 1.0)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, tuple(image.shape[-2:]), Path(tmp) / "model.onnx")
            options = ort.SessionOptions()
            if cfg.get("threads"):
                options.intra_op_num_threads = cfg["threads"]
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"image": image.numpy()}

            def call():
                session.run(None, feed)

            times = _times(call, cfg["runs"])
        embed_times = None
    else:

        def call():
            with torch.inference_mode():
                model(image)

        def embed():
            with torch.inference_mode():
                for part in model.tile_batches(image):
                    model.embed(part)

        times = _times(call, cfg["runs"])
        embed_times = _times(embed, cfg["runs"])
    return {
        **cfg,
        **info,
        "input_size": list(image.shape[-2:]),
        "ms_median": statistics.median(times) * 1000.0,
        "ms_min": min(times) * 1000.0,
        "ms_runs": [round(t * 1000.0, 1) for t in times],
        # backbone and feature assembly alone; the rest is the search (PatchCore) or Mahalanobis (PaDiM), smoothing
        # and stitching
        "ms_embed_median": statistics.median(embed_times) * 1000.0 if embed_times else None,
        "build_s": build_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch_threads": torch.get_num_threads(),
    }


def _times(call, runs: int) -> list[float]:
    call()  # warm-up: caches of the blur and blending tables, faiss index, ONNX Runtime arena
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _child(cfg: dict, queue) -> None:
    try:
        queue.put(run_one(cfg))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        queue.put({**cfg, "error": f"{type(exc).__name__}: {exc}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=2048, help="working resolution (square)")
    parser.add_argument("--tile_size", type=int, default=256)
    parser.add_argument("--tile_overlap", type=int, default=32)
    parser.add_argument("--tile_batch", type=int, default=None, help="tiles of an image per pass (default: all)")
    parser.add_argument("--coreset_ratio", type=float, default=0.01, help="PatchCore bank size as in a fit")
    parser.add_argument("--train_images", type=int, default=10, help="training images the bank stands for")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: their default)")
    parser.add_argument("--configs", nargs="+", default=["patchcore_tiled", "patchcore_256"], choices=CONFIGS)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    for name in args.configs:
        cfg = {
            "name": name,
            "image_size": args.image_size,
            "tile_size": args.tile_size,
            "tile_overlap": args.tile_overlap,
            "tile_batch": args.tile_batch,
            "coreset_ratio": args.coreset_ratio,
            "train_images": args.train_images,
            "runs": args.runs,
            "threads": args.threads,
        }
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(cfg, queue))
        proc.start()
        result = queue.get()
        proc.join()
        results.append(result)
        if "error" in result:
            print(f"{name:22s} ERROR {result['error']}", flush=True)
        else:
            print(
                f"{name:22s} input {result['input_size'][0]:>4d} px  {result['ms_median']:9.1f} ms/image (median of "
                f"{args.runs}, min {result['ms_min']:.1f})  "
                + (f"backbone {result['ms_embed_median']:7.1f} ms  " if result["ms_embed_median"] else "")
                + f"peak RSS {result['peak_rss_mb']:6.0f} MB  "
                + ", ".join(
                    f"{k} {result[k]}" for k in ("tiles", "memory_bank_rows", "positions_per_tile") if k in result
                ),
                flush=True,
            )
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
