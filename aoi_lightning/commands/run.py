"""`aoi run`: OK/NG, defect masks, overlays, preds.jsonl and report.json for a folder of images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aoi_lightning.data.image_io import list_images
from aoi_lightning.inference.folder import load_predictor, run_folder
from aoi_lightning.postprocess.outputs import PREDS_FILE, REPORT_JSON, OutputOptions

log = logging.getLogger(__name__)


class RunnerError(ValueError):
    """A wrong argument of `aoi run` (missing folder, bad value); the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aoi run",
        description="Judge every image of a folder OK/NG with a trained run and locate its defects. Writes "
        "OUTPUT_DIR/preds.jsonl (one line per image, an `error` line for unreadable files), masks/, overlays/ "
        "and report.json.",
    )
    parser.add_argument(
        "--model_dir", required=True, help="trained run directory (holds config.yaml and weights/model.ckpt)"
    )
    parser.add_argument("--input_dir", required=True, help="folder of images (png, jpg, bmp, tif, webp)")
    parser.add_argument("--output_dir", required=True, help="folder for the results (created)")
    parser.add_argument("--recursive", action="store_true", help="also take images from subfolders")
    parser.add_argument(
        "--pixel_threshold_mult",
        type=float,
        default=1.0,
        help="multiplier of the pixel threshold: < 1 finds more and larger defects (default 1.0)",
    )
    parser.add_argument(
        "--min_defect_area",
        type=int,
        default=0,
        help="drop defects smaller than this many pixels at the model's resolution (default 0)",
    )
    parser.add_argument("--no_save_masks", action="store_true", help="do not write masks/*.png")
    parser.add_argument("--no_save_overlays", action="store_true", help="do not write overlays/*.png")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where the model runs (default auto: cuda when available)",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx", "openvino"),
        default="torch",
        help="torch: weights/model.ckpt; onnx: export/model.onnx with ONNX Runtime only (no torch needed)",
    )
    parser.add_argument("--num_workers", type=int, default=0, help="image decoding threads (default 0: main thread)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in OUTPUT_DIR: keep its complete lines, predict only the other images",
    )
    return parser


def collect_images(input_dir: Path, output_dir: Path, recursive: bool) -> list[Path]:
    """Images of `input_dir` (sorted), leaving out anything inside `output_dir` (earlier results)."""
    out = output_dir.resolve()
    return [p for p in list_images(input_dir, recursive) if not p.resolve().is_relative_to(out)]


def main(argv: list[str]) -> int:
    """Entry point of `aoi run`; user errors raise `RunnerError` (printed as one line by `aoi`)."""
    args = build_parser().parse_args(argv)
    input_dir = Path(args.input_dir).expanduser()
    output_dir = Path(args.output_dir).expanduser()
    if not input_dir.is_dir():
        raise RunnerError(f"--input_dir: folder not found: {input_dir}")
    if not Path(args.model_dir).expanduser().is_dir():
        raise RunnerError(f"--model_dir: run directory not found: {args.model_dir}")
    if args.batch_size < 1 or args.num_workers < 0:
        raise RunnerError("--batch_size must be >= 1 and --num_workers >= 0")
    try:
        options = OutputOptions(
            pixel_threshold_mult=args.pixel_threshold_mult,
            min_defect_area=args.min_defect_area,
            save_masks=not args.no_save_masks,
            save_overlays=not args.no_save_overlays,
        )
    except ValueError as exc:
        raise RunnerError(f"--{exc}") from exc
    predictor = load_predictor(args.backend, args.model_dir, args.device)
    input_root = input_dir.resolve()
    paths = collect_images(input_root, output_dir, args.recursive)
    if not paths:
        log.warning("no images in %s%s", input_dir, "" if args.recursive else " (use --recursive for subfolders)")
    report = run_folder(
        predictor,
        paths,
        output_dir,
        options,
        input_root=input_root,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        resume=args.resume,
    )
    print(
        f"aoi run: {report['num_images']} images ({report['num_ok']} OK, {report['num_ng']} NG), "
        f"{report['num_errors']} errors, {report['images_per_second']:.1f} images/s -> "
        f"{output_dir / PREDS_FILE}, {output_dir / REPORT_JSON}"
    )
    return 0
