"""`aoi watch`: a hot folder; each new image is judged once it is complete, with the outputs of `aoi run`."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Literal

from aoi_lightning.fileio import check_output_dir, is_same_or_above
from aoi_lightning.inference.folder import load_predictor
from aoi_lightning.postprocess.outputs import PREDS_FILE, REPORT_JSON, OutputOptions
from aoi_lightning.watch.hotfolder import HotFolder, WatchOptions

log = logging.getLogger(__name__)


class WatchError(ValueError):
    """A wrong argument of `aoi watch` (missing folder, bad value); the message is one line."""


def watch(
    model_dir: str,
    input_dir: str,
    output_dir: str,
    backend: Literal["torch", "onnx", "openvino"] = "torch",
    done_dir: str | None = None,
    error_dir: str | None = None,
    polling: bool = False,
    poll_interval: float = 1.0,
    settle_seconds: float = 2.0,
    recursive: bool = False,
    batch_size: int = 8,
    device: Literal["cpu", "cuda", "auto"] = "auto",
    pixel_threshold_mult: float = 1.0,
    min_defect_area: int = 0,
    save_masks: bool = True,
    save_overlays: bool = True,
    report_seconds: float = 5.0,
    max_idle_seconds: float | None = None,
) -> int:
    """Watch a folder and judge each new image OK/NG once it is complete (a hot folder).

    Writes what `aoi run` writes into OUTPUT_DIR: preds.jsonl (one line per image, with the file's size and
    mtime), masks/, overlays/ and report.json (rewritten atomically as files come in). Images already in the
    folder are processed first. A file is taken once its size and modification time have not changed for
    `settle_seconds` and it decodes; a stopped and restarted watcher continues from preds.jsonl without
    repeating or skipping a file. Stops cleanly on Ctrl-C or SIGTERM.

    Args:
        model_dir: trained run directory (the onnx backend also takes a folder holding model.onnx and
            export_meta.json).
        input_dir: the watched folder.
        output_dir: folder for the results (created; an earlier watcher's results are continued).
        backend: torch: weights/model.ckpt; onnx: export/model.onnx with ONNX Runtime; openvino: export/model.onnx
            with the OpenVINO runtime (the last two need no torch).
        done_dir: move each processed image here (a free name such as part-1.png when the name is taken).
        error_dir: move unreadable files here (default DONE_DIR/errors; without either they stay).
        polling: poll the folder instead of waiting for file system events; use it on network shares.
        poll_interval: seconds between two polls with polling.
        settle_seconds: a file is complete when its size and mtime stayed unchanged this long; on a network
            share use more than the client's attribute cache time.
        recursive: also watch subfolders (the output, done and error folders are left out).
        batch_size: images per forward pass.
        device: where the model runs (auto: cuda when available).
        pixel_threshold_mult: multiplier of the pixel threshold: < 1 finds more and larger defects.
        min_defect_area: drop defects smaller than this many pixels at the model's resolution.
        save_masks: write masks/*.png.
        save_overlays: write overlays/*.png.
        report_seconds: rewrite report.json at most this often while files keep coming (and whenever idle).
        max_idle_seconds: exit after this many seconds with nothing to do (default: run until stopped).

    Returns:
        0 after a clean stop.

    Raises:
        WatchError: a missing folder or an invalid value.
    """
    inp = Path(input_dir).expanduser()
    if not inp.is_dir():
        raise WatchError(f"--input_dir: folder not found: {input_dir}")
    if not Path(model_dir).expanduser().is_dir():
        raise WatchError(f"--model_dir: run directory not found: {model_dir}")
    try:
        output_options = OutputOptions(
            pixel_threshold_mult=pixel_threshold_mult,
            min_defect_area=min_defect_area,
            save_masks=save_masks,
            save_overlays=save_overlays,
        )
        options = WatchOptions(
            settle_seconds=settle_seconds,
            polling=polling,
            poll_interval=poll_interval,
            recursive=recursive,
            batch_size=batch_size,
            report_seconds=report_seconds,
            max_idle_seconds=max_idle_seconds,
        )
    except ValueError as exc:
        raise WatchError(f"--{exc}") from exc
    for option, folder in (("output_dir", output_dir), ("done_dir", done_dir), ("error_dir", error_dir)):
        if folder is not None:
            check_output_dir(folder, option)
            if is_same_or_above(folder, inp):
                raise WatchError(
                    f"--{option} {folder} is --input_dir or holds it: the watcher leaves that folder out, so no "
                    "image would ever be inspected; choose another folder (a subfolder of --input_dir is fine)"
                )
    predictor = load_predictor(backend, model_dir, device)
    try:
        hot = HotFolder(predictor, inp, output_dir, output_options, done_dir, error_dir, options)
    except ValueError as exc:
        raise WatchError(str(exc)) from exc
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():

        def _stop(signum, _frame) -> None:
            log.info("%s: finishing the current batch and stopping", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _stop)
    try:
        report = hot.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out = Path(output_dir)
    print(
        f"aoi watch: {hot.processed} files processed in this session; in all {report['num_images']} images judged "
        f"({report['num_ok']} OK, {report['num_ng']} NG) and {report['num_errors']} unreadable files -> "
        f"{out / PREDS_FILE}, {out / REPORT_JSON}"
    )
    return 0
