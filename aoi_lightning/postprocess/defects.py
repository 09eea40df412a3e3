"""Defects of one image: binarise the anomaly map, 8-connected components, geometry in two resolutions."""

from __future__ import annotations

import math

import cv2
import numpy as np


def _component_values(labels: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-label max and mean of `values` for labels 1..n-1 (every label has at least one pixel)."""
    inside = labels > 0
    lab = labels[inside]
    val = values[inside].astype(np.float64)
    order = np.argsort(lab, kind="stable")
    lab, val = lab[order], val[order]
    starts = np.searchsorted(lab, np.arange(1, n))
    maxima = np.maximum.reduceat(val, starts) if len(starts) else np.zeros(0)
    sums = np.bincount(lab, weights=val, minlength=n)[1:]
    counts = np.bincount(lab, minlength=n)[1:]
    return maxima, sums / np.maximum(counts, 1)


def scale_bbox(bbox: list[int], size: tuple[int, int], to_size: tuple[int, int]) -> list[int]:
    """An inclusive pixel box [x_min, y_min, x_max, y_max] of an (H, W) grid mapped onto an (h, w) grid so that
    it covers the same pixel edges: [floor(x_min * sx), floor(y_min * sy), ceil((x_max + 1) * sx) - 1, ...],
    clipped; exact integer arithmetic."""
    height, width = int(size[0]), int(size[1])
    oh, ow = int(to_size[0]), int(to_size[1])
    return [
        min(bbox[0] * ow // width, ow - 1),
        min(bbox[1] * oh // height, oh - 1),
        max(min(-(-(bbox[2] + 1) * ow // width) - 1, ow - 1), 0),
        max(min(-(-(bbox[3] + 1) * oh // height) - 1, oh - 1), 0),
    ]


#: `source` of a defect found by binarising the anomaly map at the effective pixel threshold.
SOURCE_PIXEL_THRESHOLD = "pixel_threshold"
#: `source` of the region located around the anomaly map's peak (see `peak_region`).
SOURCE_PEAK = "peak"
#: The peak region holds the pixels at or above this fraction of the way from the map's minimum to its peak.
PEAK_FRACTION = 0.5


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be (H, W), got shape {amap.shape}")
    return amap


def extract_defects(
    anomaly_map: np.ndarray,
    pixel_threshold: float,
    mult: float = 1.0,
    min_defect_area: int = 0,
    original_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Binary defect mask and one record per defect of an anomaly map, by the pixel threshold alone.

    A pixel is defective when `map > pixel_threshold * mult` (strict: a threshold taken from an observed
    value never flags it). Defects are the 8-connected components of that mask with at least
    `min_defect_area` pixels (smaller ones are removed from the mask too), numbered 1..n by decreasing area,
    then top-to-bottom, then left-to-right. Each has `source` "pixel_threshold".

    This is the location rule only; the verdict-aware postprocessing of an image (an NG image always has a
    region, an OK image none) is `aoi_lightning.postprocess.prediction.postprocess_prediction`.

    Geometry in the model's resolution (H, W): `area` (pixels), `bbox` [x_min, y_min, x_max, y_max]
    (inclusive pixel indices), `centroid` [x, y] (mean pixel index). In the original image's resolution
    (h, w), with sx = w / W and sy = h / H: `area_original` = round(area * sx * sy), `bbox_original` covers
    the same pixel edges ([floor(x_min * sx), floor(y_min * sy), ceil((x_max + 1) * sx) - 1, ...], clipped),
    `centroid_original` maps pixel centres ((x + 0.5) * sx - 0.5). Without `original_size` the original
    resolution is the model's.

    Args:
        anomaly_map: (H, W) or (1, H, W) float anomaly map.
        pixel_threshold: pixel threshold of the model.
        mult: sensitivity multiplier of the threshold.
        min_defect_area: smallest kept component, in model pixels.
        original_size: (h, w) of the original image.

    Returns:
        mask (H, W) uint8 in {0, 1} and the list of defect dicts (plain int/float/str/list values).

    Raises:
        ValueError: a map that is not (H, W), or a threshold that is not a finite number.
    """
    amap = _as_map(anomaly_map)
    threshold = float(pixel_threshold) * float(mult)
    if not math.isfinite(threshold):
        raise ValueError(f"pixel threshold is not a finite number ({pixel_threshold} x {mult})")
    binary = (amap > threshold).astype(np.uint8)
    return _regions(binary, amap, min_defect_area, original_size, SOURCE_PIXEL_THRESHOLD)


def peak_region(anomaly_map: np.ndarray, original_size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[dict]]:
    """The region around the anomaly map's peak, as a mask and one defect with `source` "peak".

    Rule (independent of any data set and of the thresholds): the peak is the map's maximum (the first one in
    row-major order on ties); the region is the 8-connected component containing the peak of the pixels with
    `map >= min + PEAK_FRACTION * (peak - min)`, i.e. the half-maximum region of the peak above the image's
    own map minimum (the full-width-at-half-maximum idea, in two dimensions). It always holds the peak pixel;
    a constant map gives the whole image. Non-finite values: NaN counts as the minimum, +inf as the peak.

    Args:
        anomaly_map: (H, W) or (1, H, W) float anomaly map.
        original_size: (h, w) of the original image (geometry as in `extract_defects`).

    Returns:
        mask (H, W) uint8 in {0, 1} and a list with the one defect dict.
    """
    amap = _as_map(anomaly_map)
    values = np.nan_to_num(amap.astype(np.float64), nan=-np.inf)
    finite = values[np.isfinite(values)]
    peak_index = np.unravel_index(int(np.argmax(values)), values.shape)
    peak = float(values[peak_index])
    low = float(finite.min()) if finite.size else peak
    if math.isinf(peak) and peak > 0:
        above = values == np.inf
    else:
        level = low + PEAK_FRACTION * (peak - low) if math.isfinite(peak) else -np.inf
        above = values >= level
    n, labels = cv2.connectedComponents(above.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    binary = (labels == labels[peak_index]).astype(np.uint8)
    return _regions(binary, amap, 0, original_size, SOURCE_PEAK)


def _regions(
    binary: np.ndarray, amap: np.ndarray, min_defect_area: int, original_size: tuple[int, int] | None, source: str
) -> tuple[np.ndarray, list[dict]]:
    """8-connected components of `binary` (at least `min_defect_area` pixels) as (mask, defect dicts)."""
    height, width = amap.shape
    oh, ow = (height, width) if original_size is None else (int(original_size[0]), int(original_size[1]))
    sx, sy = ow / width, oh / height
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    if n <= 1:
        return binary, []
    maxima, means = _component_values(labels, amap, n)
    keep = [i for i in range(1, n) if int(stats[i, cv2.CC_STAT_AREA]) >= min_defect_area]
    if len(keep) < n - 1:
        binary = np.isin(labels, keep).astype(np.uint8)
    keep.sort(
        key=lambda i: (
            -int(stats[i, cv2.CC_STAT_AREA]),
            int(stats[i, cv2.CC_STAT_TOP]),
            int(stats[i, cv2.CC_STAT_LEFT]),
        )
    )

    defects = []
    for cid, i in enumerate(keep, start=1):
        x, y = int(stats[i, cv2.CC_STAT_LEFT]), int(stats[i, cv2.CC_STAT_TOP])
        w, h = int(stats[i, cv2.CC_STAT_WIDTH]), int(stats[i, cv2.CC_STAT_HEIGHT])
        area = int(stats[i, cv2.CC_STAT_AREA])
        cx, cy = float(centroids[i, 0]), float(centroids[i, 1])
        bbox = [x, y, x + w - 1, y + h - 1]
        bbox_original = scale_bbox(bbox, (height, width), (oh, ow))
        defects.append(
            {
                "component_id": cid,
                "source": source,
                "area": area,
                "bbox": bbox,
                "centroid": [cx, cy],
                "max_anomaly_value": float(maxima[i - 1]),
                "mean_anomaly_value": float(means[i - 1]),
                "area_original": int(round(area * sx * sy)),
                "bbox_original": bbox_original,
                "centroid_original": [(cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5],
            }
        )
    return binary, defects
