"""`aoi check-data --root R --category C`: data set check, `data_check.json` and `preview.png`."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from aoi_lightning.data.check import GroupEntry, check_category, summary_lines
from aoi_lightning.data.image_io import ImageReadError, read_image, read_mask
from aoi_lightning.fileio import check_output_dir, write_json
from aoi_lightning.postprocess.render import write_png

MASK_COLOR = (0, 0, 255)  # BGR red
LABEL_WIDTH = 170


def _tile(image_path: Path, mask_path: Path | None, size: int) -> np.ndarray:
    """(size, size, 3) BGR tile: the image letterboxed, its mask outlined; grey with a note when unreadable."""
    tile = np.full((size, size, 3), 60, np.uint8)
    try:
        rgb = read_image(image_path)
    except ImageReadError:
        cv2.putText(tile, "unreadable", (8, size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        return tile
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (nw, nh), interpolation=cv2.INTER_AREA)
    if mask_path is not None:
        try:
            mask = cv2.resize(read_mask(mask_path), (nw, nh), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(small, contours, -1, MASK_COLOR, 2, cv2.LINE_AA)
        except ImageReadError:
            cv2.putText(small, "bad mask", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, MASK_COLOR, 1, cv2.LINE_AA)
    y, x = (size - nh) // 2, (size - nw) // 2
    tile[y : y + nh, x : x + nw] = small
    return tile


def evenly(items: list, k: int) -> list:
    """`k` items spread evenly over the list (all of them when there are at most `k`)."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(k - 1, 1))] for i in range(k)]


def render_preview(groups: list[GroupEntry], title: str, samples: int = 6, tile: int = 160) -> np.ndarray:
    """Grid (BGR uint8): one row per split/defect type with its name and count, `samples` tiles a row."""
    gap = 4
    width = LABEL_WIDTH + samples * (tile + gap)
    rows = [np.full((36, width, 3), 255, np.uint8)]
    cv2.putText(rows[0], title, (8, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for group in groups:
        row = np.full((tile + gap, width, 3), 255, np.uint8)
        cv2.putText(row, group.name, (6, tile // 2 - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(
            row,
            f"{len(group.images)} images",
            (6, tile // 2 + 16),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (90, 90, 90),
            1,
            cv2.LINE_AA,
        )
        for i, facts in enumerate(evenly(group.images, samples)):
            x = LABEL_WIDTH + i * (tile + gap)
            row[:tile, x : x + tile] = _tile(facts.path, group.masks.get(str(facts.path)), tile)
        rows.append(row)
    return np.vstack(rows)


def check_data(
    root: str,
    category: str,
    mask_suffix: str = "_mask",
    output_dir: str = ".",
    samples: int = 6,
    tile_size: int = 160,
    strict: bool = False,
) -> int:
    """Check an MVTec AD style category and draw a preview.

    Counts per split and defect type, image sizes and modes, missing and orphan masks, unreadable files (listed,
    not fatal). Writes data_check.json and preview.png (samples of each split/defect type, masks outlined in red)
    into OUTPUT_DIR.

    Args:
        root: data root holding <category>/train, test, ground_truth.
        category: category folder under ROOT.
        mask_suffix: suffix of mask file stems (000_mask.png).
        output_dir: folder for data_check.json and preview.png (default: the current folder).
        samples: samples per split/defect type in the preview (>= 1).
        tile_size: preview tile size in pixels (>= 32).
        strict: exit with code 1 when problems are found.

    Returns:
        0, or 1 with `strict` when problems were found.

    Raises:
        ValueError: a value out of range, a missing root or category (one line).
    """
    if samples < 1 or tile_size < 32:
        raise ValueError("--samples must be >= 1 and --tile_size >= 32")
    out = check_output_dir(output_dir)
    report, groups = check_category(root, category, mask_suffix)
    title = f"{category}: samples per split/defect type (masks outlined in red)"
    preview = write_png(out / "preview.png", render_preview(groups, title, samples, tile_size))
    report["preview"] = str(preview)
    write_json(out / "data_check.json", report)
    print("\n".join(summary_lines(report)))
    print(f"wrote {out / 'data_check.json'} and {preview}")
    if report["num_problems"]:
        print(f"aoi check-data: {report['num_problems']} problem(s) found", file=sys.stderr)
    return 1 if strict and report["num_problems"] else 0
