"""The agreement check between a run's `thresholds.json` and the thresholds the model carries (torch-free).

The thresholds a model uses travel with it (checkpoint buffers, ONNX export metadata); `thresholds.json` beside
it is a copy for people and tools. A file that says otherwise (edited, or from another fit) is an error rather
than a silent choice between the two. Used by run loading (checkpoint), `aoi export` and the ONNX back end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from aoi_lightning.fileio import differing_value

THRESHOLD_NAMES = ("image_threshold", "pixel_threshold")


def check_thresholds_file(
    path: str | Path,
    model_thresholds: Mapping[str, float],
    mismatch: str,
    remedy: str,
    error: type[Exception] = ValueError,
    source: str | Path | None = None,
) -> dict | None:
    """Compare `thresholds.json` at `path` with the model's thresholds.

    Only the thresholds that are finite on the model side are compared (a model without tuned thresholds has
    nothing to disagree with); values agree within float32 round-off (`fileio.differing_value`).

    Args:
        path: the thresholds.json file; a missing file is not an error (returns None).
        model_thresholds: `image_threshold` / `pixel_threshold` of the model.
        mismatch: the words naming the model side in the message, e.g. "does not match the checkpoint's".
        remedy: what the user should do, appended to the message.
        error: the exception class raised (a `ValueError` subclass of the caller's command).
        source: the file the model's thresholds come from (checkpoint, export metadata), named in the message.

    Returns:
        the parsed file (a dict), or None when there is no file.

    Raises:
        error: unreadable file, not a JSON object, or a threshold that differs:
            "<path>: <key> <value in file> <mismatch> <model value> (<source>); <remedy>".
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        on_disk = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(on_disk, dict):
        raise error(f"{path} is not a thresholds file (expected a JSON object)")
    expected = {k: float(v) for k, v in model_thresholds.items() if v is not None and math.isfinite(float(v))}
    differing = differing_value(on_disk, expected)
    if differing is not None:
        key, found = differing
        where = f" ({source})" if source is not None else ""
        raise error(f"{path}: {key} {found} {mismatch} {expected[key]:.8g}{where}; {remedy}")
    return on_disk


def metrics_thresholds(metrics: Mapping) -> dict[str, float]:
    """The thresholds `metrics.json` says its metrics were computed at (`THRESHOLD_NAMES` with numeric values;
    empty when there are none or the entry is not an object)."""
    recorded = metrics.get("thresholds")
    if not isinstance(recorded, Mapping):
        return {}
    return {k: v for k, v in recorded.items() if k in THRESHOLD_NAMES and isinstance(v, (int, float))}
