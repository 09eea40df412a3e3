"""The audit log of `aoi serve`: one JSON line per answered prediction, flushed before the answer is sent.

Lines go to `<audit_dir>/audit-YYYY-MM-DD.jsonl` (UTC day). Each line is written with a single `write(2)` on a
file opened with `O_APPEND` under an exclusive `flock`, so lines of several worker processes never interleave
and a process killed at any moment leaves only complete lines. Files (and saved NG images) older than
`keep_days` are deleted when a new day's file is opened, so the log does not grow without bound.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import shutil
from pathlib import Path

from aoi_lightning.fileio import dumps

_DAY_FILE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})\.jsonl$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class AuditLog:
    """Appends audit lines to a per-day file in `folder`.

    Args:
        folder: the audit folder (created).
        keep_days: daily files kept (older ones are deleted when a new day starts); 0 keeps everything.
        fsync: also `fsync` each line (survives a power cut, not only a crash of the service; slower).
        save_ng_images: keep the uploaded bytes of NG images as `ng/YYYY-MM-DD/<request_id>.img`.
    """

    def __init__(self, folder: str | Path, keep_days: int = 30, fsync: bool = False, save_ng_images: bool = False):
        if keep_days < 0:
            raise ValueError(f"audit keep_days must be >= 0, got {keep_days}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep_days = keep_days
        self.fsync = fsync
        self.save_ng_images = save_ng_images
        self._day = ""
        self._fd = -1

    def path_for(self, day: str) -> Path:
        return self.folder / f"audit-{day}.jsonl"

    def _open(self, day: str) -> int:
        """The day's file, opened again when its name no longer leads to the open file (moved or deleted by log
        archiving: lines would go to a file nobody reads)."""
        if day == self._day and self._still_named():
            return self._fd
        new_day = day != self._day
        self.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path_for(day), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._day = day
        if new_day:
            self._prune(day)
        return self._fd

    def _still_named(self) -> bool:
        try:
            named, held = os.stat(self.path_for(self._day)), os.fstat(self._fd)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _prune(self, today: str) -> None:
        if self.keep_days == 0:
            return
        oldest = dt.date.fromisoformat(today) - dt.timedelta(days=self.keep_days - 1)
        for path in self.folder.iterdir():
            match = _DAY_FILE.match(path.name)
            if match and dt.date.fromisoformat(match.group(1)) < oldest:
                path.unlink(missing_ok=True)
        ng = self.folder / "ng"
        if ng.is_dir():
            for day_dir in ng.iterdir():
                if _DAY.match(day_dir.name) and dt.date.fromisoformat(day_dir.name) < oldest:
                    shutil.rmtree(day_dir, ignore_errors=True)

    def append(self, entry: dict, image_file: str | Path | None = None) -> dict:
        """Write one line: `request_id`, `time` (ISO 8601 UTC) and `entry`; returns what was written.

        A copy of `image_file` (the uploaded bytes) is saved first (when `save_ng_images` and the record is NG),
        so a line never names a missing file.
        """
        now = utc_now()
        day = now.date().isoformat()
        line = {"time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **entry}
        record = entry.get("record") or {}
        if self.save_ng_images and image_file is not None and record.get("label") == "NG":
            folder = self.folder / "ng" / day
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{entry['request_id']}.img"  # the server's request id, never a name from the request
            shutil.copyfile(image_file, folder / name)
            line["saved_image"] = f"ng/{day}/{name}"
        data = (dumps(line) + "\n").encode("utf-8")
        fd = self._open(day)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            written = os.write(fd, data)
            if written != len(data):  # a full disk: never leave half a line
                raise OSError(f"audit log: short write ({written} of {len(data)} bytes)")
            if self.fsync:
                os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return line

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._day = ""
