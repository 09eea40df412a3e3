"""The hot folder: watch a folder, judge each new image once it is complete, write the outputs of `aoi run`.

Events come from watchdog (inotify, FSEvents, ReadDirectoryChangesW) or, for network shares where those
events do not arrive, from watchdog's polling observer; a periodic rescan catches anything both missed.
Files wait in a `SettleTracker` until complete, then go through the model in batches with the folder
runner's pieces (`load_image`, the `Predictor`) and `PredictionOutputs` (one flushed line per image, mask and
overlay written before the line). `report.json` is rewritten atomically every `report_seconds` and on exit.

Restart safety: every line of `preds.jsonl` carries the file's `file_size` and `file_mtime_ns`; on start the
complete lines are kept (a torn last line is dropped) and a file whose (path, size, mtime) is already there is
not processed again (with a done folder it is only moved, finishing a move a stop interrupted). A new file
under a used name has another size or mtime and is processed, its mask and overlay under a name of its own.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aoi_lightning.data.image_io import is_image_file, list_images
from aoi_lightning.fileio import output_name
from aoi_lightning.inference.folder import LoadedImage, Predictor, load_image
from aoi_lightning.postprocess.outputs import OutputOptions, PredictionOutputs, finish_outputs, output_settings
from aoi_lightning.watch.settle import FileKey, SettleTracker

log = logging.getLogger(__name__)

#: Keys added to each `preds.jsonl` line of the hot folder: the processed file's size (bytes) and mtime (ns).
SIZE_KEY = "file_size"
MTIME_KEY = "file_mtime_ns"
#: Default error folder inside the done folder.
ERRORS_DIR = "errors"


@dataclass(frozen=True)
class WatchOptions:
    """How the folder is watched.

    Attributes:
        settle_seconds: size and mtime must stay unchanged this long before a file is taken.
        polling: poll the folder instead of waiting for file system events (network shares).
        poll_interval: seconds between two polls of the folder (with `polling`).
        recursive: also watch subfolders (the output, done and error folders are left out).
        batch_size: images per forward pass.
        report_seconds: `report.json` is rewritten at most this often while files keep coming, and when idle.
        max_idle_seconds: stop after this long with nothing to do (None: run until stopped).
        rescan_seconds: full listing of the folder this often, in case an event was lost.
    """

    settle_seconds: float = 2.0
    polling: bool = False
    poll_interval: float = 1.0
    recursive: bool = False
    batch_size: int = 8
    report_seconds: float = 5.0
    max_idle_seconds: float | None = None
    rescan_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("settle_seconds", "report_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("poll_interval", "rescan_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_idle_seconds is not None and not self.max_idle_seconds >= 0:
            raise ValueError(f"max_idle_seconds must be >= 0, got {self.max_idle_seconds}")


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or path.is_relative_to(folder))


class HotFolder:
    """Watches `input_dir` and writes `preds.jsonl`, `masks/`, `overlays/` and `report.json` into `output_dir`.

    Args:
        predictor: the model (`aoi_lightning.inference.folder.load_predictor`).
        input_dir: the watched folder.
        output_dir: results (created; earlier results of a stopped watcher are continued).
        output_options: what to write per image, as for `aoi run`.
        done_dir: processed files are moved here (None: they stay where they are).
        error_dir: unreadable files are moved here (default `<done_dir>/errors`; None without a done folder:
            they stay).
        options: watching options.
    """

    def __init__(
        self,
        predictor: Predictor,
        input_dir: str | Path,
        output_dir: str | Path,
        output_options: OutputOptions,
        done_dir: str | Path | None = None,
        error_dir: str | Path | None = None,
        options: WatchOptions = WatchOptions(),
    ) -> None:
        self.predictor = predictor
        self.input_dir = Path(input_dir).expanduser().resolve()
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.done_dir = Path(done_dir).expanduser().resolve() if done_dir else None
        if error_dir:
            self.error_dir: Path | None = Path(error_dir).expanduser().resolve()
        else:
            self.error_dir = self.done_dir / ERRORS_DIR if self.done_dir is not None else None
        for name, folder in (("done_dir", self.done_dir), ("error_dir", self.error_dir)):
            if folder is not None and folder == self.input_dir:
                raise ValueError(f"--{name} must differ from --input_dir ({folder})")
        self.options = options
        self.output_options = output_options
        self.tracker = SettleTracker(options.settle_seconds)
        self.outputs = PredictionOutputs(self.output_dir, predictor.facts, output_options, self.input_dir)
        self.records: list[dict] = []
        self.done_keys: set[FileKey] = set()
        self.done_paths: set[str] = set()  # lines without file keys (written by `aoi run`): matched by path
        self.path_counts: Counter[str] = Counter()
        self.processed = 0
        self._wake = threading.Event()
        self._rescan_requested = threading.Event()
        self._unmovable: set[FileKey] = set()
        self._report_dirty = False

    # -- which files -------------------------------------------------------------------------------------
    def _excluded_dirs(self) -> list[Path]:
        return [d for d in (self.output_dir, self.done_dir, self.error_dir) if d is not None]

    def wanted(self, path: Path) -> bool:
        """An image file of the watched folder (a subfolder only when recursive), not hidden, not in the output,
        done or error folder."""
        if not is_image_file(path) or path.name.startswith("."):
            return False
        if not self.options.recursive and path.parent != self.input_dir:
            return False
        if not path.is_relative_to(self.input_dir):
            return False
        return not any(_inside(path.parent, d) for d in self._excluded_dirs())

    def notice(self, path: str | Path) -> None:
        """A file system event on `path` (called from the observer thread)."""
        path = Path(path)
        if self.wanted(path):
            self.tracker.touch(path)
            self._wake.set()

    def rescan(self) -> int:
        """List the folder and track every image not processed yet; returns how many were added."""
        added = 0
        for path in list_images(self.input_dir, self.options.recursive):
            if not self.wanted(path):
                continue
            key = FileKey.of(path)
            if key is not None and self._is_done(key):
                if self.done_dir is not None and key not in self._unmovable:
                    self._move(key, self.done_dir)  # processed, but stopped before the move
                continue
            self.tracker.touch(path)
            added += 1
        return added

    def _is_done(self, key: FileKey) -> bool:
        return key in self.done_keys or key.path in self.done_paths

    # -- state from preds.jsonl ----------------------------------------------------------------------------
    def _resume(self) -> None:
        facts = self.predictor.facts
        settings = output_settings(facts, self.output_options, self.predictor.run_id, self.input_dir)
        self.outputs.open(resume=True, settings=settings)
        self.records = list(self.outputs.kept)
        for rec in self.records:
            path = str(rec.get("image_path"))
            self.path_counts[path] += 1
            if isinstance(rec.get(SIZE_KEY), int) and isinstance(rec.get(MTIME_KEY), int):
                self.done_keys.add(FileKey(path, rec[SIZE_KEY], rec[MTIME_KEY]))
            else:
                self.done_paths.add(path)
        if self.records:
            log.info("continuing %s: %d images already processed", self.outputs.jsonl_path, len(self.records))

    # -- processing ----------------------------------------------------------------------------------------
    def _name(self, key: FileKey) -> str | None:
        """Output name stem: the usual one for the first file under a path; for a later one (a new file under a
        used name) a suffix from its size and mtime, so the first file's mask and overlay stay."""
        if self.path_counts[key.path] == 0:
            return None
        digest = hashlib.sha1(f"{key.size}:{key.mtime_ns}".encode()).hexdigest()[:10]
        return f"{output_name(key.path, self.input_dir)}-{digest}"

    def _extra(self, key: FileKey) -> dict:
        return {SIZE_KEY: key.size, MTIME_KEY: key.mtime_ns}

    def _record(self, key: FileKey, record: dict, target: Path | None) -> None:
        self.records.append({**self._extra(key), **record})
        self.done_keys.add(key)
        self.path_counts[key.path] += 1
        self.processed += 1
        self._report_dirty = True
        if target is not None:
            self._move(key, target)

    def _move(self, key: FileKey, folder: Path) -> None:
        """Move a processed file into `folder` (keeping its subfolder when recursive); a free name
        (`name-1.png`, ...) when one of that name is already there. A failed move is logged once."""
        source = Path(key.path)
        rel = source.relative_to(self.input_dir)
        target = folder / rel
        n = 0
        while target.exists() or target.is_symlink():
            n += 1
            target = folder / rel.parent / f"{rel.stem}-{n}{rel.suffix}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
        except OSError as exc:
            if key not in self._unmovable:
                log.warning("cannot move %s to %s: %s", source, target.parent, exc.strerror or exc)
            self._unmovable.add(key)

    def _load(self, key: FileKey) -> LoadedImage | None:
        """Decode a settled file; None when it changed meanwhile or gets another settle period."""
        item = load_image(Path(key.path), self.predictor.preprocessing, self.output_options.save_overlays)
        now_key = FileKey.of(key.path)
        if now_key != key:  # written to while we read it: wait again (or gone)
            if now_key is not None:
                self.tracker.touch(key.path)
            return None
        if item.error and self.tracker.retry(key):
            log.info("not decodable yet, waiting another %.3g s: %s", self.options.settle_seconds, key.path)
            return None
        return item

    def process(self, keys: list[FileKey]) -> None:
        """Judge settled files (at most `batch_size`) and write their lines, masks and overlays."""
        batch: list[tuple[FileKey, LoadedImage]] = []
        for key in keys:
            if self._is_done(key):
                if self.done_dir is not None:
                    self._move(key, self.done_dir)
                continue
            item = self._load(key)
            if item is not None:
                batch.append((key, item))
        good = [(key, item) for key, item in batch if not item.error]
        scores = maps = None
        if good:
            scores, maps = self.predictor.predict(np.stack([item.model_input for _, item in good]))
        j = 0
        for key, item in batch:
            if item.error:
                record = self.outputs.write_error(key.path, item.error, extra=self._extra(key))
                self._record(key, record, self.error_dir)
                continue
            record = self.outputs.write(
                key.path,
                float(scores[j]),
                maps[j],
                item.original_size,
                image_rgb=item.original,
                extra=self._extra(key),
                name=self._name(key),
            )
            j += 1
            log.info(
                "%s %s (score %.4g, %d defects)", record["label"], key.path, record["pred_score"], record["num_defects"]
            )
            self._record(key, record, self.done_dir)

    def write_report(self) -> dict:
        """Rewrite `report.json` (atomically) from every line of `preds.jsonl`."""
        self._report_dirty = False
        return finish_outputs(self.output_dir, self.records, self.predictor.facts, self.predictor.run_id)

    # -- the loop ------------------------------------------------------------------------------------------
    def _observer(self, polling: bool):
        from watchdog.events import FileSystemEventHandler

        if polling:
            from watchdog.observers.polling import PollingObserver

            observer = PollingObserver(timeout=self.options.poll_interval)
        else:
            from watchdog.observers import Observer

            observer = Observer()
        hot = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.is_directory:
                    if event.event_type in ("created", "moved") and hot.options.recursive:
                        hot._rescan_requested.set()  # a folder moved in brings files without their own events
                        hot._wake.set()
                    return
                for attr in ("src_path", "dest_path"):
                    path = getattr(event, attr, "")
                    if path:
                        hot.notice(path if isinstance(path, str) else path.decode())

        observer.schedule(Handler(), str(self.input_dir), recursive=self.options.recursive)
        return observer

    def run(self, stop: threading.Event | None = None) -> dict:
        """Watch until `stop` is set (or `max_idle_seconds` pass with nothing to do); returns the last report.

        Raises:
            ValueError: the input folder is missing.
        """
        if not self.input_dir.is_dir():
            raise ValueError(f"--input_dir: folder not found: {self.input_dir}")
        stop = stop or threading.Event()
        opts = self.options
        tick = min(max(opts.settle_seconds / 4, 0.05), 0.5)
        polling = opts.polling
        observer = self._observer(polling)
        try:
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit, or a file system without events
            log.warning(
                "no file system events for %s (%s): polling every %.3g s", self.input_dir, exc, opts.poll_interval
            )
            polling = True
            observer = self._observer(polling)
            observer.start()
        try:
            self._resume()
            self.rescan()  # after the observer starts, so nothing arriving in between is missed
            log.info(
                "watching %s (%s), %d files waiting; results in %s",
                self.input_dir,
                "polling" if polling else "events",
                len(self.tracker),
                self.output_dir,
            )
            self.write_report()
            last_activity = last_report = last_rescan = time.monotonic()
            while not stop.is_set():
                ready = self.tracker.ready()
                for i in range(0, len(ready), opts.batch_size):
                    self.process(ready[i : i + opts.batch_size])
                    if stop.is_set():
                        for key in ready[i + opts.batch_size :]:
                            self.tracker.touch(key.path)  # not lost: a restart lists them again anyway
                        break
                    if self._report_dirty and time.monotonic() - last_report >= opts.report_seconds:
                        self.write_report()
                        last_report = time.monotonic()
                now = time.monotonic()
                busy = bool(ready) or len(self.tracker) > 0
                if busy:
                    last_activity = now
                if self._report_dirty and (not busy or now - last_report >= opts.report_seconds):
                    self.write_report()
                    last_report = now
                if self._rescan_requested.is_set() or now - last_rescan >= opts.rescan_seconds:
                    self._rescan_requested.clear()
                    self.rescan()
                    last_rescan = now
                if opts.max_idle_seconds is not None and not busy and now - last_activity >= opts.max_idle_seconds:
                    log.info("idle for %.3g s: stopping", opts.max_idle_seconds)
                    break
                self._wake.wait(tick)
                self._wake.clear()
        finally:
            observer.stop()
            observer.join(timeout=10)
            self.outputs.close()
        return self.write_report()
