"""PredictionWriter: `aoi predict` writes preds.jsonl, masks/, overlays/ and report.json."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from aoi_lightning.data.batches import ORIGINAL_KEY, readable_flags
from aoi_lightning.fileio import read_jsonl
from aoi_lightning.postprocess.outputs import (
    PREDS_FILE,
    OutputOptions,
    PredictionOutputs,
    finish_outputs,
    merge_rank_files,
)
from aoi_lightning.postprocess.prediction import ModelFacts, module_facts

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Writes the OK/NG predictions of `trainer.predict` into an output folder, batch by batch.

    A single process appends complete lines to `preds.jsonl` directly; under DDP (world size > 1) each rank
    appends to `preds.rank{N}.jsonl` and at the end rank zero merges them into `preds.jsonl` in dataset order.
    Rank zero then writes `report.json`. Unreadable images become error records. Overlays are drawn on the
    images the data pipeline already decoded (the writer asks the data module to keep the originals), so no
    image file is read twice.

    Args:
        output_dir: output folder (default `<trainer.default_root_dir>/predictions`, i.e. `RUN/predictions`).
        pixel_threshold_mult: multiplier of the model's pixel threshold for the defect masks.
        min_defect_area: smallest defect kept, in model pixels.
        save_masks: write `masks/*.png`.
        save_overlays: write `overlays/*.png` (on the original images decoded by the data pipeline).
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
        datamodule = trainer.datamodule
        size = getattr(datamodule, "image_size", None) or (0, 0)
        return module_facts(pl_module, str(getattr(datamodule, "category", "")), size)

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

    def _jsonl_name(self, trainer: pl.Trainer) -> str:
        return PREDS_FILE if trainer.world_size == 1 else self._rank_file(trainer, trainer.global_rank).name

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._started = False
        datamodule = getattr(trainer, "datamodule", None)
        if stage == "predict" and self.options.save_overlays and hasattr(datamodule, "keep_originals"):
            datamodule.keep_originals = True  # the predict items carry their decoded original image

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        facts = self._facts(trainer, pl_module)  # raises when the model has no thresholds
        if not self.keep_outputs:
            trainer.predict_loop.return_predictions = False
        out_dir = self.resolve_output_dir(trainer)
        self._outputs = PredictionOutputs(
            out_dir, facts, self.options, self._input_root(trainer), self._jsonl_name(trainer)
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
        originals = batch.get(ORIGINAL_KEY)
        merged = trainer.world_size > 1
        for i, (path, ok) in enumerate(zip(batch["image_path"], readable_flags(batch))):
            index = int(indices[i]) if indices is not None else int(batch_indices[i])
            extra = {"index": index} if merged else None
            if not ok:
                outputs.write_error(path, batch["error"][i], extra=extra)
                continue
            original = tuple(int(v) for v in batch["original_size"][i])
            label = int(batch["label"][i]) if "label" in batch else -1
            outputs.write(
                path,
                float(scores[i]),
                maps[i],
                original,
                gt_label=label if label >= 0 else None,
                image_rgb=originals[i] if originals is not None else None,
                extra=extra,
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
            if trainer.world_size > 1:
                records = merge_rank_files(out_dir, [self._rank_file(trainer, r) for r in range(trainer.world_size)])
            else:
                records = read_jsonl(out_dir / PREDS_FILE)
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
        if self._outputs is not None:  # a predict stopped by an error: its lines stay, the folder is released
            self._outputs.close()
            self._outputs = None
        datamodule = getattr(trainer, "datamodule", None)
        if getattr(datamodule, "keep_originals", False):
            datamodule.keep_originals = False
        started, self._started = self._started, False
        if started or not trainer.is_global_zero:
            return
        out_dir = self.resolve_output_dir(trainer)
        facts = self._facts(trainer, pl_module)
        log.warning("no images to predict: %s gets an empty preds.jsonl and a zero report", out_dir)
        merge_rank_files(out_dir, [])
        finish_outputs(out_dir, [], facts, Path(trainer.default_root_dir).name)
