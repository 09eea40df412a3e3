"""`aoi run`: OK/NG, defect masks, overlays, preds.jsonl and report.json for a folder of images."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal

from aoi_lightning.data.image_io import IMAGE_EXTENSIONS, list_images
from aoi_lightning.fileio import check_output_dir, is_same_or_above
from aoi_lightning.inference.folder import load_predictor, run_folder
from aoi_lightning.postprocess.outputs import PREDS_FILE, REPORT_JSON, OutputOptions, holds_results

log = logging.getLogger(__name__)

#: Exit status of `aoi run` when every file was unreadable (error lines only): nothing was inspected.
NOTHING_INSPECTED = 3


class RunnerError(ValueError):
    """A wrong argument of `aoi run` (missing folder, bad value); the message is one line."""


def collect_images(input_dir: Path, output_dir: Path, recursive: bool) -> list[Path]:
    """Images of `input_dir` (sorted; with `recursive` those of its subfolders too), leaving out anything inside
    `output_dir` (earlier results)."""
    out = output_dir.resolve()

    def inside_output(path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(out)
        except (OSError, RuntimeError):  # a symbolic-link loop: kept, and judged as an unreadable file
            return path.parent.resolve().is_relative_to(out)

    return [p for p in list_images(input_dir, recursive) if not inside_output(p)]


def no_images_message(input_dir: Path, output_dir: Path, recursive: bool) -> str:
    """One line for a folder without images: which extensions count, and where images are when only in subfolders."""
    kinds = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    if recursive:
        return f"--input_dir: no images ({kinds}) in {input_dir} or its subfolders"
    below = len(collect_images(input_dir, output_dir, True))
    where = f"; {below} in its subfolders (leave out --recursive false)" if below else ""
    return f"--input_dir: no images ({kinds}) at the top level of {input_dir}{where}"


def run(
    model_dir: str,
    input_dir: str,
    output_dir: str,
    recursive: bool = True,
    pixel_threshold_mult: float = 1.0,
    min_defect_area: int = 0,
    no_save_masks: bool = False,
    no_save_overlays: bool = False,
    batch_size: int = 8,
    device: Literal["cpu", "cuda", "auto"] = "auto",
    backend: Literal["torch", "onnx", "openvino"] = "torch",
    num_workers: int = 1,
    no_progress: bool = False,
    resume: bool = False,
    overwrite: bool = False,
) -> int:
    """Judge every image of a folder OK/NG with a trained run and locate its defects.

    Writes OUTPUT_DIR/preds.jsonl (one line per image, an `error` line for unreadable files), masks/, overlays/
    and report.json, and prints a summary line. A folder without images is an error (exit 2, nothing written).

    Args:
        model_dir: trained run directory (holds config.yaml and weights/model.ckpt; export/ for --backend onnx).
        input_dir: folder of images (png, jpg, jpeg, bmp, tif, tiff, webp), subfolders included.
        output_dir: folder for the results (created).
        recursive: also take images from subfolders (`--recursive false`: only the top level of INPUT_DIR).
        pixel_threshold_mult: multiplier of the pixel threshold: < 1 finds more and larger defects.
        min_defect_area: drop defects smaller than this many pixels at the model's resolution.
        no_save_masks: do not write masks/*.png.
        no_save_overlays: do not write overlays/*.png.
        batch_size: images per forward pass (>= 1).
        device: where the model runs (auto: cuda when available).
        backend: torch: weights/model.ckpt; onnx: export/model.onnx with ONNX Runtime; openvino: export/model.onnx
            in the OpenVINO runtime (onnx and openvino need no torch).
        num_workers: image decoding threads that decode the next batch while the model runs (0: the main thread).
        no_progress: no progress bar.
        resume: continue an interrupted run in OUTPUT_DIR: keep its complete lines, predict only the other images.
        overwrite: replace the results already in OUTPUT_DIR (preds.jsonl, report.json, settings.json and the
            PNGs of masks/ and overlays/). Without --resume or --overwrite a folder holding results is refused.

    Returns:
        0 when at least one image was judged (unreadable files are error lines); 3 when none could be read.

    Raises:
        RunnerError: missing folder, no images in the folder, a value out of range (one line).
    """
    inputs = Path(input_dir).expanduser()
    outputs = Path(output_dir).expanduser()
    if not inputs.is_dir():
        raise RunnerError(f"--input_dir: folder not found: {inputs}")
    model_path = Path(model_dir).expanduser()
    if model_path.is_file():
        raise RunnerError(f"--model_dir: {model_dir} is a file; give the run directory that holds it")
    if not model_path.is_dir():
        raise RunnerError(f"--model_dir: run directory not found: {model_dir}")
    if batch_size < 1:
        raise RunnerError(f"--batch_size must be >= 1, got {batch_size}")
    if resume and overwrite:
        raise RunnerError("--resume keeps the results in --output_dir and --overwrite replaces them: give one")
    if not (resume or overwrite) and holds_results(outputs):
        raise RunnerError(
            f"--output_dir {outputs} already holds results ({PREDS_FILE}): add --resume to continue them, "
            "--overwrite to replace them, or choose another folder"
        )
    if num_workers < 0:
        raise RunnerError(f"--num_workers must be >= 0, got {num_workers}")
    try:
        options = OutputOptions(
            pixel_threshold_mult=pixel_threshold_mult,
            min_defect_area=min_defect_area,
            save_masks=not no_save_masks,
            save_overlays=not no_save_overlays,
        )
    except ValueError as exc:
        raise RunnerError(f"--{exc}") from exc
    input_root = inputs.resolve()
    if is_same_or_above(outputs, input_root):
        raise RunnerError(
            f"--output_dir {outputs} is --input_dir or holds it: its images would be left out as earlier results; "
            "choose another --output_dir (a subfolder of --input_dir is fine)"
        )
    paths = collect_images(input_root, outputs, recursive)
    if not paths:
        raise RunnerError(no_images_message(input_root, outputs, recursive))
    check_output_dir(outputs)
    predictor = load_predictor(backend, model_dir, device)
    try:
        report = run_folder(
            predictor,
            paths,
            outputs,
            options,
            input_root=input_root,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=not no_progress,
            resume=resume,
            overwrite=overwrite,
        )
    except OSError as exc:  # e.g. a full disk: say where; the complete lines written so far stay
        where = exc.filename or outputs
        raise RunnerError(f"cannot write {where}: {exc.strerror or exc} (the lines written so far are kept)") from exc
    speed = (
        f", {report['images_per_second']:.1f} images/s" if report["num_images"] and report["images_per_second"] else ""
    )
    print(
        f"aoi run: {report['num_images']} images ({report['num_ok']} OK, {report['num_ng']} NG), "
        f"{report['num_errors']} errors{speed} -> {outputs / PREDS_FILE}, {outputs / REPORT_JSON}"
    )
    if report["num_images"] == 0:
        print(
            f"aoi run: no image could be read ({report['num_errors']} errors): nothing was inspected", file=sys.stderr
        )
        return NOTHING_INSPECTED
    return 0
