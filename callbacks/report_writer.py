"""HtmlReport: writes `<run>/report.html` at the end of every test pass (rank zero)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

from aoi_lightning import distributed
from aoi_lightning.postprocess.prediction import module_facts
from aoi_lightning.progress import phase
from aoi_lightning.report.build import GalleryMaps, build_report_data, run_facts, write_report
from aoi_lightning.report.gallery import overlays_from_maps

log = logging.getLogger(__name__)


class HtmlReport(pl.Callback):
    """Writes the run's self-contained HTML report from the test pass held in memory.

    During `aoi fit` the test pass runs before metrics.json and the preds files exist, so the page is built
    from `pl_module.test_report`, `pl_module.test_collector.records` and the model's thresholds. The gallery
    overlays come from the anomaly maps of the test pass itself: while it runs, the callback keeps the maps of
    only the images the gallery can show (`GalleryMaps`: per split the `gallery_size` highest-scoring good and
    lowest-scoring defective images), so the model never runs a second time. `aoi report --run_dir RUN`
    rebuilds the same page from the files. The seconds it takes are recorded as `report_html_s` in the
    module's timings (meta.json after a fit).

    Args:
        gallery_size: pictures per gallery (worst false positives, worst false negatives).
    """

    def __init__(self, gallery_size: int = 6) -> None:
        if gallery_size < 0:
            raise ValueError(f"gallery_size must be >= 0, got {gallery_size}")
        self.gallery_size = gallery_size
        self.gallery_maps = GalleryMaps(gallery_size)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.gallery_maps = GalleryMaps(self.gallery_size)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int, dataloader_idx=0
    ) -> None:
        if not isinstance(outputs, dict) or "anomaly_map" not in outputs:
            return
        self.gallery_maps.update(
            outputs["image_path"],
            [int(v) for v in outputs["label"]],
            outputs["split"],
            outputs["pred_score"].detach().float().cpu().numpy(),
            outputs["anomaly_map"].detach().float().cpu().numpy(),
        )

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if distributed.is_distributed():  # each rank saw its own shard
            self.gallery_maps.merge_from(distributed.all_gather_objects(self.gallery_maps))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = getattr(pl_module, "test_report", None)
        if not metrics:
            log.warning("HtmlReport: the test pass produced no metrics; report.html not written")
            return
        with phase("report") as made:
            model = pl_module.model
            image_t, pixel_t = float(model.image_threshold), float(model.pixel_threshold)
            thresholds = dict(getattr(pl_module, "threshold_info", None) or {})
            thresholds.update(image_threshold=image_t, pixel_threshold=pixel_t)
            datamodule = trainer.datamodule
            size = tuple(getattr(datamodule, "image_size", None) or (0, 0))
            run_dir = Path(trainer.default_root_dir)
            name = str(getattr(pl_module, "model_name", type(pl_module).__name__.lower()))
            category = str(getattr(datamodule, "category", ""))
            kept = self.gallery_maps.maps()

            def overlays(paths: list[str]) -> dict:
                if not model.has_thresholds:
                    return {}
                facts = module_facts(pl_module, category, size)
                return overlays_from_maps({p: kept[p] for p in paths if p in kept}, facts)

            data = build_report_data(
                f"{name} / {category} / {run_dir.name}",
                run_facts(name, category, run_dir, metrics.get("split_policy"), size),
                metrics,
                list(pl_module.test_collector.records),
                thresholds,
                overlays,
                mask_suffix=str(getattr(datamodule, "mask_suffix", "_mask")),
                gallery_size=self.gallery_size,
            )
            path = write_report(run_dir, data)
            made.detail = f"written to {path}"
        pl_module.timings["report_html_s"] = made.seconds
