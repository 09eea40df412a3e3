"""Batches of `AnomalyDataset` items: the unreadable-image filter and the collate that keeps decoded originals."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import default_collate

log = logging.getLogger(__name__)

#: Item key of the decoded original image, (h, w, 3) uint8 RGB, present when the dataset keeps originals.
ORIGINAL_KEY = "original_rgb"


def readable_flags(batch: dict) -> list[bool]:
    """Per item of a collated batch: True when its image was read (empty `error`)."""
    errors = batch.get("error")
    if errors is None:
        return [True] * len(batch["image_path"])
    return [not e for e in errors]


def readable(batch: dict, what: str = "image") -> dict | None:
    """The batch restricted to its readable items (tensors indexed along dim 0, lists filtered), each unreadable
    one logged as a warning ("skipping unreadable <what>: <error>"); the batch itself when all are readable;
    None when none is.
    """
    ok = readable_flags(batch)
    if all(ok):
        return batch
    for err in batch["error"]:
        if err:
            log.warning("skipping unreadable %s: %s", what, err)
    if not any(ok):
        return None
    keep = torch.tensor(ok, dtype=torch.bool)
    return {
        k: (v[keep.to(v.device)] if isinstance(v, torch.Tensor) else [x for x, flag in zip(v, ok) if flag])
        for k, v in batch.items()
    }


def collate_keeping_originals(items: list[dict]) -> dict:
    """`default_collate` of dataset items, except that the decoded originals (`ORIGINAL_KEY`, images of any size)
    stay a list of numpy arrays (None for an unreadable image)."""
    originals = [item.pop(ORIGINAL_KEY, None) for item in items]
    batch = default_collate(items)
    batch[ORIGINAL_KEY] = originals
    return batch
