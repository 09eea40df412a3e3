"""Data set check of an MVTec AD style category: counts, image sizes and modes, mask problems, unreadable files."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from aoi_lightning.data.image_io import (
    GOOD,
    MAX_PIXELS,
    ImageReadError,
    binarise_mask,
    good_folder,
    image_header,
    is_good,
    is_image_file,
    mask_values,
    read_image_with_size,
)
from aoi_lightning.data.mvtec import DataError, list_images, masks_by_stem

log = logging.getLogger(__name__)

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass
class ImageFacts:
    """Size (h, w), mode ("RGB 8-bit", "L 16-bit", ...) and the read error ("" when readable) of one file."""

    path: Path
    size: tuple[int, int] | None
    mode: str | None
    error: str = ""


@dataclass
class GroupEntry:
    """One split/type folder: `train/good`, `test/good`, `test/<defect>`, with its images and masks."""

    split: str
    defect_type: str
    images: list[ImageFacts] = field(default_factory=list)
    masks: dict[str, Path | None] = field(default_factory=dict)  # image path -> mask path (defect folders)

    @property
    def name(self) -> str:
        return f"{self.split}/{self.defect_type}"


def inspect_image(path: Path) -> ImageFacts:
    """Decode once (any depth and channel count) for size and mode; the message of `read_image` on failure.
    Only images within `MAX_PIXELS` (by their header) are decoded unchanged; larger ones go through the bounded
    decoding of `read_image_with_size` (mode reported as "RGB 8-bit reduced")."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
        header = image_header(data) if data.size else None
        small = header is not None and header[1] * header[2] <= MAX_PIXELS
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if small else None
    except (OSError, cv2.error):
        small, image = False, None
    if image is None or image.size == 0:
        try:
            _, size = read_image_with_size(path)  # its one-line message; bounded for very large images
        except ImageReadError as exc:
            return ImageFacts(path, None, None, str(exc))
        if not small:
            return ImageFacts(path, size, "RGB 8-bit reduced")
        return ImageFacts(path, None, None, f"not decodable: {path}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    depth = {np.dtype(np.uint8): "8-bit", np.dtype(np.uint16): "16-bit"}.get(image.dtype, str(image.dtype))
    return ImageFacts(
        path, (int(image.shape[0]), int(image.shape[1])), f"{_MODES.get(channels, f'{channels}ch')} {depth}"
    )


#: Values of a mask that is not two-level listed in the report (the rest counted).
MAX_LISTED_VALUES = 16


def _mask_facts(path: Path) -> tuple[tuple[int, int] | None, bool, str, dict | None]:
    """(size (h, w), has defect pixels, error, levels) of a mask file, decoded once. `levels` describes a mask
    of more than two values (`path`, `num_values`, the first `values`, `defect_above`: the binarisation
    midpoint of `binarise_mask`), None for a two-level mask."""
    try:
        values = mask_values(path)
    except ImageReadError as exc:
        return None, False, str(exc), None
    mask = binarise_mask(values)
    levels = None
    distinct = np.unique(values)
    if distinct.size > 2:
        low, high = float(distinct[0]), float(distinct[-1])
        levels = {
            "path": str(path),
            "num_values": int(distinct.size),
            "values": [v.item() for v in distinct[:MAX_LISTED_VALUES]],
            "defect_above": (low + high) / 2,
        }
    return (int(mask.shape[0]), int(mask.shape[1])), bool(mask.any()), "", levels


def check_category(root: str | Path, category: str, mask_suffix: str = "_mask") -> tuple[dict, list[GroupEntry]]:
    """Check `<root>/<category>`; problems are listed, never raised (except a missing root or category).

    Returns:
        the report (JSON-ready; keys `counts`, `image_sizes`, `image_modes`, `aspect_ratio` (`aspect_ratios`),
        `masks`, `missing_masks`,
        `orphan_masks`, `mask_size_mismatch`, `empty_masks`, `multi_level_masks` (masks of more than two
        values, binarised by the rule of `binarise_mask`, with their values), `unreadable`, `ignored_files`, `problems`,
        `num_problems`) and the groups (for the preview).

    Raises:
        DataError: root or category folder not found.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--root: folder not found: {root}")
    base = root / category
    if not base.is_dir():
        cats = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"--category: {category!r} not found in {root}; available: {', '.join(cats) or 'none'}")
    groups: list[GroupEntry] = []
    ignored: list[str] = []
    problems: list[str] = []
    folders = [("train", good_folder(base / "train"))]
    test_dir = base / "test"
    if test_dir.is_dir():
        folders += [("test", p) for p in sorted(test_dir.iterdir()) if p.is_dir()]
    for split, folder in folders:
        if not folder.is_dir():
            problems.append(f"missing folder {folder}")
            continue
        entries = sorted(folder.iterdir())
        ignored += [str(p) for p in entries if p.is_file() and not is_image_file(p)]
        for sub in (p for p in entries if p.is_dir()):  # training and test read the top level only
            nested = len(list_images(sub, recursive=True))
            if nested:
                problems.append(
                    f"{nested} image(s) in the subfolder {sub} are not used (only the top level of {folder})"
                )
            ignored.append(f"{sub}/")
        kind = GOOD if is_good(folder.name) else folder.name
        groups.append(GroupEntry(split, kind, [inspect_image(p) for p in list_images(folder)]))
    gt_root = base / "ground_truth"
    missing, orphans, mismatch, empty, unreadable_masks, multi_level = [], [], [], [], [], []
    for group in groups:
        if group.split != "test" or group.defect_type == GOOD:
            continue
        masks, odd = masks_by_stem(gt_root / group.defect_type, mask_suffix)
        stems = {f.path.stem for f in group.images}
        for facts in group.images:
            mask = masks.get(facts.path.stem)
            group.masks[str(facts.path)] = mask
            if mask is None:
                missing.append(str(facts.path))
                continue
            size, has_defect, error, levels = _mask_facts(mask)
            if levels is not None:
                multi_level.append(levels)
            if error:
                unreadable_masks.append({"path": str(mask), "error": error})
            elif facts.size is not None and size != facts.size:
                mismatch.append(
                    {
                        "image": str(facts.path),
                        "mask": str(mask),
                        "image_size": list(facts.size),
                        "mask_size": list(size),
                    }
                )
            elif not has_defect:
                empty.append(str(mask))
        orphans += sorted([str(m) for stem, m in masks.items() if stem not in stems] + [str(m) for m in odd])
    if gt_root.is_dir():
        test_types = {g.defect_type for g in groups if g.split == "test"}
        for folder in sorted(p for p in gt_root.iterdir() if p.is_dir() and p.name not in test_types):
            orphans += [str(m) for m in list_images(folder)]
    unreadable = [{"path": str(f.path), "error": f.error} for g in groups for f in g.images if f.error]
    unreadable += unreadable_masks
    counts: dict[str, dict[str, int]] = {}
    for g in groups:
        split = counts.setdefault(g.split, {})
        split[g.defect_type] = split.get(g.defect_type, 0) + len(g.images)
    if not counts.get("train", {}).get(GOOD):
        problems.append(f"no training images in {good_folder(base / 'train')}")
    if not any(n for t, n in counts.get("test", {}).items()):
        problems.append(f"no test images in {test_dir}")
    problems += [f"defective image without mask: {p}" for p in missing]
    problems += [f"mask without image: {p}" for p in orphans]
    problems += [f"unreadable: {u['error']}" for u in unreadable]
    problems += [f"mask size {m['mask_size']} differs from image size {m['image_size']}: {m['mask']}" for m in mismatch]
    problems += [f"empty mask (no defect pixel): {p}" for p in empty]
    problems += [
        f"mask is not two-level ({m['num_values']} values: {_listed(m)}; defect above {m['defect_above']:g}): "
        f"{m['path']}"
        for m in multi_level
    ]
    report = {
        "root": str(root),
        "category": category,
        "mask_suffix": mask_suffix,
        "counts": counts,
        "num_images": sum(len(g.images) for g in groups),
        "image_sizes": {g.name: _tally(f"{f.size[1]}x{f.size[0]}" for f in g.images if f.size) for g in groups},
        "image_modes": {g.name: _tally(f.mode for f in g.images if f.mode) for g in groups},
        "aspect_ratio": aspect_ratios([f.size for g in groups for f in g.images if f.size]),
        "masks": {g.defect_type: sum(m is not None for m in g.masks.values()) for g in groups if g.masks},
        "missing_masks": missing,
        "orphan_masks": orphans,
        "mask_size_mismatch": mismatch,
        "empty_masks": empty,
        "multi_level_masks": multi_level,
        "unreadable": unreadable,
        "ignored_files": ignored,
        "problems": problems,
        "num_problems": len(problems),
    }
    return report, groups


#: Largest ratio between the widest and the narrowest image (width / height) still reported as one aspect ratio.
ASPECT_SPREAD = 1.1


def aspect_ratios(sizes: list[tuple[int, int]]) -> dict | None:
    """`min`, `median` and `max` of width / height over image sizes (h, w), and `varies`: the widest is more than
    ASPECT_SPREAD times the narrowest (then `data.resize: fit_pad` keeps each image's proportions). None without
    sizes."""
    ratios = sorted(w / h for h, w in sizes if h > 0 and w > 0)
    if not ratios:
        return None
    low, high = ratios[0], ratios[-1]
    return {
        "min": float(f"{low:.4g}"),
        "median": float(f"{float(np.median(ratios)):.4g}"),
        "max": float(f"{high:.4g}"),
        "varies": high > ASPECT_SPREAD * low,
    }


def _ratio(value: float) -> str:
    """Two decimals, or three significant digits for a very tall image (5 x 3000 is 0.00167, not 0.00)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def _listed(levels: dict) -> str:
    values = ", ".join(f"{v:g}" for v in levels["values"])
    return values + (", ..." if levels["num_values"] > len(levels["values"]) else "")


def _tally(values) -> dict[str, int]:
    return dict(Counter(values).most_common())


def summary_lines(report: dict) -> list[str]:
    """Short human-readable summary of a check report."""
    lines = [f"{report['root']}/{report['category']}: {report['num_images']} images"]
    for split, types in report["counts"].items():
        lines.append(f"  {split}: " + ", ".join(f"{t} {n}" for t, n in types.items()))
    sizes = Counter()
    modes = Counter()
    for tally in report["image_sizes"].values():
        sizes.update(tally)
    for tally in report["image_modes"].values():
        modes.update(tally)
    lines.append("  sizes: " + (", ".join(f"{s} ({n})" for s, n in sizes.most_common()) or "none"))
    lines.append("  modes: " + (", ".join(f"{m} ({n})" for m, n in modes.most_common()) or "none"))
    ratio = report.get("aspect_ratio")
    if ratio and ratio["varies"]:
        lines.append(
            f"  aspect ratio (width / height) varies: {_ratio(ratio['min'])} to {_ratio(ratio['max'])}, median "
            f"{_ratio(ratio['median'])}; `--data.resize fit_pad` keeps each image's proportions (docs/choosing.md)"
        )
    elif ratio:
        lines.append(f"  aspect ratio (width / height): {_ratio(ratio['median'])}")
    lines.append(
        f"  masks: {sum(report['masks'].values())} found, {len(report['missing_masks'])} missing, "
        f"{len(report['orphan_masks'])} orphan, {len(report['multi_level_masks'])} not two-level; "
        f"unreadable files: {len(report['unreadable'])}"
    )
    if report["problems"]:
        lines.append(f"{report['num_problems']} problem(s):")
        lines += [f"  - {p}" for p in report["problems"][:50]]
        if report["num_problems"] > 50:
            lines.append(f"  ... {report['num_problems'] - 50} more in data_check.json")
    else:
        lines.append("no problems found")
    return lines
