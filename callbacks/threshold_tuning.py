"""ThresholdTuning: sets the image and pixel thresholds at the end of validation during fit."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch

from aoi_lightning.fileio import write_json
from aoi_lightning.rundir.scoring import score_loader
from aoi_lightning.thresholds.search import (
    best_f1_threshold,
    best_pixel_threshold,
    check_score_spread,
    conformal_threshold,
    quantile_threshold,
)

log = logging.getLogger(__name__)


class ThresholdTuning(pl.Callback):
    """Tunes thresholds on the validation split and stores them as model buffers and in `thresholds.json`.

    Args:
        method: `f1` (image F1 / pixel F1-or-IoU on validation), `quantile` (quantiles of the good validation
            images' scores) or `conformal` (good-only calibration: false-reject rate <= alpha on good parts).
        pixel_metric: `f1` or `iou` for the pixel threshold with method `f1`.
        quantile_image: image-score quantile with method `quantile`.
        quantile_pixel: quantile of the per-image map maxima for the pixel threshold with method `quantile`.
        alpha: target false-reject rate with method `conformal`, and for the good-only fallback.

    Fallbacks (logged as warnings, recorded in thresholds.json `note`): a validation split with only good
    images uses the conformal rule with `alpha` on them; a split with only defective images takes the pixel
    threshold from pixel F1 and the image threshold from the conformal bound of good training images held out of
    the fit (`mvtec.threshold_holdout`), as do `quantile` without good validation images and `val_split: none`.
    Only when too few good images exist to hold any out are the fitted images used (`"in_sample": true`).

    Tie rule: NG when `score > threshold`, defective pixel when `value > threshold`; thresholds taken from an
    observed good score (conformal, quantile 1.0) therefore accept that score.

    A model that gives every image of the split it is tuned on the same score (in float32) cannot separate
    anything: the fit stops with a one-line `DegenerateScoresError` before any threshold, `thresholds.json` or
    checkpoint is written, so the run directory holds no usable model.
    """

    def __init__(
        self,
        method: Literal["f1", "quantile", "conformal"] = "f1",
        pixel_metric: Literal["f1", "iou"] = "f1",
        quantile_image: float = 0.99,
        quantile_pixel: float = 0.99,
        alpha: float = 0.05,
    ) -> None:
        self.method = method
        self.pixel_metric = pixel_metric
        self.quantile_image = quantile_image
        self.quantile_pixel = quantile_pixel
        self.alpha = alpha

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        info = self.tune(trainer, pl_module)
        pl_module.model.set_thresholds(info["image_threshold"], info["pixel_threshold"])
        pl_module.threshold_info = info
        if trainer.is_global_zero:
            write_json(Path(trainer.default_root_dir) / "thresholds.json", info)
        log.info(
            "thresholds: image %.6g, pixel %.6g (%s)", info["image_threshold"], info["pixel_threshold"], info["method"]
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # no validation loop ran (val_split: none): quantiles of the training scores
        if pl_module.model.has_thresholds or trainer.state.fn != "fit":
            return
        pl_module.ensure_fitted()  # callbacks' on_train_end runs before the module's
        info = self._from_good_images(trainer, pl_module, note="no validation split")
        pl_module.model.set_thresholds(info["image_threshold"], info["pixel_threshold"])
        pl_module.threshold_info = info
        if trainer.is_global_zero:
            write_json(Path(trainer.default_root_dir) / "thresholds.json", info)

    def tune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        collector = pl_module.synced_collector("val")  # the whole split under DDP
        recs = [r for r in collector.records if r["gt_label"] is not None]
        if not recs:
            return self._from_good_images(trainer, pl_module, note="validation split has no labelled images")
        scores = torch.tensor([r["pred_score"] for r in recs], dtype=torch.float64)
        labels = torch.tensor([r["gt_label"] for r in recs])
        if self.method != "quantile":
            check_score_spread(scores.numpy(), "validation image")
        maxima = torch.tensor([r["map_max"] for r in recs], dtype=torch.float64)
        n_good, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
        if self.method == "quantile":
            if n_good == 0:
                return self._from_good_images(trainer, pl_module, note="validation split has no good images")
            good = labels == 0
            return self._quantiles(scores[good], maxima[good], split="val", n=n_good, note="")
        if self.method == "conformal" or n_bad == 0:
            note = "" if self.method == "conformal" else "validation split has only good images: conformal fallback"
            if note:
                log.warning("%s (alpha=%s)", note, self.alpha)
            good = labels == 0
            return self._conformal(scores[good], maxima[good], split="val", n=n_good, note=note)
        hist = collector.hist.merged()
        if n_good == 0:
            note = (
                "validation split has only defective images: pixel threshold from pixel F1, "
                "image threshold from training images"
            )
            log.warning(note)
            info = self._from_good_images(trainer, pl_module, note=note, conformal=True)
            if float(hist.pos.sum()) > 0 and float(hist.neg.sum()) > 0:
                pix = best_pixel_threshold(hist, collector.hist.edges(), self.pixel_metric)
                info["pixel_threshold"] = pix.threshold
            return info
        image = best_f1_threshold(scores, labels)
        info = {
            "image_threshold": image.threshold,
            "method": "f1",
            "metric": "f1",
            "split": "val",
            "value": image.value,
            "num_images": len(recs),
        }
        if float(hist.pos.sum()) > 0 and float(hist.neg.sum()) > 0:
            pix = best_pixel_threshold(hist, collector.hist.edges(), self.pixel_metric)
            info.update({"pixel_threshold": pix.threshold, "pixel_metric": self.pixel_metric, "pixel_value": pix.value})
        else:
            note = "no pixel masks in the validation split: pixel threshold = image threshold"
            log.warning(note)
            info.update({"pixel_threshold": image.threshold, "note": note})
        return info

    def _conformal(self, scores: torch.Tensor, maxima: torch.Tensor, split: str, n: int, note: str) -> dict:
        image_t, ok_image = conformal_threshold(scores.numpy(), self.alpha)
        pixel_t, _ = conformal_threshold(maxima.numpy(), self.alpha)
        if not ok_image:
            note = (
                note + "; " if note else ""
            ) + f"only {n} good images: the alpha={self.alpha} bound needs >= {math.ceil(1 / self.alpha - 1)}"
            log.warning(note)
        return {
            "image_threshold": image_t,
            "pixel_threshold": pixel_t,
            "method": "conformal",
            "metric": "frr",
            "split": split,
            "value": self.alpha,
            "alpha": self.alpha,
            "guaranteed": ok_image,
            "num_images": n,
            "note": note,
        }

    def _from_good_images(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, note: str, conformal: bool = False
    ) -> dict:
        """Thresholds from good images outside the validation split: those held out of the fit for it
        (`datamodule.holdout_dataloader`, split `holdout`); without any, the fitted images themselves (split
        `train`, `"in_sample": true`, never `guaranteed`, with a warning: their scores are biased low)."""
        datamodule = trainer.datamodule
        holdout = datamodule.holdout_dataloader() if hasattr(datamodule, "holdout_dataloader") else None
        if holdout is not None:
            records, maxima = score_loader(pl_module.model, holdout, pl_module.device)
            split, in_sample = "holdout", False
        else:
            records, maxima = score_loader(pl_module.model, datamodule.train_eval_dataloader(), pl_module.device)
            pl_module.train_records = records  # reused for preds_train.jsonl instead of scoring the images again
            split, in_sample = "train", True
            warning = (
                "thresholds from the images the model was fitted on (too few good training images to hold any "
                "out): their scores are biased low, so unseen good parts are rejected more often than intended"
            )
            log.warning(warning)
            note = f"{note}; {warning}" if note else warning
        scores = torch.tensor([r["pred_score"] for r in records], dtype=torch.float64)
        check_score_spread(scores.numpy(), "training image")
        if conformal or self.method == "conformal":
            info = self._conformal(scores, torch.tensor(maxima, dtype=torch.float64), split, len(records), note)
            info["guaranteed"] = bool(info["guaranteed"]) and not in_sample
        else:
            info = self._quantiles(scores, torch.tensor(maxima, dtype=torch.float64), split, len(records), note)
        info["in_sample"] = in_sample
        return info

    def _quantiles(self, scores: torch.Tensor, maxima: torch.Tensor, split: str, n: int, note: str) -> dict:
        return {
            "image_threshold": quantile_threshold(scores.numpy(), self.quantile_image),
            "pixel_threshold": quantile_threshold(maxima.numpy(), self.quantile_pixel),
            "method": "quantile",
            "metric": "quantile",
            "split": split,
            "value": self.quantile_image,
            "quantile_image": self.quantile_image,
            "quantile_pixel": self.quantile_pixel,
            "num_images": n,
            "note": note,
        }
