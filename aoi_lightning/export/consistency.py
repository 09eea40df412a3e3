"""ONNX Runtime vs torch on real images: score and map errors, mask IoU at the pixel threshold, PASSED/FAILED."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from aoi_lightning.data.preprocess import Preprocessing
from aoi_lightning.fileio import sha256_of
from aoi_lightning.models.components.base import AnomalyTorchModel
from aoi_lightning.progress import phase, progress_bar

log = logging.getLogger(__name__)
T = TypeVar("T")
#: A batch of model inputs (B, 3, H, W) float in [0, 1].
Batch = torch.Tensor | np.ndarray
#: what `consistency.json` says the images were when a data set has no test image
NO_TEST_IMAGES = "training images (no test images)"

DEFAULT_SCORE_TOL = 1e-3
DEFAULT_MAP_TOL = 1e-3
DEFAULT_IOU_TOL = 0.99


class ConsistencyError(ValueError):
    """A consistency check that cannot run (no images, unreadable ONNX file, size mismatch)."""


class ConsistencyFailed(ValueError):
    """The ONNX graph does not reproduce the torch model within the tolerances (a one-line message for `aoi`)."""


def ort_session(onnx_path: str | Path, device: str = "cpu", threads: int | None = None):
    """ONNX Runtime session on CPU, or CUDA when requested and offered by the installed onnxruntime.

    Returns:
        (session, providers actually used, note: "" or why CUDA was not used).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    note = ""
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            note = "CUDAExecutionProvider not available in this onnxruntime: ran on CPU"
            log.warning(note)
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConsistencyError(f"onnxruntime cannot load {onnx_path}: {first}") from exc
    return session, session.get_providers(), note


