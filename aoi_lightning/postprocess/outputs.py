"""Writing predictions into an output folder: `preds.jsonl` lines, `masks/`, `overlays/`, `report.json`.

Shared by the `aoi run` runner and the PredictionWriter callback, so both produce the same files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from aoi_lightning.fileio import dumps, output_name, read_json, read_jsonl, write_json, write_jsonl
from aoi_lightning.postprocess.prediction import ModelFacts, OutputOptions, postprocess_prediction
from aoi_lightning.postprocess.records import build_report, error_record, record_problem
from aoi_lightning.postprocess.render import save_mask_png, write_png

__all__ = [
    "ModelFacts",
    "OutputOptions",
    "PredictionOutputs",
    "ResumeError",
    "finish_outputs",
    "merge_rank_files",
    "output_settings",
]

log = logging.getLogger(__name__)

MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
PREDS_FILE = "preds.jsonl"
REPORT_JSON = "report.json"
#: What made the records of an output folder (model, thresholds, input folder, options); `--resume` checks it.
SETTINGS_FILE = "settings.json"


#: Recorded in settings.json but not compared on resume: the torch back end names the run by its folder, the ONNX
#: back ends by the name it had at export time, so a copied or renamed run would refuse a change of back end.
NOT_COMPARED = ("run_id",)


#: the lock file of a JSON Lines file while a run or a watcher writes it: `.<name>.lock` beside it
LOCK_SUFFIX = ".lock"


class OutputsInUse(ValueError):
    """Another process (an `aoi run` or `aoi watch`) writes into the same output folder."""


def lock_path(output_dir: Path, jsonl_name: str = PREDS_FILE) -> Path:
    """`<output_dir>/.<jsonl_name>.lock`, the lock file of a records file."""
    return output_dir / f".{jsonl_name}{LOCK_SUFFIX}"


def lock_output_dir(output_dir: Path, jsonl_name: str = PREDS_FILE) -> int | None:
    """An exclusive, non-blocking `flock` on `<output_dir>/.<jsonl_name>.lock` (one per records file: the ranks
    of a distributed predict write files of their own), held until the returned descriptor is closed (the system
    drops it when the process dies; `PredictionOutputs.close` also removes the file). None where `fcntl` does
    not exist (Windows).

    Raises:
        OutputsInUse: another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = os.open(lock_path(output_dir, jsonl_name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        raise OutputsInUse(
            f"{output_dir} is in use by another aoi run or aoi watch (pid {holder or '?'}): two writers would mix "
            "their records in one preds.jsonl; wait for it or choose another --output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode("ascii"))
    return fd


class ResumeError(ValueError):
    """`--resume` into an output folder whose records were made with other settings; the message is one line."""


def output_settings(facts: ModelFacts, options: OutputOptions, run_id: str, input_dir: str | Path | None) -> dict:
    """Everything that decides the records of an output folder: the model (name, category, thresholds, input
    size, resize mode; the run id for information), the input folder and the output options. Written to
    `settings.json`; the back end and device are not part of it (they give the same records to float rounding)."""
    return {
        "model": facts.model,
        "category": facts.category,
        "run_id": run_id,
        "image_threshold": facts.image_threshold,
        "pixel_threshold": facts.pixel_threshold,
        "input_size": list(facts.input_size),
        "resize": facts.resize,
        "input_dir": str(input_dir) if input_dir is not None else None,
        "pixel_threshold_mult": options.pixel_threshold_mult,
        "min_defect_area": options.min_defect_area,
        "save_masks": options.save_masks,
        "save_overlays": options.save_overlays,
    }


class PredictionOutputs:
    """Appends one complete, flushed JSON line per image to `jsonl_path` and writes its mask and overlay.

    The mask and overlay are written before the line, so a line never names a missing file; a crash loses
    at most the image in progress. Output names come from `output_name(image_path, input_root)`.
    """

    def __init__(
        self,
        output_dir: str | Path,
        facts: ModelFacts,
        options: OutputOptions,
        input_root: str | Path | None = None,
        jsonl_name: str = PREDS_FILE,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.facts = facts
        self.options = options
        self.input_root = input_root
        self.jsonl_path = self.output_dir / jsonl_name
        self._handle = None
        self._lock: int | None = None
        self.count = 0
        #: image paths already in preds.jsonl when resuming
        self.done: set[str] = set()
        #: the complete records kept from preds.jsonl when resuming, in file order
        self.kept: list[dict] = []

    def open(self, resume: bool = False, settings: dict | None = None, overwrite: bool = False) -> PredictionOutputs:
        """Create the folders and start an empty JSON Lines file; with `resume`, keep the complete lines of an
        earlier, interrupted run (a torn last line is dropped) and append after them (see `done`).

        Args:
            resume: keep the earlier lines.
            settings: `output_settings` of this run, written to `settings.json`. With `resume`, the earlier
                run's `settings.json` must hold the same values.
            overwrite: first remove an earlier run's results (`clear_results`), once the folder is locked.

        Raises:
            ResumeError: `resume` with records of other settings (nothing is changed on disk then).
            OutputsInUse: another process writes into the folder (`lock_output_dir`; released by `close`).
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_output_dir(self.output_dir, self.jsonl_path.name)
        try:
            self._open_locked(resume, settings, overwrite)
        except BaseException:  # nothing opened: the folder is free again
            self._release()
            raise
        return self

    def _open_locked(self, resume: bool, settings: dict | None, overwrite: bool) -> None:
        if overwrite and not resume:  # only under the lock: never the files of a run still writing
            clear_results(self.output_dir)
        if resume and settings is not None and self.jsonl_path.is_file():
            self._check_settings(settings)
        for sub, wanted in ((MASKS_DIR, self.options.save_masks), (OVERLAYS_DIR, self.options.save_overlays)):
            if wanted:
                (self.output_dir / sub).mkdir(exist_ok=True)
        if settings is not None:
            write_json(self.output_dir / SETTINGS_FILE, settings)
        self.done = set()
        self.kept = []
        if resume and self.jsonl_path.is_file():
            self.kept = read_jsonl(self.jsonl_path)
            for number, record in enumerate(self.kept, start=1):  # checked before any work, not after it
                problem = record_problem(record)
                if problem:
                    raise ResumeError(f"{self.jsonl_path} record {number}: {problem}; fix or remove that line")
            write_jsonl(self.jsonl_path, self.kept)  # atomically drops a torn last line
            self.done = {str(r.get("image_path")) for r in self.kept}
            self.count = len(self.kept)
        mode = "a" if resume else "w"
        self._handle = open(self.jsonl_path, mode, encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _check_settings(self, settings: dict) -> None:
        path = self.output_dir / SETTINGS_FILE
        if not path.is_file():
            if read_jsonl(self.jsonl_path):
                log.warning(
                    "%s has no %s (written by an older version): its settings cannot be checked",
                    self.output_dir,
                    SETTINGS_FILE,
                )
            return
        try:
            earlier = read_json(path)
        except (OSError, ValueError) as exc:
            raise ResumeError(f"--resume: cannot read {path} ({exc}); use a new --output_dir") from None
        earlier = earlier if isinstance(earlier, dict) else {}
        changed = [
            f"{key} {earlier.get(key)!r} -> {value!r}"
            for key, value in settings.items()
            if key not in NOT_COMPARED and earlier.get(key) != value
        ]
        if changed:
            raise ResumeError(
                f"{self.output_dir} holds records made with other settings ({'; '.join(changed)}): continuing there "
                "would mix them in one preds.jsonl; use a new --output_dir, or the same settings"
            )

    def _release(self) -> None:
        if self._lock is not None:  # the file goes with the lock (left behind only by a killed process: harmless)
            with contextlib.suppress(OSError):
                os.unlink(lock_path(self.output_dir, self.jsonl_path.name))
            os.close(self._lock)
            self._lock = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._release()

    def __enter__(self) -> PredictionOutputs:
        return self if self._handle is not None else self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _append(self, record: dict, extra: dict | None) -> None:
        if self._handle is None:
            raise RuntimeError("PredictionOutputs.open() was not called")
        line = {**(extra or {}), **record}
        self._handle.write(dumps(line) + "\n")
        self._handle.flush()
        self.count += 1

    def _file(self, sub: str, name: str) -> tuple[Path, str]:
        path = self.output_dir / sub / f"{name}.png"
        if path.parent != self.output_dir / sub:  # output_name never yields separators; belt and braces
            raise ValueError(f"unsafe output name {name!r}")
        return path, f"{sub}/{name}.png"

    def write(
        self,
        image_path: str,
        pred_score: float,
        anomaly_map: np.ndarray,
        original_size: tuple[int, int],
        gt_label: int | None = None,
        image_rgb: np.ndarray | None = None,
        extra: dict | None = None,
        name: str | None = None,
    ) -> dict:
        """Post-process one prediction (`postprocess_prediction`) and write its mask, overlay and line.

        Args:
            image_path: input file.
            pred_score: image score.
            anomaly_map: (H, W) map at the model's resolution.
            original_size: (h, w) of the original image.
            gt_label: 0/1 when known.
            image_rgb: (h, w, 3) uint8 original image for the overlay (no overlay when None).
            extra: keys stored in front of the record (e.g. a dataset index for merging); not part of it.
            name: file name stem of the mask and overlay (default `output_name(image_path, input_root)`); for a
                second file under the same path, whose outputs must not replace the first one's.

        Returns:
            the record.
        """
        opts = self.options
        result = postprocess_prediction(
            image_path,
            pred_score,
            anomaly_map,
            self.facts,
            opts,
            original_size,
            gt_label,
            image_rgb if opts.save_overlays else None,
        )
        record = result.record
        name = name or output_name(image_path, self.input_root)
        if opts.save_masks:
            path, record["mask_path"] = self._file(MASKS_DIR, name)
            save_mask_png(result.mask, original_size, path)
        if result.overlay is not None:
            path, record["overlay_path"] = self._file(OVERLAYS_DIR, name)
            write_png(path, result.overlay)
        self._append(record, extra)
        return record

    def write_error(self, image_path: str, error: str, extra: dict | None = None) -> dict:
        """Write the error line of an unreadable image."""
        record = error_record(image_path, error)
        log.warning("%s", record["error"])
        self._append(record, extra)
        return record


def finish_outputs(output_dir: str | Path, records: list[dict], facts: ModelFacts, run_id: str) -> dict:
    """Write `report.json` for `records` (the content of `preds.jsonl`) and return it."""
    report = build_report(records, facts.model, facts.category, run_id, facts.report_thresholds())
    write_json(Path(output_dir) / REPORT_JSON, report)
    return report


def merge_rank_files(output_dir: str | Path, rank_files: list[Path], order_key: str = "index") -> list[dict]:
    """Merge per-rank JSON Lines files into `preds.jsonl`, sorted and de-duplicated by `order_key`.

    The key is dropped from the merged records; the rank files are removed once `preds.jsonl` is written.
    """
    by_key: dict = {}
    for path in rank_files:
        if path.is_file():
            for rec in read_jsonl(path):
                by_key.setdefault(rec[order_key], rec)
    records = [{k: v for k, v in by_key[key].items() if k != order_key} for key in sorted(by_key)]
    write_jsonl(Path(output_dir) / PREDS_FILE, records)
    for path in rank_files:
        path.unlink(missing_ok=True)
    return records


def holds_results(output_dir: str | Path) -> bool:
    """Whether `output_dir` holds a non-empty `preds.jsonl` of an earlier run."""
    path = Path(output_dir) / PREDS_FILE
    return path.is_file() and path.stat().st_size > 0


def clear_results(output_dir: str | Path) -> None:
    """Remove what a run wrote into `output_dir`: preds.jsonl, report.json, settings.json and the PNGs of masks/
    and overlays/ (other files are left), so that no mask or overlay of an earlier run stays beside new records."""
    output_dir = Path(output_dir)
    for name in (PREDS_FILE, REPORT_JSON, SETTINGS_FILE):
        (output_dir / name).unlink(missing_ok=True)
    for sub in (MASKS_DIR, OVERLAYS_DIR):
        folder = output_dir / sub
        for png in folder.glob("*.png") if folder.is_dir() else ():
            png.unlink(missing_ok=True)
