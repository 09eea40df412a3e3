"""Scoring a DataLoader with a fitted torch model outside a Trainer loop (train-set scores)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from aoi_lightning.data.batches import readable
from aoi_lightning.metrics.evaluation import content_pixels
from aoi_lightning.models.components.base import AnomalyTorchModel
from aoi_lightning.postprocess.prediction import content_score


@torch.inference_mode()
def score_loader(
    model: AnomalyTorchModel, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[list[dict], list[float]]:
    """Per-image records (image_path, gt_label, defect_type, split, pred_score) and the per-image map maxima, both
    over each image's content box (`evaluation.content_pixels`, `prediction.content_score`)."""
    records, map_max = [], []
    model.eval()
    for batch in loader:
        batch = readable(batch)
        if batch is None:
            continue
        out = model(batch["image"].to(device))
        scores = out.pred_score.float().cpu().tolist()
        maps = out.anomaly_map.float().cpu()[:, 0]
        contents = [content_pixels(batch, i, maps[i])[0] for i in range(maps.shape[0])]
        maxima = [float(c.max()) for c in contents]
        scores = [content_score(s, c, maps.shape) for s, c in zip(scores, contents)]
        for i, (score, peak) in enumerate(zip(scores, maxima)):
            label = int(batch["label"][i])
            records.append(
                {
                    "image_path": batch["image_path"][i],
                    "gt_label": label if label >= 0 else None,
                    "defect_type": batch["defect_type"][i],
                    "split": batch["split"][i],
                    "pred_score": score,
                }
            )
            map_max.append(peak)
    return records, map_max
