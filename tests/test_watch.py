"""`aoi watch`: a real watcher process (torch blocked) on a folder that files are copied into."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.torchfree
pytest.importorskip("onnxruntime")
pytest.importorskip("watchdog")

from tiny_onnx import aoi_argv, image_png  # noqa: E402

from aoi_lightning.watch.settle import FileKey, SettleTracker  # noqa: E402


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line[-1:] == "\n"
    ]


def _report(out: Path) -> dict:
    """report.json as it is now (written atomically, so never half a file)."""
    path = out / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text(encoding="utf-8")[-3000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


class Watcher:
    """`aoi watch --backend onnx` in its own process, output in a log file (a pipe nobody reads would block it)."""

    def __init__(self, run: Path, inp: Path, out: Path, log: Path, *extra: object) -> None:
        self.log = log
        self.handle = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed in wait()
        argv = aoi_argv(
            "watch", "--model_dir", run, "--input_dir", inp, "--output_dir", out, "--backend", "onnx", *extra
        )
        self.proc = subprocess.Popen(argv, stdout=self.handle, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"watcher did not exit\n{self.log.read_text(encoding='utf-8')[-3000:]}") from None
        finally:
            self.handle.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.wait(60)


def test_settle_tracker_waits_for_a_stable_size_and_mtime(tmp_path: Path):
    now = [0.0]
    tracker = SettleTracker(1.0, clock=lambda: now[0])
    path = tmp_path / "a.png"
    path.write_bytes(b"abc")
    tracker.touch(path)
    assert tracker.ready() == []  # first sight: the settle period starts now
    now[0] = 0.9
    assert tracker.ready() == []
    with open(path, "ab") as handle:  # still being written
        handle.write(b"def")
    now[0] = 1.5
    assert tracker.ready() == []  # changed: starts again
    now[0] = 2.4
    assert tracker.ready() == []
    now[0] = 2.5
    assert tracker.ready() == [FileKey(str(path), 6, path.stat().st_mtime_ns)]
    assert len(tracker) == 0
    key = FileKey.of(path)
    assert tracker.retry(key) is True  # settled but did not decode: one more period
    now[0] = 3.4
    assert tracker.ready() == []
    now[0] = 3.5
    assert tracker.ready() == [key]
    assert tracker.retry(key) is False  # second failure: unreadable
    tracker.touch(tmp_path / "gone.png")
    assert tracker.ready() == [] and len(tracker) == 0  # vanished files are dropped


def test_present_files_done_and_error_folders_and_same_results_as_aoi_run(tiny_onnx_run: Path, tmp_path: Path):
    inp, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    inp.mkdir()
    images = {"ok_0.png": image_png(0, False), "ng_1.png": image_png(1, True)}
    for name, data in images.items():
        (inp / name).write_bytes(data)
    (inp / "bad.png").write_bytes(b"not an image at all")
    (inp / ".partial.png").write_bytes(image_png(2, True))  # hidden: a copy in progress under a temporary name
    (inp / "notes.txt").write_text("not an image", encoding="utf-8")
    w = Watcher(
        tiny_onnx_run, inp, out, tmp_path / "log.txt",
        "--done_dir", done, "--settle_seconds", "0.2", "--max_idle_seconds", "1",
    )  # fmt: skip
    assert w.wait() == 0, w.log.read_text(encoding="utf-8")[-3000:]

    records = {Path(r["image_path"]).name: r for r in _lines(out / "preds.jsonl")}
    assert sorted(records) == ["bad.png", "ng_1.png", "ok_0.png"]
    assert records["ok_0.png"]["label"] == "OK" and records["ok_0.png"]["num_defects"] == 0
    assert records["ng_1.png"]["label"] == "NG" and records["ng_1.png"]["num_defects"] == 1
    assert records["ng_1.png"]["image_size"] == [40, 48]
    assert records["bad.png"]["error"] and "pred_score" not in records["bad.png"]
    for name, data in images.items():
        rec = records[name]
        assert rec["image_path"] == str(inp.resolve() / name)
        assert rec["file_size"] == len(data)
        assert (out / rec["mask_path"]).is_file() and (out / rec["overlay_path"]).is_file()
    # processed files moved, the unreadable one into done/errors, everything else left alone
    assert sorted(p.name for p in done.iterdir()) == ["errors", "ng_1.png", "ok_0.png"]
    assert [p.name for p in (done / "errors").iterdir()] == ["bad.png"]
    assert sorted(p.name for p in inp.iterdir()) == [".partial.png", "notes.txt"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (report["num_images"], report["num_ok"], report["num_ng"], report["num_errors"]) == (2, 1, 1, 1)
    assert report["run_id"] == "tiny_onnx"

    # the same images through `aoi run`: the same scores and defects
    ref = tmp_path / "ref"
    res = subprocess.run(
        aoi_argv("run", "--model_dir", tiny_onnx_run, "--input_dir", done, "--output_dir", ref, "--backend", "onnx",
                 "--no_progress", "--recursive", "false"),  # done/errors/ holds the unreadable file
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    for r in _lines(ref / "preds.jsonl"):
        w_rec = records[Path(r["image_path"]).name]
        assert w_rec["pred_score"] == r["pred_score"]
        assert w_rec["defects"] == r["defects"]


def _write_slowly(path: Path, data: bytes, chunks: int, pause: float) -> None:
    step = -(-len(data) // chunks)
    with open(path, "wb") as handle:
        for i in range(0, len(data), step):
            handle.write(data[i : i + step])
            handle.flush()
            time.sleep(pause)


def test_500_files_some_written_slowly_with_a_restart_each_processed_once(tiny_onnx_run: Path, tmp_path: Path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    n, present = 500, 20
    data = {f"part_{i:04d}.png": image_png(i, i % 7 == 0) for i in range(n)}
    names = list(data)
    slow = set(names[present::10])  # 48 files written in 4 chunks with pauses shorter than the settle time
    for name in names[:present]:
        (inp / name).write_bytes(data[name])
    log = tmp_path / "log.txt"
    settle = ["--settle_seconds", "1.0", "--report_seconds", "0.5"]
    first = Watcher(tiny_onnx_run, inp, out, log, *settle)

    errors: list[BaseException] = []

    def writer(batch: list[str]) -> None:
        try:
            for name in batch:
                if name in slow:
                    _write_slowly(inp / name, data[name], chunks=4, pause=0.1)
                else:
                    (inp / name).write_bytes(data[name])
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    rest = names[present:]
    threads = [threading.Thread(target=writer, args=(rest[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: _report(out).get("num_images", 0) >= 100, 120, "report.json at 100", first.proc, log)
        _wait_for(lambda: len(_lines(out / "preds.jsonl")) >= 200, 120, "200 lines", first.proc, log)
        assert first.stop() == 0  # SIGTERM: finishes its batch and exits cleanly
        half = len(_lines(out / "preds.jsonl"))
        assert 200 <= half < n
        second = Watcher(tiny_onnx_run, inp, out, log, *settle, "--max_idle_seconds", "2")
    finally:
        for t in threads:
            t.join()
    assert not errors
    assert second.wait(180) == 0, log.read_text(encoding="utf-8")[-3000:]

    records = _lines(out / "preds.jsonl")
    counts = Counter(Path(r["image_path"]).name for r in records)
    assert set(counts) == set(names)
    assert max(counts.values()) == 1  # none repeated, none skipped
    assert not [r for r in records if "error" in r]
    for r in records:  # each judged on the complete file
        name = Path(r["image_path"]).name
        assert r["file_size"] == len(data[name]) == (inp / name).stat().st_size
        assert r["file_mtime_ns"] == (inp / name).stat().st_mtime_ns
        assert r["label"] == ("NG" if int(name[5:9]) % 7 == 0 else "OK")
    text = log.read_text(encoding="utf-8")
    assert "not decodable yet" not in text  # the settle rule alone held back the files being written
    assert text.count("aoi watch: ") == 2
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["num_images"] == n and report["num_errors"] == 0
    assert report["num_ng"] == sum(1 for i in range(n) if i % 7 == 0)
    assert len(list((out / "masks").iterdir())) == n and len(list((out / "overlays").iterdir())) == n


def test_killed_watcher_restarts_without_repeating_or_skipping(tiny_onnx_run: Path, tmp_path: Path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    names = [f"img_{i:03d}.png" for i in range(60)]
    for i, name in enumerate(names):
        (inp / name).write_bytes(image_png(i, i % 3 == 0))
    log = tmp_path / "log.txt"
    opts = ["--settle_seconds", "0.2", "--batch_size", "1"]
    first = Watcher(tiny_onnx_run, inp, out, log, *opts)
    _wait_for(lambda: len(_lines(out / "preds.jsonl")) >= 10, 120, "10 lines", first.proc, log)
    first.stop(signal.SIGKILL)  # no clean stop: at most the image in progress is lost, then redone
    assert len(_lines(out / "preds.jsonl")) < len(names)
    second = Watcher(tiny_onnx_run, inp, out, log, *opts, "--max_idle_seconds", "1")
    assert second.wait() == 0
    counts = Counter(Path(r["image_path"]).name for r in _lines(out / "preds.jsonl"))
    assert counts == Counter(names)


def test_a_new_file_under_a_used_name_is_processed_again_with_polling(tiny_onnx_run: Path, tmp_path: Path):
    inp, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    inp.mkdir()
    log = tmp_path / "log.txt"
    opts = ["--done_dir", done, "--polling", "true", "--poll_interval", "0.2", "--settle_seconds", "0.3"]
    w = Watcher(tiny_onnx_run, inp, out, log, *opts)
    try:
        (inp / "a.png").write_bytes(image_png(10, False))
        _wait_for(lambda: (done / "a.png").is_file(), 60, "the first a.png to be moved", w.proc, log)
        time.sleep(0.05)  # a later mtime even on coarse clocks
        second = image_png(11, True)
        (inp / "a.png").write_bytes(second)
        _wait_for(lambda: (done / "a-1.png").is_file(), 60, "the second a.png to be moved", w.proc, log)
    finally:
        assert w.stop() == 0
    records = _lines(out / "preds.jsonl")
    assert [r["image_path"] for r in records] == [str(inp.resolve() / "a.png")] * 2
    assert [r["label"] for r in records] == ["OK", "NG"]
    assert records[1]["file_size"] == len(second)
    assert records[0]["mask_path"] != records[1]["mask_path"]  # the first file's outputs are kept
    for r in records:
        assert (out / r["mask_path"]).is_file() and (out / r["overlay_path"]).is_file()
    assert (done / "a-1.png").read_bytes() == second

    # a restart with nothing new writes nothing
    again = Watcher(tiny_onnx_run, inp, out, log, *opts, "--max_idle_seconds", "0.5")
    assert again.wait() == 0
    assert len(_lines(out / "preds.jsonl")) == 2


def test_user_mistakes_are_one_line(tiny_onnx_run: Path, tmp_path: Path):
    res = subprocess.run(
        aoi_argv("watch", "--model_dir", tiny_onnx_run, "--input_dir", tmp_path / "missing", "--output_dir",
                 tmp_path / "out", "--backend", "onnx"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"aoi watch: error: --input_dir: folder not found: {tmp_path / 'missing'}"
    ]
    (tmp_path / "in").mkdir()
    res = subprocess.run(
        aoi_argv("watch", "--model_dir", tiny_onnx_run, "--input_dir", tmp_path / "in", "--output_dir",
                 tmp_path / "out", "--backend", "onnx", "--settle_seconds", "-1"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "aoi watch: error: --settle_seconds must be >= 0, got -1.0"
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path / "in") == []
    for out in (tmp_path / "in", tmp_path):  # the input folder itself, or a folder above it: nothing would be seen
        res = subprocess.run(
            aoi_argv("watch", "--model_dir", tiny_onnx_run, "--input_dir", tmp_path / "in", "--output_dir", out,
                     "--backend", "onnx", "--max_idle_seconds", "1"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            f"aoi watch: error: --output_dir {out} is --input_dir or holds it: the watcher leaves that folder out, "
            "so no image would ever be inspected; choose another folder (a subfolder of --input_dir is fine)"
        ]


def test_restart_with_other_settings_is_refused_and_keeps_the_results(tiny_onnx_run: Path, tmp_path: Path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "ng_1.png").write_bytes(image_png(1, True))
    first = Watcher(
        tiny_onnx_run, inp, out, tmp_path / "log1.txt", "--settle_seconds", "0.2", "--max_idle_seconds", "1"
    )
    assert first.wait() == 0, first.log.read_text(encoding="utf-8")[-3000:]
    before = (out / "preds.jsonl").read_bytes()
    res = subprocess.run(
        aoi_argv("watch", "--model_dir", tiny_onnx_run, "--input_dir", inp, "--output_dir", out, "--backend", "onnx",
                 "--min_defect_area", "9", "--max_idle_seconds", "1"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"aoi watch: error: {out} holds records made with other settings (min_defect_area 0 -> 9): continuing "
        "there would mix them in one preds.jsonl; use a new --output_dir, or the same settings"
    )
    assert (out / "preds.jsonl").read_bytes() == before
