"""Pictures of a prediction: heat-map overlay with defect outlines and the OK/NG verdict, binary mask PNGs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from aoi_lightning.fileio import write_bytes_atomic
from aoi_lightning.postprocess.defects import SOURCE_PEAK, scale_bbox
from aoi_lightning.postprocess.records import is_ng

OK_COLOR = (0, 200, 0)  # BGR
NG_COLOR = (0, 0, 255)
CONTOUR_COLOR = (255, 255, 255)
BOX_COLOR = (255, 0, 255)  # magenta: a defect found by the pixel threshold
PEAK_BOX_COLOR = (0, 165, 255)  # orange: the region around the map's peak of an NG image
HEAT_ALPHA = 0.45


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Encode (H, W) or (H, W, 3) BGR uint8 as PNG and write it atomically (works with non-ASCII paths)."""
    path = Path(path)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cannot encode PNG for {path}")
    return write_bytes_atomic(path, data.tobytes(), durable=False)


def save_mask_png(mask: np.ndarray, original_size: tuple[int, int], path: str | Path) -> Path:
    """Save a (H, W) binary mask as a 0/255 PNG at the original size (h, w), nearest-neighbour resize."""
    h, w = int(original_size[0]), int(original_size[1])
    out = (np.asarray(mask) > 0).astype(np.uint8) * 255
    if out.shape != (h, w):
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_NEAREST)
    return write_png(path, out)


def heat_colors(anomaly_map: np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """JET colours (h, w, 3) BGR of a (H, W) map on a fixed scale tied to the threshold.

    The scale runs from 0 to max(2 x threshold, map maximum): the threshold sits at the middle (green) or
    below, so images are comparable with each other and a good part stays blue; values at or above twice
    the threshold are red.
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    finite = np.isfinite(amap)
    top = float(amap[finite].max()) if finite.any() else 0.0
    high = max(2.0 * float(threshold), top)
    if not np.isfinite(high) or high <= 0.0:
        high = 1.0
    norm = np.clip(np.nan_to_num(amap, nan=0.0, posinf=high, neginf=0.0) / high, 0.0, 1.0)
    h, w = size
    if norm.shape != (h, w):
        norm = cv2.resize(norm, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.applyColorMap((norm * 255.0).astype(np.uint8), cv2.COLORMAP_JET)


def render_overlay(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray,
    defects: list[dict],
    pred_score: float,
    image_threshold: float,
    pixel_threshold: float,
) -> np.ndarray:
    """Overlay picture at the size of `image_rgb` (the original image, or its reduced decoding when very large).

    Args:
        image_rgb: (h, w, 3) uint8 original image.
        anomaly_map: (H, W) anomaly map at the model's resolution.
        mask: (H, W) binary defect mask at the model's resolution.
        defects: defect dicts of the postprocessing (their model-resolution `bbox` boxes are drawn, mapped onto
            the picture; the same boxes as `bbox_original` when the picture has the original size); an OK
            image has none.
        pred_score: image score; NG when `pred_score > image_threshold`.
        image_threshold: image threshold.
        pixel_threshold: effective pixel threshold (colour scale, see `heat_colors`).

    Returns:
        (h, w, 3) BGR uint8: heat map blended on the image, white defect outlines, magenta boxes (orange for a
        region found around the map's peak, `source` "peak"), and
        "OK"/"NG" with the score and threshold in green/red at the top left.
    """
    h, w = image_rgb.shape[:2]
    base = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(base, 1.0 - HEAT_ALPHA, heat_colors(anomaly_map, pixel_threshold, (h, w)), HEAT_ALPHA, 0.0)
    line = max(1, round(min(h, w) / 256))
    big_mask = (np.asarray(mask) > 0).astype(np.uint8)
    if big_mask.shape != (h, w):
        big_mask = cv2.resize(big_mask, (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, CONTOUR_COLOR, line, cv2.LINE_AA)
    grid = np.asarray(anomaly_map).shape[-2:]
    for d in defects:
        x0, y0, x1, y1 = scale_bbox(d["bbox"], grid, (h, w))
        color = PEAK_BOX_COLOR if d.get("source") == SOURCE_PEAK else BOX_COLOR
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), color, line)

    ng = is_ng(pred_score, image_threshold)
    text = f"{'NG' if ng else 'OK'}  score {pred_score:.4g} / thr {image_threshold:.4g}"
    scale = max(0.4, min(h, w) / 640)
    thick = max(1, round(scale * 2))
    (tw, th), base_line = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(3, th // 3)
    cv2.rectangle(out, (0, 0), (min(w - 1, tw + 2 * pad), th + base_line + 2 * pad), (0, 0, 0), -1)
    cv2.putText(
        out, text, (pad, th + pad), cv2.FONT_HERSHEY_SIMPLEX, scale, NG_COLOR if ng else OK_COLOR, thick, cv2.LINE_AA
    )
    return out
