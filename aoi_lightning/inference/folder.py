"""The folder runner behind `aoi run`: a trained model over a list of images, results written with the shared
output code.

The model is behind a small `Predictor` interface (`predict(images) -> (scores, maps)` plus the facts of the
model); the back ends (`torch_backend`, `onnx_backend`) implement it and `load_predictor` picks one.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from aoi_lightning.allocator import frozen_after_startup
from aoi_lightning.data.preprocess import LoadedImage, Preprocessing, as_preprocessing
from aoi_lightning.fileio import read_jsonl
from aoi_lightning.postprocess.outputs import (
    ModelFacts,
    OutputOptions,
    PredictionOutputs,
    finish_outputs,
    output_settings,
)

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """A loaded model: its facts (name, category, input size, thresholds), how its input is made, run id, and the
    forward pass."""

    facts: ModelFacts
    preprocessing: Preprocessing
    run_id: str

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, H, W) float32 in [0, 1] -> scores (B,) and anomaly maps (B, H, W), float32."""
        ...


def load_image(path: Path, preprocessing: Preprocessing | tuple[int, int], keep_original: bool) -> LoadedImage:
    """`Preprocessing.load` (a size stands for the default preprocessing at that size)."""
    return as_preprocessing(preprocessing).load(path, keep_original)


def iter_batches(
    paths: Sequence[Path],
    batch_size: int,
    preprocessing: Preprocessing | tuple[int, int],
    keep_original: bool,
    executor: Executor | None,
) -> Iterator[list[LoadedImage]]:
    """Batches of decoded images (`Preprocessing.load`); with an executor the next batch is decoded while the
    current one runs."""
    preprocessing = as_preprocessing(preprocessing)

    def submit(chunk: Sequence[Path]) -> list[Future] | list[LoadedImage]:
        if executor is None:
            return [preprocessing.load(p, keep_original) for p in chunk]
        return [executor.submit(preprocessing.load, p, keep_original) for p in chunk]

    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    pending = submit(chunks[0]) if chunks else []
    for k in range(len(chunks)):
        current = pending
        pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
        yield [item.result() if isinstance(item, Future) else item for item in current]


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with lightning
        return None
    return tqdm(total=total, unit="img", desc="aoi run", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def run_folder(
    predictor: Predictor,
    paths: Sequence[Path],
    output_dir: str | Path,
    options: OutputOptions,
    input_root: str | Path | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Predict `paths` and write `preds.jsonl` (one flushed line per image), masks, overlays and `report.json`.

    Args:
        predictor: the model.
        paths: image files, in output order.
        output_dir: output folder.
        options: what to write (pixel threshold multiplier, minimum defect area, masks, overlays).
        input_root: folder the output file names are relative to.
        batch_size: images per forward pass.
        num_workers: decoding threads (0: decode in the main thread). Post-processing and file writing always
            run on one writer thread, in input order, overlapping the next batch.
        progress: show a progress bar.
        resume: keep the complete lines of an interrupted run in `output_dir` and predict only the rest.
        overwrite: first remove the results of an earlier run in `output_dir` (`outputs.clear_results`).

    Returns:
        the report (also written to `report.json`), with `images_per_second` of the whole loop added.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    facts = predictor.facts
    outputs = PredictionOutputs(output_dir, facts, options, input_root)
    outputs.open(resume, output_settings(facts, options, predictor.run_id, input_root), overwrite)
    todo = [p for p in paths if str(p) not in outputs.done]
    if outputs.done:
        log.info("resuming: %d images already in %s, %d to go", len(paths) - len(todo), outputs.jsonl_path, len(todo))
    if todo:  # first-call work (kernel choices, lazy indexes) before the clock and the bar's first rate
        h, w = facts.input_size
        try:
            predictor.predict(np.zeros((1, 3, h, w), np.float32))
        except BaseException:
            outputs.close()
            raise
    bar = _progress(len(todo), progress and len(todo) > 0)
    start = time.perf_counter()
    executor = ThreadPoolExecutor(max_workers=num_workers) if num_workers > 0 else None
    # post-processing and files (PNG encoding above all) run on one writer thread, in input order, while the
    # next batch is decoded and predicted; at most two batches of maps wait for it
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aoi-writer")
    in_flight: list[Future] = []
    failed: list[BaseException] = []

    def write(method, *args, **kwargs) -> None:
        if failed:  # after a failed write nothing more is written: the lines stay a prefix of the input order
            return
        try:
            method(*args, **kwargs)
        except BaseException as exc:
            failed.append(exc)
            raise

    def drain(futures: list[Future]) -> None:
        for future in futures:
            future.result()  # re-raises a writer error here
            if bar is not None:
                bar.update(1)

    try:
        with outputs:
            for batch in iter_batches(todo, batch_size, predictor.preprocessing, options.save_overlays, executor):
                good = [item for item in batch if not item.error]
                scores = maps = None
                if good:
                    scores, maps = predictor.predict(np.stack([item.model_input for item in good]))
                submitted, j = [], 0
                for item in batch:
                    if item.error:
                        submitted.append(writer.submit(write, outputs.write_error, str(item.path), item.error))
                    else:
                        submitted.append(
                            writer.submit(
                                write,
                                outputs.write,
                                str(item.path),
                                float(scores[j]),
                                maps[j],
                                item.original_size,
                                image_rgb=item.original,
                            )
                        )
                        j += 1
                drain(in_flight)
                in_flight = submitted
            drain(in_flight)
            in_flight = []
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    records = read_jsonl(outputs.jsonl_path)
    report = finish_outputs(output_dir, records, facts, predictor.run_id)
    report["images_per_second"] = len(todo) / elapsed if elapsed > 0 and todo else 0.0
    return report


#: Inference back ends of `aoi run`, `aoi serve` and `aoi watch`.
BACKENDS = ("torch", "onnx", "openvino")


def load_predictor(backend: str, model_dir: str | Path, device: str = "auto", spin_wait: bool = False) -> Predictor:
    """The model of a run directory behind `backend`: `torch` (weights/model.ckpt), `onnx` (export/model.onnx in
    ONNX Runtime) or `openvino` (export/model.onnx in the OpenVINO runtime); the last two never import torch.
    The runtime's imports and the loaded model are kept out of later garbage collections
    (`allocator.frozen_after_startup`). `spin_wait`: ONNX Runtime's busy-waiting threads (`OnnxPredictor.from_run`;
    the other back ends ignore it)."""
    with frozen_after_startup():
        return _load_predictor(backend, model_dir, device, spin_wait)


def _load_predictor(backend: str, model_dir: str | Path, device: str, spin_wait: bool) -> Predictor:
    if backend == "onnx":
        from aoi_lightning.inference.onnx_backend import OnnxPredictor

        return OnnxPredictor.from_run(model_dir, device, spin_wait=spin_wait)
    if backend == "openvino":
        from aoi_lightning.inference.openvino_backend import OpenVinoPredictor

        return OpenVinoPredictor.from_run(model_dir, device)
    if backend != "torch":
        raise ValueError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    from aoi_lightning.inference.torch_backend import TorchPredictor, resolve_device

    return TorchPredictor.from_run(model_dir, resolve_device(device))
