"""PredictionWriter: `aoi predict` writes preds.jsonl, masks/, overlays/ and report.json."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from aoi_lightning.data.image_io import ImageReadError, read_image
from aoi_lightning.postprocess.outputs import (
    ModelFacts,
    OutputOptions,
    PredictionOutputs,
    finish_outputs,
    merge_rank_files,
)

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Writes the OK/NG predictions of `trainer.predict` into an output folder, batch by batch.

    Each rank appends complete lines to `preds.rank{N}.jsonl`; at the end rank zero merges them into
    `preds.jsonl` in dataset order and writes `report.json`. Unreadable images become error records.

    Args:
        output_dir: output folder (default `<trainer.default_root_dir>/predictions`, i.e. `RUN/predictions`).
        pixel_threshold_mult: multiplier of the model's pixel threshold for the defect masks.
        min_defect_area: smallest defect kept, in model pixels.
        save_masks: write `masks/*.png`.
        save_overlays: write `overlays/*.png` (the original image is read again from disk).
        keep_outputs: also keep every batch output in memory for the return value of `trainer.predict`
            (off by default: memory stays constant however many images are predicted).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        pixel_threshold_mult: float = 1.0,
        min_defect_area: int = 0,
        save_masks: bool = True,
        save_overlays: bool = True,
        keep_outputs: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.options = OutputOptions(pixel_threshold_mult, min_defect_area, save_masks, save_overlays)
        self.keep_outputs = keep_outputs
        self._outputs: PredictionOutputs | None = None
        self._started = False

    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else Path(trainer.default_root_dir) / "predictions"

    @staticmethod
    def _facts(trainer: pl.Trainer, pl_module: pl.LightningModule) -> ModelFacts:
        model = pl_module.model
        info = dict(getattr(pl_module, "threshold_info", {}) or {})
        datamodule = trainer.datamodule
        size = getattr(datamodule, "image_size", None) or (0, 0)
        return ModelFacts(
            model=str(getattr(pl_module, "model_name", type(pl_module).__name__.lower())),
            category=str(getattr(datamodule, "category", "")),
            input_size=(int(size[0]), int(size[1])),
            image_threshold=float(model.image_threshold),
            pixel_threshold=float(model.pixel_threshold),
            thresholds={k: info.get(k) for k in ("quantile_image", "quantile_pixel")},
        )

    @staticmethod
    def _input_root(trainer: pl.Trainer) -> Path | None:
        """Folder the output names are relative to: `data.predict_dir`, else `<data.root>/<category>`."""
        datamodule = trainer.datamodule
        if getattr(datamodule, "predict_dir", None):
            return Path(datamodule.predict_dir).expanduser()
        if hasattr(datamodule, "data_root") and hasattr(datamodule, "category"):
            return Path(datamodule.data_root) / datamodule.category
        return None

    def _rank_file(self, trainer: pl.Trainer, rank: int) -> Path:
        return self.resolve_output_dir(trainer) / f"preds.rank{rank}.jsonl"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._started = False

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        facts = self._facts(trainer, pl_module)  # raises when the model has no thresholds
        if not self.keep_outputs:
            trainer.predict_loop.return_predictions = False
        out_dir = self.resolve_output_dir(trainer)
        self._outputs = PredictionOutputs(
            out_dir, facts, self.options, self._input_root(trainer), self._rank_file(trainer, trainer.global_rank).name
        ).open()
        self._started = True
        if trainer.is_global_zero:
            log.info("writing predictions to %s", out_dir)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        outputs = self._outputs
        scores = prediction["pred_score"].detach().float().cpu().numpy()
        maps = prediction["anomaly_map"].detach().float().cpu().numpy()
        indices = batch.get("index")
        for i, path in enumerate(batch["image_path"]):
            index = int(indices[i]) if indices is not None else int(batch_indices[i])
            error = batch["error"][i] if "error" in batch else ""
            if error:
                outputs.write_error(path, error, extra={"index": index})
                continue
            original = tuple(int(v) for v in batch["original_size"][i])
            image = None
            if self.options.save_overlays:
                try:
                    image = read_image(path)
                except ImageReadError as exc:
                    log.warning("no overlay for %s: %s", path, exc)
            label = int(batch["label"][i]) if "label" in batch else -1
            outputs.write(
                path,
                float(scores[i]),
                maps[i],
                original,
                gt_label=label if label >= 0 else None,
                image_rgb=image,
                extra={"index": index},
            )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._outputs is None:
            return
        facts = self._outputs.facts
        self._outputs.close()
        self._outputs = None
        trainer.strategy.barrier("prediction_writer")
        if trainer.is_global_zero:
            out_dir = self.resolve_output_dir(trainer)
            rank_files = [self._rank_file(trainer, r) for r in range(trainer.world_size)]
            records = merge_rank_files(out_dir, rank_files)
            report = finish_outputs(out_dir, records, facts, Path(trainer.default_root_dir).name)
            log.info(
                "predictions: %d images (%d NG), %d errors -> %s",
                report["num_images"],
                report["num_ng"],
                report["num_errors"],
                out_dir,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # An empty predict set skips the loop (and its hooks): still leave an empty preds.jsonl and report.
        if stage != "predict":
            return
        started, self._started = self._started, False
        if started or not trainer.is_global_zero:
            return
        out_dir = self.resolve_output_dir(trainer)
        facts = self._facts(trainer, pl_module)
        log.warning("no images to predict: %s gets an empty preds.jsonl and a zero report", out_dir)
        merge_rank_files(out_dir, [])
        finish_outputs(out_dir, [], facts, Path(trainer.default_root_dir).name)
