"""LightningModule glue shared by PaDiM and PatchCore: one fit pass over good images, evaluation loops."""

from __future__ import annotations

import logging
import math
import time

import lightning.pytorch as pl
import torch

from aoi_lightning import distributed
from aoi_lightning.data.batches import readable, readable_flags
from aoi_lightning.data.preprocess import Preprocessing, PreprocessingError, as_preprocessing, crop_box
from aoi_lightning.metrics.evaluation import EvaluationCollector, build_metrics_report
from aoi_lightning.models.components.base import AnomalyTorchModel, NotFittedError, exact_cuda_math
from aoi_lightning.models.tile_calibration import calibrate_tiles_on_training_images
from aoi_lightning.postprocess.prediction import content_score
from aoi_lightning.progress import phase

log = logging.getLogger(__name__)


class AnomalyModule(pl.LightningModule):
    """Statistics-only model: `training_step` accumulates features, the first evaluation finalises the fit.

    There is no loss and no optimizer (`automatic_optimization = False`); run with `max_epochs: 1`.
    """

    model_name = "anomaly"

    def __init__(self, fit_embeddings_mb: int = 1024) -> None:
        super().__init__()
        if int(fit_embeddings_mb) < 0:
            raise ValueError(f"fit_embeddings_mb must be >= 0, got {fit_embeddings_mb}")
        #: MiB of training embeddings kept from the fit pass to score the training images without a second pass.
        self.fit_embeddings_mb = int(fit_embeddings_mb)
        self._fit_items: list[dict] = []
        self.automatic_optimization = False
        self.model: AnomalyTorchModel
        self.val_collector = EvaluationCollector()
        self.test_collector = EvaluationCollector()
        self.val_metrics: dict = {}
        self.test_report: dict = {}
        self.threshold_info: dict = {}
        self.timings: dict[str, float] = {}
        self.split_policy = "test_half"
        self._fit_images = 0
        #: Errors that callbacks report at the end of fit; the CLI raises them once the run's files are written.
        self.deferred_errors: list[Exception] | None = None
        #: Training-image score records when a callback already computed them after the fit (else None).
        self.train_records: list[dict] | None = None
        #: Input size (h, w) the model was fitted at; saved in the checkpoint so that a command whose config
        #: asks for another size is refused (`aoi_lightning.rundir.loading.check_checkpoint_for_config`).
        self.fit_image_size: tuple[int, int] | None = None
        self._synced: set[str] = set()
        #: What the model expects as input: set at fit from the data module, restored from checkpoints.
        self.preprocessing: Preprocessing | None = None
        #: Outputs of the validation pass of this fit by image path (score (), map (1, H, W)), reused by the test
        #: pass that follows for the images both passes hold (`val_split: test_half`); see `_evaluate`.
        self._val_outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._val_outputs_bytes = 0

    def make_preprocessing(self, image_size: Preprocessing | int | tuple[int, int]) -> Preprocessing:
        """The model's preprocessing at `image_size` (or a data module's `Preprocessing`), with the backbone's
        in-graph normalisation recorded."""
        norm = self.model.input_normalization()
        return as_preprocessing(image_size).with_normalization(*(norm or (None, None)))

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            exact_cuda_math()
        datamodule = getattr(self.trainer, "datamodule", None) if self.trainer is not None else None
        if datamodule is not None and getattr(datamodule, "val_split", None):
            self.split_policy = datamodule.val_split
        source = getattr(datamodule, "preprocessing", None) or getattr(datamodule, "image_size", None)
        if source is not None and (stage == "fit" or self.preprocessing is None):
            self.preprocessing = self.make_preprocessing(source)  # a checkpoint loaded later restores its own

    # -- fit ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> None:
        return None

    def on_train_start(self) -> None:
        self.model.eval()
        self._fit_images = 0
        self.train_records = None
        self._fit_items = []
        self._forget_val_outputs()
        # one process: the training images are scored from the fit pass's embeddings (under DDP each process
        # holds a share only, and rank zero scores them in a pass of its own)
        budget = 0 if distributed.is_distributed() else self.fit_embeddings_mb * 2**20
        self.model.keep_fit_embeddings(budget)
        self.timings["feature_extraction_s"] = 0.0
        size = getattr(getattr(self.trainer, "datamodule", None), "image_size", None)
        self.fit_image_size = (int(size[0]), int(size[1])) if size is not None else None
        self._prepare_fit()

    def _prepare_fit(self) -> None:
        """Hook for subclasses (e.g. preallocating the memory bank)."""

    def train(self, mode: bool = True):  # the backbone stays in eval mode (frozen batch norm)
        super().train(mode)
        self.model.eval()
        return self

    def training_step(self, batch: dict, batch_idx: int) -> None:
        batch = readable(batch, "training image")
        if batch is None:
            return None
        start = time.perf_counter()
        with torch.no_grad():
            self.model.update(batch["image"])
        self.timings["feature_extraction_s"] = (
            self.timings.get("feature_extraction_s", 0.0) + time.perf_counter() - start
        )
        self._fit_images += int(batch["image"].shape[0])
        boxes = batch.get("content_box")
        for i in range(int(batch["image"].shape[0])):
            label = int(batch["label"][i])
            self._fit_items.append(
                {
                    "image_path": batch["image_path"][i],
                    "gt_label": label if label >= 0 else None,
                    "defect_type": batch["defect_type"][i],
                    "split": batch["split"][i],
                    "content_box": None if boxes is None else [int(v) for v in boxes[i]],
                }
            )
        return None

    def on_train_end(self) -> None:
        self.ensure_fitted()

    def ensure_fitted(self) -> None:
        """Finalize a pending fit (combining the ranks' shares under DDP); error when there is nothing to use.

        Every rank calls it at the same points (start of validation, test, predict; end of training)."""
        pending = distributed.sum_int(self._fit_images, self.device)
        if pending == 0:
            if self.model.is_fitted:
                return
            raise NotFittedError(
                "the model is not fitted: train it with `aoi fit`, or pass --ckpt_path of a trained run"
            )
        self._forget_val_outputs()  # outputs of an earlier model
        what = f"{type(self.model).__name__.removesuffix('Model')} fitted on {pending:,} images"
        with phase("finalize", what) as finalize:
            if distributed.is_distributed():
                distributed.finalize_distributed(self.model)
            else:
                self.model.finalize()
        self.timings["fit_finalize_s"] = finalize.seconds
        self.timings["num_fit_images"] = pending
        self.timings["num_processes"] = distributed.world_size()
        self._fit_images = 0
        if self.model.needs_tile_calibration:
            calibrate_tiles_on_training_images(self)
        self._score_fit_images()

    def _score_fit_images(self) -> None:
        """`train_records` from the embeddings the fit pass kept (None when it kept none: a second pass then)."""
        items, self._fit_items = self._fit_items, []
        boxes = [item.pop("content_box", None) for item in items]
        with phase("training-image scores", "from the fit pass's embeddings") as scoring:
            outputs = self.model.score_fit_embeddings()
            if outputs is None:
                scoring.detail = "not kept: scored in a second pass"
                return
            scores = torch.cat([o.pred_score for o in outputs]).float().cpu().tolist()
            padded = self.preprocessing is not None and self.preprocessing.resize == "fit_pad"
            if padded and None not in boxes and len(scores) == len(items):
                maps = [m for o in outputs for m in o.anomaly_map.float().cpu()[:, 0]]  # fit_pad: the content box
                scores = [content_score(s, crop_box(m, box), m.shape) for s, m, box in zip(scores, maps, boxes)]
        if len(scores) != len(items):  # cannot happen unless `update` was called outside training_step
            return
        self.train_records = [{**item, "pred_score": score} for item, score in zip(items, scores)]
        self.timings["score_train_from_fit_s"] = scoring.seconds

    # -- evaluation -------------------------------------------------------------------------------------------
    def _thresholds(self) -> tuple[float, float]:
        return float(self.model.image_threshold), float(self.model.pixel_threshold)

    #: Most bytes of validation maps kept for the test pass (past it, the test pass recomputes them).
    VAL_OUTPUTS_MAX_BYTES = 512 * 2**20

    def _forget_val_outputs(self) -> None:
        self._val_outputs, self._val_outputs_bytes = {}, 0

    def _evaluate(self, collector: EvaluationCollector, batch: dict, keep: bool = False, reuse: bool = False):
        """Score the readable images of `batch` into `collector`; returns the batch outputs for callbacks:
        `pred_score` (B,), `anomaly_map` (B, 1, H, W) and the readable items' `image_path`, `label`, `split`.

        `keep`: remember the outputs by image path (the validation pass of a fit); `reuse`: take the remembered
        outputs of images scored before instead of running the model on them again (the test pass right after:
        the fitted model has not changed, and the validation images are part of the test set)."""
        batch = readable(batch)
        if batch is None:
            return None
        paths = list(batch["image_path"])
        outputs = {i: self._val_outputs[p] for i, p in enumerate(paths) if reuse and p in self._val_outputs}
        if not outputs:
            out = self.model(batch["image"])
            pred_score, anomaly_map = out.pred_score, out.anomaly_map
        else:  # the remembered outputs, and the model's for the other images
            todo = [i for i in range(len(paths)) if i not in outputs]
            if todo:
                out = self.model(batch["image"][todo])
                outputs.update({i: (out.pred_score[k], out.anomaly_map[k]) for k, i in enumerate(todo)})
            pred_score = torch.stack([outputs[i][0].to(self.device) for i in range(len(paths))])
            anomaly_map = torch.stack([outputs[i][1].to(self.device) for i in range(len(paths))])
        if keep:
            for i, path in enumerate(paths):
                size = anomaly_map[i].numel() * anomaly_map.element_size()
                if self._val_outputs_bytes + size <= self.VAL_OUTPUTS_MAX_BYTES:
                    kept = (pred_score[i].detach().cpu().clone(), anomaly_map[i].detach().cpu().clone())
                    self._val_outputs[path] = kept
                    self._val_outputs_bytes += size
        collector.update(batch, pred_score, anomaly_map, self._thresholds()[1])
        return {
            "pred_score": pred_score,
            "anomaly_map": anomaly_map,
            "image_path": batch["image_path"],
            "label": batch["label"],
            "split": batch["split"],
        }

    def on_validation_start(self) -> None:
        self.ensure_fitted()

    def on_validation_epoch_start(self) -> None:
        self._forget_val_outputs()
        self.val_collector.reset()
        self._synced.discard("val")

    def synced_collector(self, stage: str) -> EvaluationCollector:
        """The evaluation collector of `stage` (`val`/`test`) holding the whole split: under DDP the ranks'
        shares are gathered once, in rank order (= data order, the shards being contiguous)."""
        collector = self.val_collector if stage == "val" else self.test_collector
        if stage not in self._synced:
            self._synced.add(stage)
            if distributed.is_distributed():
                shares = distributed.all_gather_objects(collector)
                merged = EvaluationCollector(num_bins=collector.num_bins)
                merged.merge_from(shares)
                if stage == "val":
                    self.val_collector = merged
                else:
                    self.test_collector = merged
                collector = merged
        return collector

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        self._evaluate(self.val_collector, batch, keep=fitting)

    def on_validation_epoch_end(self) -> None:
        image_t, pixel_t = self._thresholds()
        self.val_metrics = self.synced_collector("val").metrics(
            ("val",), image_threshold=image_t, pixel_threshold=pixel_t
        )
        self._log_scalars("val", self.val_metrics)

    def on_test_start(self) -> None:
        self.ensure_fitted()

    def on_test_epoch_start(self) -> None:
        self.test_collector.reset()
        self._synced.discard("test")

    def test_step(self, batch: dict, batch_idx: int) -> dict | None:
        return self._evaluate(self.test_collector, batch, reuse=True)

    def on_test_epoch_end(self) -> None:
        self._forget_val_outputs()
        image_t, pixel_t = self._thresholds()
        self.test_report = build_metrics_report(self.synced_collector("test"), self.split_policy, image_t, pixel_t)
        self._log_scalars("test", self.test_report.get("test", {}))
        self._log_scalars("full_test", self.test_report.get("full_test", {}))

    def _log_scalars(self, prefix: str, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                if math.isfinite(float(value)) and not key.startswith("num_"):
                    self.log(f"{prefix}/{key}", float(value), batch_size=1, sync_dist=distributed.is_distributed())

    def on_predict_start(self) -> None:
        self.ensure_fitted()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        ok = torch.tensor(readable_flags(batch), device=batch["image"].device)
        out = self.model(batch["image"])
        return {"pred_score": out.pred_score, "anomaly_map": out.anomaly_map, "ok": ok}

    # -- checkpoint -------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["aoi"] = {
            "model_name": self.model_name,
            "threshold_info": self.threshold_info,
            "timings": {k: float(v) for k, v in self.timings.items()},
            "preprocessing": None if self.preprocessing is None else self.preprocessing.to_dict(),
            "image_size": list(self.fit_image_size) if self.fit_image_size else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("aoi")
        if not isinstance(meta, dict) or meta.get("model_name") != self.model_name:
            found = meta.get("model_name") if isinstance(meta, dict) else "not an AOI checkpoint"
            raise ValueError(f"checkpoint holds model {found!r}, but the config builds {self.model_name!r}")
        self.threshold_info = dict(meta.get("threshold_info") or {})
        self.timings = dict(meta.get("timings") or {})
        if meta.get("preprocessing") is not None:  # older checkpoints: the loader builds it from config.yaml
            try:
                self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
            except PreprocessingError as exc:
                raise ValueError(f"checkpoint 'aoi.preprocessing': {exc}") from exc
        size = meta.get("image_size")
        self.fit_image_size = (int(size[0]), int(size[1])) if size else None
