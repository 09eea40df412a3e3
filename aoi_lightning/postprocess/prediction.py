"""The one postprocessing of a prediction: (score, anomaly map, model facts, options, original size) -> verdict,
located defects, the `preds.jsonl` record, the defect mask and the overlay picture.

Every path that turns a model output into an answer goes through `postprocess_prediction`: `aoi run` (torch
and ONNX), the PredictionWriter of `aoi predict`, the HTML report's gallery and the overlays of `aoi compare`.
numpy and OpenCV only (the ONNX path imports this without torch).

Verdict and location agree (one coherent answer per image):

- NG iff `pred_score > image_threshold` (strict).
- NG image: its defects are the 8-connected components of `map > effective pixel threshold` (pixel threshold x
  `pixel_threshold_mult`) with at least `min_defect_area` pixels, each with `source` "pixel_threshold". When
  none is left (no pixel passes the pixel threshold, or `min_defect_area` removed every component) the image
  carries exactly one region with `source` "peak", whatever its area: the 8-connected region containing the
  map's maximum of the pixels with `map >= min + 0.5 * (peak - min)` (min and peak of this image's own map;
  the half-maximum region of the peak, `defects.peak_region`). An NG image is never without a located region.
- OK image: no defect, an empty mask and no box or outline in its overlay, whatever its map looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from aoi_lightning.data.preprocess import content_box, crop_box
from aoi_lightning.postprocess.defects import extract_defects, peak_region
from aoi_lightning.postprocess.records import is_ng, prediction_record
from aoi_lightning.postprocess.render import render_overlay

__all__ = [
    "ModelFacts",
    "OutputOptions",
    "Prediction",
    "content_score",
    "is_ng",
    "locate_defects",
    "module_facts",
    "postprocess_prediction",
]

#: Threshold facts that travel into report.json besides the two thresholds.
EXTRA_THRESHOLD_KEYS = ("quantile_image", "quantile_pixel")


#: largest pixel threshold multiplier (a threshold a million times the tuned one finds nothing; larger values could
#: overflow float32)
MAX_PIXEL_THRESHOLD_MULT = 1e6


@dataclass(frozen=True)
class OutputOptions:
    """What to write per image.

    Attributes:
        pixel_threshold_mult: multiplier of the pixel threshold (sensitivity of the defect masks).
        min_defect_area: smallest defect kept, in model pixels (never empties an NG image: see the module doc).
        save_masks: write `masks/<name>.png` (0/255 at the original size).
        save_overlays: write `overlays/<name>.png` (heat map, outlines, verdict at the original size).
    """

    pixel_threshold_mult: float = 1.0
    min_defect_area: int = 0
    save_masks: bool = True
    save_overlays: bool = True

    def __post_init__(self) -> None:
        mult = self.pixel_threshold_mult
        if not (math.isfinite(mult) and 0 < mult <= MAX_PIXEL_THRESHOLD_MULT):
            raise ValueError(
                f"pixel_threshold_mult must be a positive number up to {MAX_PIXEL_THRESHOLD_MULT:g}, got {mult}"
            )
        if self.min_defect_area < 0:
            raise ValueError(f"min_defect_area must be >= 0, got {self.min_defect_area}")


@dataclass(frozen=True)
class ModelFacts:
    """The model side of every record: name, category, input size (h, w), thresholds (`quantile_*` optional),
    and the resize mode of its preprocessing (`preprocess.RESIZE_MODES`: where an image lies in the model input;
    with `fit_pad` the image score is the maximum of the map over the content box, `content_score`).

    Build it with `ModelFacts.from_thresholds` (any back end) or `module_facts` (a torch/Lightning module).
    """

    model: str
    category: str
    input_size: tuple[int, int]
    image_threshold: float
    pixel_threshold: float
    thresholds: dict = field(default_factory=dict)
    resize: str = "stretch"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.image_threshold) and math.isfinite(self.pixel_threshold)):
            raise ValueError(
                "the model has no thresholds: train it with `aoi fit --config experiments/<experiment>.yaml` "
                "(the ThresholdTuning callback sets them)"
            )

    @classmethod
    def from_thresholds(
        cls,
        model: str,
        category: str,
        input_size,
        image_threshold: float,
        pixel_threshold: float,
        info=None,
        resize: str = "stretch",
    ) -> ModelFacts:
        """The one constructor of the facts of a model, torch or ONNX.

        Args:
            model: model name (`padim`, `patchcore`).
            category: data category.
            input_size: (H, W) model input size.
            image_threshold: the threshold the model carries (checkpoint buffer, export metadata).
            pixel_threshold: likewise.
            info: thresholds.json-like facts; its `quantile_image` / `quantile_pixel` go into report.json.
            resize: the preprocessing's resize mode (`stretch` or `fit_pad`).

        Raises:
            ValueError: a threshold that is not finite (the model was never tuned).
        """
        info = dict(info or {})
        return cls(
            model=str(model),
            category=str(category),
            input_size=(int(input_size[0]), int(input_size[1])),
            image_threshold=float(image_threshold),
            pixel_threshold=float(pixel_threshold),
            thresholds={k: info.get(k) for k in EXTRA_THRESHOLD_KEYS},
            resize=str(resize),
        )

    def content_box(self, original_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of an image of `original_size` in the model input
        (`Preprocessing.content_box`): the whole input unless the resize mode is `fit_pad`."""
        return content_box(self.input_size, original_size, self.resize)

    def report_thresholds(self) -> dict:
        return {**self.thresholds, "image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold}

    def effective_pixel_threshold(self, options: OutputOptions) -> float:
        return self.pixel_threshold * options.pixel_threshold_mult


def module_facts(module, category: str, input_size, model_name: str | None = None) -> ModelFacts:
    """`ModelFacts.from_thresholds` of a fitted AnomalyModule (its `model` buffers, `threshold_info` and
    `preprocessing`)."""
    name = model_name or getattr(module, "model_name", None) or type(module).__name__.lower()
    preprocessing = getattr(module, "preprocessing", None)
    return ModelFacts.from_thresholds(
        name,
        category,
        input_size,
        float(module.model.image_threshold),
        float(module.model.pixel_threshold),
        getattr(module, "threshold_info", None),
        resize=preprocessing.resize if preprocessing is not None else "stretch",
    )


@dataclass
class Prediction:
    """The postprocessed answer for one image.

    Attributes:
        record: the `preds.jsonl` record (without `mask_path` / `overlay_path`, which the writer adds).
        mask: (H, W) uint8 {0, 1} defect mask at the model's resolution, cut to the image's content box with
            `resize: fit_pad` (all zero for an OK image).
        overlay: (h, w, 3) BGR uint8 overlay at the size of the given image, or None without an image.
    """

    record: dict
    mask: np.ndarray
    overlay: np.ndarray | None = None

    @property
    def is_anomaly(self) -> bool:
        return bool(self.record["is_anomaly"])

    @property
    def defects(self) -> list[dict]:
        return self.record["defects"]


def content_score(pred_score, content_map, map_shape) -> float:
    """The image score of one image: the model's `pred_score`, or, when `content_map` is a cut of a larger map
    (`resize: fit_pad`), the maximum of `content_map`, so that the padding around the image cannot raise the score.

    With the padding cut off, both models score an image by the maximum of its anomaly map over the content box:
    PaDiM's own score is that maximum over the whole map; PatchCore's re-weighting (Roth et al. 2022, eq. 7) of its
    highest patch is left out there, since its highest patch may lie in the padding. On varied crops this scored
    better than PatchCore's whole-input score (docs/choosing.md). With the whole map (`stretch`) nothing changes.

    Args:
        pred_score: the model's image score (float or 0-d array/tensor).
        content_map: (h, w) map of the image's content box (numpy array or torch tensor).
        map_shape: (H, W) of the whole map (or any shape ending in it).
    """
    h, w = content_map.shape[-2:]
    if (h, w) != tuple(map_shape[-2:]) and h * w > 0:
        return float(content_map.max())
    return float(pred_score)


def locate_defects(
    anomaly_map: np.ndarray,
    is_anomaly: bool,
    effective_pixel_threshold: float,
    min_defect_area: int = 0,
    original_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """The defects of an image given its verdict (the rule of the module doc).

    Args:
        anomaly_map: (H, W) float anomaly map at the model's resolution.
        is_anomaly: the image verdict (`is_ng`).
        effective_pixel_threshold: pixel threshold x multiplier.
        min_defect_area: smallest pixel-threshold component kept, in model pixels.
        original_size: (h, w) of the original image.

    Returns:
        (H, W) uint8 mask and the defect dicts: empty for OK; at least one for NG.
    """
    mask, defects = extract_defects(anomaly_map, effective_pixel_threshold, 1.0, min_defect_area, original_size)
    if not is_anomaly:
        return np.zeros_like(mask), []
    if not defects:
        mask, defects = peak_region(anomaly_map, original_size)
    return mask, defects


def postprocess_prediction(
    image_path: str,
    pred_score: float,
    anomaly_map: np.ndarray,
    facts: ModelFacts,
    options: OutputOptions,
    original_size: tuple[int, int],
    gt_label: int | None = None,
    image_rgb: np.ndarray | None = None,
) -> Prediction:
    """Verdict, defects, record, mask and overlay of one prediction.

    NG iff `pred_score > image_threshold`. An NG image gets the pixel-threshold components (`map > pixel
    threshold x pixel_threshold_mult`, at least `min_defect_area` pixels, `source` "pixel_threshold"), or, when
    there are none, the one region around the map's peak (`source` "peak": the 8-connected region holding the
    maximum of the pixels with `map >= min + 0.5 * (peak - min)`). An OK image gets no defect and an empty
    mask, and its overlay has no outline or box.

    Args:
        image_path: input file (stored in the record).
        pred_score: image score.
        anomaly_map: (H, W) or (1, H, W) anomaly map at the model's resolution; with `fit_pad` it is cut to the
            image's content box first (`ModelFacts.content_box`), and defect boxes and areas are in the model
            pixels of that box.
        facts: model name, category, input size, thresholds, resize mode.
        options: pixel threshold multiplier and minimum defect area (the save flags are the writer's).
        original_size: (h, w) of the original image.
        gt_label: 0/1 when known.
        image_rgb: (h, w, 3) uint8 image for the overlay (the original, or its reduced decoding); no overlay
            when None.

    Returns:
        the `Prediction` (record, model-resolution mask, overlay or None).
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    amap = amap.reshape(amap.shape[-2:])
    content = crop_box(amap, facts.content_box(original_size))  # fit_pad: the padding is no part of the image
    score = content_score(pred_score, content, amap.shape)
    amap = content
    verdict = is_ng(score, facts.image_threshold)
    effective = facts.effective_pixel_threshold(options)
    mask, defects = locate_defects(amap, verdict, effective, options.min_defect_area, original_size)
    record = prediction_record(
        image_path=image_path,
        model=facts.model,
        category=facts.category,
        image_size=original_size,
        model_input_size=facts.input_size,
        gt_label=gt_label,
        pred_score=score,
        image_threshold=facts.image_threshold,
        pixel_threshold=facts.pixel_threshold,
        pixel_threshold_mult=options.pixel_threshold_mult,
        defects=defects,
    )
    overlay = None
    if image_rgb is not None:
        overlay = render_overlay(image_rgb, amap, mask, defects, score, facts.image_threshold, effective)
    return Prediction(record, mask, overlay)
