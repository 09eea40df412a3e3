"""Overlay pictures for reports and comparisons: from a run's `predictions/`, or rendered from its model.

Also the ground-truth mask of an MVTec-layout image, labelled tiles and JPEG/PNG encoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from aoi_lightning.data.image_io import ImageReadError, read_image, read_image_with_size, read_mask
from aoi_lightning.data.mvtec import find_mask
from aoi_lightning.data.preprocess import Preprocessing, as_preprocessing
from aoi_lightning.fileio import read_jsonl
from aoi_lightning.postprocess.prediction import ModelFacts, OutputOptions, postprocess_prediction
from aoi_lightning.progress import progress_bar

log = logging.getLogger(__name__)

GT_COLOR = (0, 255, 255)  # BGR yellow: ground-truth outlines
LABEL_BG = (40, 40, 40)


def image_key(image_path: str | Path) -> str:
    """`<split>/<type>/<file>`: names an image of one category whatever folder the run was started from."""
    return "/".join(Path(str(image_path)).parts[-3:])


def gt_mask_path(image_path: str | Path, defect_type: str | None, mask_suffix: str = "_mask") -> Path | None:
    """Mask of `<root>/<cat>/test/<type>/<stem>.*` at `<root>/<cat>/ground_truth/<type>/<stem><suffix>.*`."""
    if not defect_type or defect_type == "good":
        return None
    path = Path(str(image_path))
    return find_mask(path.parent.parent.parent / "ground_truth" / path.parent.name, path.stem, mask_suffix)


def mask_area_fraction(mask_path: Path | None) -> float | None:
    """Share of defect pixels of a mask file (None when there is no readable mask)."""
    if mask_path is None:
        return None
    try:
        mask = read_mask(mask_path)
    except ImageReadError:
        return None
    return float(mask.mean()) if mask.size else None


def prediction_overlays(predictions_dir: Path) -> dict[str, Path]:
    """`image_key -> overlay file` of a predictions folder (`preds.jsonl` with `overlay_path`); {} when absent."""
    preds = predictions_dir / "preds.jsonl"
    if not preds.is_file():
        return {}
    out = {}
    for rec in read_jsonl(preds):
        rel = rec.get("overlay_path")
        if rel and "error" not in rec and (predictions_dir / rel).is_file():
            out[image_key(rec["image_path"])] = predictions_dir / rel
    return out


def read_bgr(path: str | Path) -> np.ndarray | None:
    """An image file as BGR uint8 (H, W, 3), None when unreadable."""
    try:
        return cv2.cvtColor(read_image(path), cv2.COLOR_RGB2BGR)
    except ImageReadError as exc:
        log.warning("%s", exc)
        return None


def overlay_of(
    image_path: str, pred_score: float, anomaly_map: np.ndarray, facts: ModelFacts, options: OutputOptions | None = None
) -> np.ndarray | None:
    """The overlay `aoi run` / `aoi predict` would draw for a prediction (`postprocess_prediction`), on the
    image read from `image_path`; None when the image cannot be read."""
    try:
        rgb, original_size = read_image_with_size(image_path)
    except ImageReadError as exc:
        log.warning("no overlay: %s", exc)
        return None
    result = postprocess_prediction(
        image_path, pred_score, anomaly_map, facts, options or OutputOptions(), original_size, image_rgb=rgb
    )
    return result.overlay


def overlays_from_maps(
    maps: dict[str, tuple[float, np.ndarray]], facts: ModelFacts, options: OutputOptions | None = None
) -> dict[str, np.ndarray]:
    """Overlays of predictions already made: `image_path -> (score, (H, W) anomaly map)` -> `image_path -> (h, w, 3)`
    BGR overlay at the original size (unreadable images left out). No forward pass."""
    out = {}
    for path, (score, amap) in maps.items():
        picture = overlay_of(path, score, amap, facts, options)
        if picture is not None:
            out[path] = picture
    return out


def render_model_overlays(
    model,
    image_paths: list[str],
    preprocessing: Preprocessing | tuple[int, int],
    device="cpu",
    pixel_threshold_mult: float = 1.0,
) -> dict[str, np.ndarray]:
    """Overlays of the given images rendered with a fitted model (the postprocessing of `aoi predict`), for runs
    whose predictions are not at hand (`aoi report`, `aoi compare --render_missing`).

    Args:
        model: fitted `AnomalyTorchModel` with thresholds.
        image_paths: image files; unreadable ones are skipped.
        preprocessing: the model's `Preprocessing` (or just its (H, W) input size for the default one).
        device: torch device of the model.
        pixel_threshold_mult: multiplier of the pixel threshold for the defect outlines.

    Returns:
        `image_path -> (h, w, 3)` BGR uint8 overlay at the original size.
    """
    import torch

    preprocessing = as_preprocessing(preprocessing)
    facts = ModelFacts.from_thresholds(
        "",
        "",
        preprocessing.image_size,
        model.image_threshold,
        model.pixel_threshold,
        resize=preprocessing.resize,
    )
    options = OutputOptions(pixel_threshold_mult=pixel_threshold_mult)
    out: dict[str, np.ndarray] = {}
    model.eval()
    with progress_bar(len(image_paths), "report overlays") as bar:
        for path in image_paths:
            bar.update(1)
            loaded = preprocessing.load(path, keep_original=True)
            if loaded.error:
                log.warning("no overlay: %s", loaded.error)
                continue
            rgb = loaded.original
            with torch.inference_mode():
                res = model(torch.from_numpy(loaded.model_input).unsqueeze(0).to(device))
            amap = res.anomaly_map[0, 0].float().cpu().numpy()
            result = postprocess_prediction(
                path, float(res.pred_score[0]), amap, facts, options, loaded.original_size, image_rgb=rgb
            )
            out[path] = result.overlay
    return out


def outline(image_bgr: np.ndarray, mask_path: Path | None, color=GT_COLOR) -> np.ndarray:
    """Copy of the image with the outline of a mask file (resized to the image) drawn in `color`."""
    out = image_bgr.copy()
    if mask_path is None:
        return out
    try:
        mask = read_mask(mask_path)
    except ImageReadError:
        return out
    h, w = out.shape[:2]
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, color, max(2, round(min(h, w) / 200)), cv2.LINE_AA)
    return out


def fit_height(image: np.ndarray, height: int) -> np.ndarray:
    """Resize to `height`, keeping the aspect ratio."""
    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if h > height else cv2.INTER_LINEAR)


def placeholder(height: int, width: int, text: str) -> np.ndarray:
    """Grey tile with a short text (a missing or unreadable picture)."""
    tile = np.full((height, width, 3), 90, np.uint8)
    for i, line in enumerate(text.split("\n")):
        cv2.putText(tile, line, (8, 24 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def labelled(image: np.ndarray, title: str, band: int = 26) -> np.ndarray:
    """The image with a dark title band on top (the title shortened to fit)."""
    h, w = image.shape[:2]
    out = np.full((h + band, w, 3), LABEL_BG, np.uint8)
    out[band:] = image
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    while len(title) > 4 and cv2.getTextSize(title, font, scale, 1)[0][0] > w - 8:
        title = title[:-4] + "..."
    cv2.putText(out, title, (4, band - 8), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def hstack(tiles: list[np.ndarray], gap: int = 6) -> np.ndarray:
    """Tiles of equal height side by side with white gaps."""
    height = max(t.shape[0] for t in tiles)
    parts = []
    for i, tile in enumerate(tiles):
        if tile.shape[0] != height:
            pad = np.full((height - tile.shape[0], tile.shape[1], 3), 255, np.uint8)
            tile = np.vstack([tile, pad])
        if i:
            parts.append(np.full((height, gap, 3), 255, np.uint8))
        parts.append(tile)
    return np.hstack(parts)


def encode(image: np.ndarray, fmt: str = ".jpg", quality: int = 85) -> bytes:
    """Encode a BGR uint8 picture (`.jpg` or `.png`)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else []
    ok, data = cv2.imencode(fmt, image, params)
    if not ok:
        raise ValueError(f"cannot encode {fmt}")
    return data.tobytes()