def _batches(images: Batch | Iterable[Batch], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        for start in range(0, images.shape[0], batch_size):
            yield torch.as_tensor(images[start : start + batch_size])
    else:
        for batch in images:
            yield torch.as_tensor(batch)


def check_consistency(
    torch_model: AnomalyTorchModel,
    onnx_path: str | Path,
    images: Batch | Iterable[Batch],
    pixel_threshold: float,
    score_mae: float = DEFAULT_SCORE_TOL,
    map_mae: float = DEFAULT_MAP_TOL,
    mask_iou: float = DEFAULT_IOU_TOL,
    batch_size: int = 8,
    device: str = "cpu",
    total: int | None = None,
    failed_checks: list[str] | None = None,
    expected_sha256: str | None = None,
) -> dict:
    """Compare ONNX Runtime with the torch model image by image.

    Logs one line `consistency check: <s> s (<n> images, PASSED|FAILED)` and draws a progress bar on a terminal.

    Args:
        torch_model: the fitted model, run where it lives (its inference settings, e.g. faiss search).
        onnx_path: exported graph.
        images: model inputs (N, 3, H, W) float in [0, 1] (torch or numpy), or an iterable of such batches
            (e.g. `image_batches`).
        pixel_threshold: pixel threshold for the masks (NaN: IoU not checked). A pixel is in a mask when its map
            value is `> pixel_threshold` (the product's tie rule).
        score_mae, map_mae: largest allowed mean absolute errors; mask_iou: smallest allowed IoU. The masks are
            compared only where the decision is not a tie at the map tolerance: pixels whose torch map value lies
            within `map_mae` of the threshold (|value - threshold| <= map_mae) are left out of the IoU (counted
            in `mask_pixels_tied`), since a difference the map check allows may flip them either way. A real
            disagreement still fails: the map MAE, and the IoU over every other pixel.
        batch_size: batch size when `images` is one tensor.
        device: `cpu` or `cuda` for ONNX Runtime's execution provider.
        total: number of images, for the progress bar (None: unknown).
        failed_checks: reasons found before the comparison (a stale or edited export): the status is FAILED
            with them, in the record and in the log line alike.
        expected_sha256: the sha256 export_meta.json records for `onnx_path`; another file is a FAILED reason.

    Returns:
        The `consistency.json` record: errors, IoU, counts, providers, tolerances, status and reasons.
    """
    if total is None and isinstance(images, (torch.Tensor, np.ndarray)):
        total = int(images.shape[0])
    bar = progress_bar(total, "consistency check")
    with bar, phase("consistency check") as checked:
        session, providers, note = ort_session(onnx_path, device)
        input_name = session.get_inputs()[0].name
        output_names = [o.name for o in session.get_outputs()]
        param = next(iter(torch_model.buffers()))
        threshold = float(pixel_threshold)
        check_iou = math.isfinite(threshold)
        n = 0
        score_abs = map_abs = 0.0
        score_max = map_max = 0.0
        map_count = inter = union = torch_pixels = onnx_pixels = tied = 0
        torch_s = onnx_s = 0.0
        torch_model.eval()
        for batch in _batches(images, batch_size):
            if batch.numel() == 0:
                continue
            batch = batch.float()
            start = time.perf_counter()
            with torch.inference_mode():
                ref = torch_model(batch.to(param.device))
            ref_score = ref.pred_score.float().cpu().numpy().reshape(-1)
            ref_map = ref.anomaly_map.float().cpu().numpy()
            torch_s += time.perf_counter() - start
            start = time.perf_counter()
            raw = session.run(None, {input_name: batch.cpu().numpy().astype(np.float32)})
            outs = dict(zip(output_names, raw, strict=True))
            onnx_s += time.perf_counter() - start
            got_score = np.asarray(outs["pred_score"], dtype=np.float32).reshape(-1)
            got_map = np.asarray(outs["anomaly_map"], dtype=np.float32)
            if got_map.shape != ref_map.shape or got_score.shape != ref_score.shape:
                raise ConsistencyError(
                    f"ONNX output shapes {got_score.shape}, {got_map.shape} differ from torch's "
                    f"{ref_score.shape}, {ref_map.shape}"
                )
            d_score = np.abs(got_score.astype(np.float64) - ref_score)
            d_map = np.abs(got_map.astype(np.float64) - ref_map)
            score_abs += float(d_score.sum())
            map_abs += float(d_map.sum())
            score_max = max(score_max, float(d_score.max()))
            map_max = max(map_max, float(d_map.max()))
            map_count += d_map.size
            n += batch.shape[0]
            bar.update(batch.shape[0])
            if check_iou:
                decided = np.abs(ref_map.astype(np.float64) - threshold) > map_mae
                tied += int(decided.size - decided.sum())
                a, b = (ref_map > threshold) & decided, (got_map > threshold) & decided
                inter += int(np.logical_and(a, b).sum())
                union += int(np.logical_or(a, b).sum())
                torch_pixels += int(a.sum())
                onnx_pixels += int(b.sum())
        if n == 0:
            raise ConsistencyError("no images to compare: the test set is empty or every image failed to load")
        result = {
            "status": "PASSED",
            "reasons": list(failed_checks or []),
            "num_images": n,
            "score_mae": score_abs / n,
            "score_max_abs_error": score_max,
            "map_mae": map_abs / map_count,
            "map_max_abs_error": map_max,
            "mask_iou": (inter / union if union else 1.0) if check_iou else None,
            "pixel_threshold": threshold if check_iou else None,
            "mask_pixels_torch": torch_pixels,
            "mask_pixels_onnx": onnx_pixels,
            "mask_pixels_tied": tied if check_iou else None,
            "tolerances": {"score_mae": score_mae, "map_mae": map_mae, "mask_iou": mask_iou},
            "providers": providers,
            "torch_device": str(param.device),
            "torch_search": getattr(torch_model, "search", None),
            "onnx_path": str(onnx_path),
            "onnx_sha256": sha256_of(onnx_path),
            "seconds": {"torch": round(torch_s, 3), "onnx": round(onnx_s, 3)},
        }
        if note:
            result["note"] = note
        reasons = result["reasons"]
        if expected_sha256 and expected_sha256 != result["onnx_sha256"]:
            reasons.append("model.onnx differs from the file export_meta.json describes (sha256 mismatch)")
        # written as `not (x <= tol)` so that NaN fails
        if not result["score_mae"] <= score_mae:
            reasons.append(f"score MAE {result['score_mae']:.3g} > {score_mae:g}")
        if not result["map_mae"] <= map_mae:
            reasons.append(f"map MAE {result['map_mae']:.3g} > {map_mae:g}")
        if check_iou and not result["mask_iou"] >= mask_iou:
            reasons.append(f"mask IoU {result['mask_iou']:.4f} < {mask_iou:g}")
        if not check_iou:
            result["note"] = (note + "; " if note else "") + "no pixel threshold: mask IoU not checked"
        if reasons:
            result["status"] = "FAILED"
        checked.detail = f"{n} images, {result['status']}"
    return result


def summary_line(result: dict) -> str:
    """One line for logs and the command output."""
    iou = result.get("mask_iou")
    iou_text = "n/a" if iou is None else f"{iou:.4f}"
    text = (
        f"ONNX consistency {result['status']}: {result['num_images']} images, score MAE {result['score_mae']:.3g} "
        f"(max {result['score_max_abs_error']:.3g}), map MAE {result['map_mae']:.3g} "
        f"(max {result['map_max_abs_error']:.3g}), mask IoU {iou_text}"
    )
    if result.get("reasons"):
        text += " [" + "; ".join(result["reasons"]) + "]"
    return text


def evenly_spread(items: Sequence[T], max_images: int | None) -> list[T]:
    """All `items`, or `max_images` of them spread evenly over the list (first and last included; none for 0)."""
    if max_images is None or int(max_images) >= len(items):
        return list(items)
    count = int(max_images)
    if count <= 0:
        return []
    return [items[i] for i in sorted({round(i * (len(items) - 1) / max(count - 1, 1)) for i in range(count)})]


#: Test images the end-of-fit check uses by default (`OnnxConsistencyCheck.max_images`; null: all).
DEFAULT_SAMPLE_SIZE = 16
SAMPLE_ALL = "all"
SAMPLE_SPREAD = "evenly spread over defect types"


def spread_over_defect_types(paths: Sequence[str | Path], max_images: int | None) -> tuple[list[str], str]:
    """A representative sample of test images: all of them, or `max_images` spread over the defect types.

    The defect type of an image is the name of its folder (`test/<defect_type>/<image>`, `good` included).
    Each defect type gets its share in turn (one image per type per round, so every type is present when
    `max_images` >= the number of types; types with fewer images drop out when exhausted), and within a type the
    images are spread evenly in the given order (`evenly_spread`). The sample keeps the order of `paths`.

    Args:
        paths: image files, any order.
        max_images: largest sample size (>= 1), or None for all.

    Returns:
        (the chosen paths, `"all"` or `"evenly spread over defect types"`, the `sample` field of
        `consistency.json`).
    """
    items = [str(p) for p in paths]
    if max_images is None or int(max_images) >= len(items):
        return items, SAMPLE_ALL
    groups: dict[str, list[int]] = {}
    for index, path in enumerate(items):
        groups.setdefault(Path(path).parent.name, []).append(index)
    quota = dict.fromkeys(groups, 0)
    left = int(max_images)
    while left > 0:
        for name, members in groups.items():
            if left > 0 and quota[name] < len(members):
                quota[name] += 1
                left -= 1
    chosen = sorted(i for name, members in groups.items() for i in evenly_spread(members, quota[name]))
    return [items[i] for i in chosen], SAMPLE_SPREAD


def image_batches(
    paths: Iterable[str | Path], preprocessing: Preprocessing, batch_size: int = 8
) -> Iterator[np.ndarray]:
    """Model inputs (B, 3, H, W) float32 of image files, made by `preprocessing.load`; unreadable files are
    skipped with a warning."""
    batch: list[np.ndarray] = []
    for path in paths:
        item = preprocessing.load(path)
        if item.error:
            log.warning("consistency check skips an unreadable image: %s", item.error)
            continue
        batch.append(item.model_input)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
