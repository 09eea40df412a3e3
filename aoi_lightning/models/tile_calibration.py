"""Per-tile calibration at the end of a fit: the tile gains of `per_tile` thresholds from the good training images."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import lightning.pytorch as pl
import torch

from aoi_lightning.data.batches import readable

log = logging.getLogger(__name__)


def _good_images(loader, device: torch.device) -> Iterator[torch.Tensor]:
    for batch in loader:
        batch = readable(batch, "training image")
        if batch is not None:
            yield batch["image"].to(device)


def calibrate_tiles_on_training_images(module: pl.LightningModule) -> None:
    """Calibrate `module.model.tile_gain` on the good training images of the fit (one more inference pass).

    The gains are set before the thresholds are tuned, so that the (global) thresholds apply to the
    per-tile scaled maps and scores. The training images are the ones the model was fitted on: their scores
    are somewhat lower than those of unseen good images, alike at every tile position, so the gains (ratios
    between positions) are much less affected than the scores themselves.
    """
    trainer = module.trainer
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "train_eval_dataloader"):
        loader = datamodule.train_eval_dataloader()
    else:
        loader = trainer.train_dataloader
    start = time.perf_counter()
    gain = module.model.calibrate_tiles(_good_images(loader, module.device))
    module.timings["tile_calibration_s"] = time.perf_counter() - start
    log.info(
        "per-tile gains of a %dx%d tile grid: min %.3f, max %.3f",
        gain.shape[0],
        gain.shape[1],
        float(gain.min()),
        float(gain.max()),
    )
