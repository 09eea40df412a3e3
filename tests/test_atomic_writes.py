"""Atomic JSON writes (`aoi_lightning.fileio`): a crash or a failure while writing leaves the old file or
the new one, never a mix; a failed write leaves no temporary file behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aoi_lightning import fileio as jsonio
from aoi_lightning.fileio import read_json, write_json

#: Rewrites report.json without end, alternating two versions of different sizes.
WRITER = (
    "import itertools, sys\n"
    "from aoi_lightning.fileio import write_json\n"
    "for i in itertools.count():\n"
    "    v = i % 2\n"
    "    write_json(sys.argv[1], {'version': v, 'payload': ('ab' if v else 'c') * 400_000})\n"
)


def _is_a_version(obj: dict) -> bool:
    return obj["payload"] == ("ab" if obj["version"] else "c") * 400_000


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_while_rewriting_leaves_a_complete_old_or_new_file(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    for delay in (0.05, 0.2, 0.4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert _is_a_version(read_json(path))
        visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
        assert visible == ["report.json"]  # an interrupted write leaves at most a hidden .tmp file


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch, failing) -> None:
    path = tmp_path / "thresholds.json"
    write_json(path, {"image_threshold": 1.0})
    if failing == "replace":
        monkeypatch.setattr(jsonio.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    else:
        monkeypatch.setattr(jsonio.os, "fsync", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        write_json(path, {"image_threshold": 2.0})
    assert json.loads(path.read_text(encoding="utf-8")) == {"image_threshold": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]


def test_json_files_are_strict_json(tmp_path: Path) -> None:
    path = write_json(tmp_path / "metrics.json", {"auroc": float("nan"), "f1": float("inf"), "n": 3})
    assert read_json(path) == {"auroc": None, "f1": None, "n": 3}
    assert "NaN" not in path.read_text(encoding="utf-8")
