"""What a fit or an evaluation writes into the run directory (rank zero only). Writers only: the passes that
produce the results (fit, test) are started by the CLI."""

from __future__ import annotations

import logging
import math
import time

from lightning.pytorch import Trainer

from aoi_lightning.fileio import write_json, write_jsonl
from aoi_lightning.models.lightning_base import AnomalyModule
from aoi_lightning.postprocess.records import is_ng
from aoi_lightning.rundir.layout import RunDir
from aoi_lightning.rundir.meta import build_meta
from aoi_lightning.rundir.scoring import score_loader

log = logging.getLogger(__name__)


def decorate(records: list[dict], image_threshold: float) -> list[dict]:
    """Per-image score records with the OK/NG decision when a threshold exists (internal keys dropped); NG when
    `pred_score > image_threshold` (strict tie rule)."""
    out = []
    for rec in records:
        item = {k: v for k, v in rec.items() if k != "map_max"}
        if math.isfinite(image_threshold):
            item["is_anomaly"] = is_ng(rec["pred_score"], image_threshold)
            item["label"] = "NG" if item["is_anomaly"] else "OK"
        out.append(item)
    return out


def write_fit_checkpoint(trainer: Trainer, model: AnomalyModule, datamodule, run: RunDir, timings: dict) -> None:
    """After `fit`, before the test pass: the checkpoint and `preds_train.jsonl` (the training images' scores,
    reused from the threshold tuning when it already computed them)."""
    start = time.perf_counter()
    trainer.save_checkpoint(run.checkpoint, weights_only=True)
    timings["checkpoint_s"] = time.perf_counter() - start
    image_t = float(model.model.image_threshold)
    start = time.perf_counter()
    if trainer.is_global_zero:
        train_records = model.train_records
        if train_records is None:
            train_records, _ = score_loader(model.model, datamodule.train_eval_dataloader(), model.device)
        write_jsonl(run.preds("train"), decorate(train_records, image_t))
    timings["score_train_s"] = time.perf_counter() - start


def write_fit_outputs(
    trainer: Trainer, model: AnomalyModule, datamodule, run: RunDir, config, timings: dict, tested: bool
) -> None:
    """After `fit` and its test pass (`tested`): metrics.json and per-split predictions of the test pass held in
    `model`, and meta.json (rank zero only)."""
    if not trainer.is_global_zero:
        return
    image_t = float(model.model.image_threshold)
    if tested:
        report = dict(model.test_report)
        write_json(run.metrics, report)
        records = decorate(model.test_collector.records, image_t)
        write_jsonl(run.preds("test"), [r for r in records if r["split"] == "test"])
        val = [r for r in records if r["split"] == "val"]
        if val:
            write_jsonl(run.preds("val"), val)
    else:
        log.warning("no test images: metrics.json not written")
    all_timings = {**model.timings, **timings}
    seed = config[config.subcommand].get("seed_everything") if "subcommand" in config else None
    meta = build_meta(
        seed=seed,
        device=str(model.device),
        data=datamodule.summary(),
        timings=all_timings,
        extra={"model": model.model_name, "run_id": run.path.name, "run_dir": str(run.path)},
    )
    write_json(run.meta, meta)
    log.info("run written to %s", run.path)


def write_eval_outputs(trainer: Trainer, model: AnomalyModule, run: RunDir, stage: str, name: str) -> None:
    """After a standalone `validate`/`test`: `<run>/eval/<name>/metrics.json` and predictions (`name`:
    `<stage>-<id>`, the same as the command's log folder)."""
    if not trainer.is_global_zero or run is None:
        return
    out = run.path / "eval" / name
    image_t = float(model.model.image_threshold)
    if stage == "test" and model.test_report:
        write_json(out / "metrics.json", model.test_report)
        write_jsonl(out / "preds_test.jsonl", decorate(model.test_collector.records, image_t))
    elif stage == "validate":
        write_json(out / "metrics.json", {"val": model.val_metrics})
        write_jsonl(out / "preds_val.jsonl", decorate(model.val_collector.records, image_t))
    log.info("evaluation written to %s", out)
