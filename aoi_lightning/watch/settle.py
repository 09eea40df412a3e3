"""When is a file in a hot folder complete? Its size and modification time have stayed the same for
`settle_seconds` (observed by the watcher, never inferred from the file's own time stamp, which a copy may
preserve and a network share may skew), and then it decodes (checked by the watcher).

A file that settles but does not decode gets one more settle period before it is declared unreadable, so a
writer that pauses longer than `settle_seconds` half-way is not punished at once.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileKey:
    """What identifies one version of a file: its path, size in bytes and modification time in ns.

    A new file under a name used before (e.g. after the old one was moved to the done folder) has another
    key, so it is processed again; the same file seen again after a restart has the same key and is not.
    """

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> FileKey | None:
        """The key of a regular file (links followed); None when it is missing or not a regular file."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return cls(str(path), st.st_size, st.st_mtime_ns)


@dataclass
class _Pending:
    key: FileKey | None
    changed_at: float
    first_seen: float
    failures: int = 0


class SettleTracker:
    """Files waiting to be complete. Thread-safe: an observer thread calls `touch`, the worker calls `ready`.

    Args:
        settle_seconds: how long size and modification time must stay unchanged.
        clock: monotonic clock in seconds (a fake one in tests).
    """

    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not settle_seconds >= 0:
            raise ValueError(f"settle_seconds must be >= 0, got {settle_seconds}")
        self.settle_seconds = float(settle_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._failed: dict[str, _Pending] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def touch(self, path: str | Path) -> None:
        """Note that `path` appeared or changed (it is stat-ed at the next `ready`)."""
        path = str(path)
        with self._lock:
            if path not in self._pending:
                now = self._clock()
                self._pending[path] = _Pending(None, now, now)

    def retry(self, key: FileKey) -> bool:
        """Put back a settled file that did not decode, for one more settle period; False when it already had
        its second chance (it is then unreadable and no longer tracked)."""
        with self._lock:
            entry = self._failed.get(key.path)
            failures = entry.failures + 1 if entry is not None and entry.key == key else 1
            if failures > 1:
                self._failed.pop(key.path, None)
                return False
            now = self._clock()
            pending = _Pending(key, now, now, failures)
            self._pending[key.path] = pending
            self._failed[key.path] = pending
            return True

    def forget(self, path: str | Path) -> None:
        """Stop tracking `path` (and its decode failures)."""
        with self._lock:
            self._pending.pop(str(path), None)
            self._failed.pop(str(path), None)

    def ready(self) -> list[FileKey]:
        """Stat every pending file; return (and stop tracking) those unchanged for `settle_seconds`, oldest
        first. Vanished files are dropped; a file that changed restarts its settle period."""
        with self._lock:
            paths = list(self._pending)
        now = self._clock()
        out: list[tuple[float, FileKey]] = []
        for path in paths:
            key = FileKey.of(path)
            with self._lock:
                entry = self._pending.get(path)
                if entry is None:
                    continue
                if key is None:
                    del self._pending[path]
                    continue
                if entry.key != key:
                    entry.key, entry.changed_at = key, now
                    continue
                if now - entry.changed_at >= self.settle_seconds:
                    del self._pending[path]
                    out.append((entry.first_seen, key))
        out.sort(key=lambda item: (item[0], item[1].path))
        return [key for _, key in out]
