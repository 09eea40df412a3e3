"""`aoi serve`: a real server process on 127.0.0.1 and a real HTTP client, on the tiny PatchCore run of conftest.

Records from POST /predict equal `aoi run`'s (both back ends), the dynamic batcher batches under load, audit
lines are complete and unique, every bad input gets its documented 4xx while /health keeps answering, the API
key is enforced, a SIGKILL under load leaves every answered request in the audit log, and SIGTERM stops it
cleanly.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from aoi_lightning.serve.audit import AuditLog
from aoi_lightning.serve.client import ServeClient, local_server
from aoi_lightning.serve.client import audit_lines as read_audit

VOLATILE = ("image_path", "mask_path", "overlay_path")
BLOCK_TORCH = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'lightning', 'pytorch_lightning', 'timm', 'kornia', 'torchmetrics'):\n"
    "    sys.modules[name] = None\n"
)


def running_server(model_dir: Path, backend: str, audit_dir: Path, *extra: str, api_key: str | None = None):
    """`aoi serve` on CPU in its own process group, its log beside the audit folder."""
    log = audit_dir.parent / f"server-{audit_dir.name}.log"
    return local_server(model_dir, backend, audit_dir, "--device", "cpu", *extra, api_key=api_key, log_path=log)


def audit_lines(audit_dir: Path) -> list[dict]:
    """Every audit line (asserts that no file ends in a torn line)."""
    try:
        return read_audit(audit_dir)
    except ValueError as exc:
        raise AssertionError(str(exc)) from exc


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def assert_close(a, b, where: str = "") -> None:
    """Equal structure and values, floats to rounding (batches of other sizes round differently)."""
    if isinstance(b, float) and not isinstance(a, bool):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), where
    elif isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for key in b:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_record(served: dict, written: dict) -> None:
    assert_close(strip(served), strip(written))


@pytest.fixture(scope="module")
def images(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images of each test folder of the tiny tree (good and every defect type)."""
    folder = tmp_path_factory.mktemp("serve_images")
    for sub in sorted(p for p in (tiny_mvtec_root / "synthetic" / "test").iterdir() if p.is_dir()):
        for image in sorted(sub.glob("*.png"))[:2]:
            (folder / f"{sub.name}_{image.name}").write_bytes(image.read_bytes())
    return folder


@pytest.fixture(scope="module")
def onnx_server(patchcore_run: Path, tmp_path_factory: pytest.TempPathFactory):
    assert (patchcore_run / "export" / "model.onnx").is_file()
    audit = tmp_path_factory.mktemp("onnx_server") / "audit"
    audit.mkdir()
    extra = ("--max_batch_size", "8", "--batch_timeout", "0.05", "--save_ng_images")
    with running_server(patchcore_run, "onnx", audit, *extra) as (client, _):
        yield client, audit


def test_onnx_records_masks_and_overlays_equal_aoi_run(onnx_server, patchcore_run, images, run_records, tmp_path):
    client, audit = onnx_server
    written = run_records(patchcore_run, "onnx", images, tmp_path / "run")
    assert len(written) == len(list(images.glob("*.png"))) >= 8
    for name, expected in written.items():
        answer = client.predict(
            (images / name).read_bytes(), "image/png", filename=name, return_mask=1, return_overlay="true"
        )
        assert answer.status == 200, answer.body
        body = answer.json()
        assert body["request_id"] == answer.headers["x-request-id"] and len(body["request_id"]) == 32
        assert body["image_path"] == name
        assert_same_record(
            {k: v for k, v in body.items() if k not in ("request_id", "mask_png", "overlay_png")}, expected
        )
        for key, rel in (("mask_png", expected["mask_path"]), ("overlay_png", expected["overlay_path"])):
            served = cv2.imdecode(np.frombuffer(base64.b64decode(body[key]), np.uint8), cv2.IMREAD_UNCHANGED)
            on_disk = cv2.imread(str(tmp_path / "run" / rel), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(served, on_disk)
    # options change the record as they change `aoi run`'s; multipart uploads carry them as form fields
    tuned = run_records(
        patchcore_run, "onnx", images, tmp_path / "tuned", "--pixel_threshold_mult", "0.9",
        "--min_defect_area", "3", "--no_save_masks", "--no_save_overlays",
    )  # fmt: skip
    for name, expected in tuned.items():
        answer = client.predict_multipart(
            (images / name).read_bytes(), filename=name, pixel_threshold_mult="0.9", min_defect_area="3"
        )
        assert answer.status == 200, answer.body
        body = answer.json()
        assert "mask_png" not in body and "overlay_png" not in body
        assert_same_record({k: v for k, v in body.items() if k != "request_id"}, expected)
    info = client.get("/info").json()
    assert info["backend"] == "onnx" and info["run_id"] == patchcore_run.name and info["input_size"] == [64, 64]
    assert info["resize"] == "stretch"
    import hashlib

    assert info["sha256"] == hashlib.sha256((patchcore_run / "export" / "model.onnx").read_bytes()).hexdigest()
    assert info["thresholds"]["image_threshold"] == pytest.approx(expected["image_threshold"])
    assert info["versions"]["torch_imported"] is False  # the ONNX worker never imports torch


def _documented_calls() -> list[tuple[str, str]]:
    """(language, code) of every code block of docs/serve.md's "Calling the service"."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text(encoding="utf-8")
    section = text.split("## Calling the service", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(sh|python)\n(.*?)```", section, flags=re.S)


def test_documented_curl_and_python_calls_answer_the_record(onnx_server, images, tmp_path):
    client, _ = onnx_server
    name = sorted(p.name for p in images.glob("*.png"))[-1]
    part = tmp_path / "part.png"
    shutil.copy(images / name, part)
    expected = client.predict(part.read_bytes(), "image/png", filename="part.png", min_defect_area=20).json()
    host, port = client.base_url.removeprefix("http://").split(":")
    calls = _documented_calls()
    assert [lang for lang, _ in calls] == ["sh", "sh", "python", "python"]
    for lang, code in calls:
        code = code.replace("http://127.0.0.1:8000", client.base_url).replace('"127.0.0.1", 8000', f'"{host}", {port}')
        if lang == "sh":
            if shutil.which("curl") is None:
                continue
            done = subprocess.run(
                ["bash", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                env={**os.environ, "AOI_SERVE_API_KEY": ""},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            assert answer["image_path"] == "part.png" and len(answer["request_id"]) == 32
            assert answer["label"] == expected["label"]
            if "min_defect_area=20" in code:
                assert_same_record(
                    {k: v for k, v in answer.items() if k != "request_id"},
                    {k: v for k, v in expected.items() if k != "request_id"},
                )
            else:  # multipart with return_mask
                assert base64.b64decode(answer["mask_png"]).startswith(b"\x89PNG")
        else:
            done = subprocess.run(
                [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.split()[0] in (expected["label"], "200")
            assert expected["label"] in done.stdout


def test_torch_records_equal_aoi_run(patchcore_run, images, run_records, tmp_path):
    written = run_records(patchcore_run, "torch", images, tmp_path / "run")
    audit = tmp_path / "audit"
    with running_server(patchcore_run, "torch", audit, "--max_batch_size", "4") as (client, _):
        with ThreadPoolExecutor(4) as pool:  # concurrent: batched answers must still go to the right request
            answers = list(pool.map(lambda n: (n, client.predict((images / n).read_bytes())), sorted(written)))
        for name, answer in answers:
            assert answer.status == 200, answer.body
            assert_same_record({k: v for k, v in answer.json().items() if k != "request_id"}, written[name])
        info = client.get("/info").json()
        assert info["backend"] == "torch" and info["model_file"] == "model.ckpt"
    lines = audit_lines(audit)
    assert sorted(line["request_id"] for line in lines) == sorted(a.json()["request_id"] for _, a in answers)


def test_concurrent_burst_batches_and_audits_every_answer_once(onnx_server, images):
    client, audit = onnx_server
    before = {line["request_id"] for line in audit_lines(audit)}
    payloads = [p.read_bytes() for p in sorted(images.glob("*.png"))]
    n = 200
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: client.predict(payloads[i % len(payloads)]), range(n)))
    assert [a.status for a in answers] == [200] * n
    ids = [a.json()["request_id"] for a in answers]
    assert len(set(ids)) == n
    lines = [line for line in audit_lines(audit) if line["request_id"] not in before]
    assert sorted(line["request_id"] for line in lines) == sorted(ids)  # none lost, none duplicated
    assert {line["record"]["label"] for line in lines} == {"OK", "NG"}
    by_id = {a.json()["request_id"]: a.json() for a in answers}
    sent = {a.json()["request_id"]: payloads[i % len(payloads)] for i, a in enumerate(answers)}
    for line in lines:
        assert line["record"] == {k: v for k, v in by_id[line["request_id"]].items() if k != "request_id"}
        if line["record"]["label"] == "NG":  # --save_ng_images: a copy of the upload, taken before it was removed
            assert (audit / line["saved_image"]).read_bytes() == sent[line["request_id"]]
        else:
            assert "saved_image" not in line
        assert line["model"]["backend"] == "onnx" and len(line["model"]["sha256"]) == 64
        assert line["time"].endswith("Z")
    text = client.get("/metrics").body.decode()
    samples = {}
    for row in text.splitlines():
        if row.startswith("aoi_serve_batch_size_") and not row.startswith("#"):
            name, value = row.rsplit(" ", 1)
            samples[name] = float(value)
    total, single = samples["aoi_serve_batch_size_count"], samples['aoi_serve_batch_size_bucket{le="1.0"}']
    assert total >= 1 and single < total, "no batch of more than one image under concurrent load"
    assert samples["aoi_serve_batch_size_sum"] >= n
    for stage in ("decode", "postprocess"):  # one observation per image: the latency can be broken down
        counts = [
            float(r.rsplit(" ", 1)[1]) for r in text.splitlines() if r.startswith(f"aoi_serve_{stage}_seconds_count")
        ]
        assert counts and counts[0] >= n, stage
    assert 'aoi_serve_verdicts_total{label="NG"}' in text and "aoi_serve_request_latency_seconds_bucket" in text
    assert "aoi_serve_queue_depth 0.0" in text


def png_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def test_bad_input_limits_and_api_key(patchcore_run, images, tmp_path):
    key = "s3cret-key-for-tests"
    audit = tmp_path / "audit"
    good = sorted(images.glob("*.png"))[0].read_bytes()
    bomb = png_bytes(np.zeros((1500, 1500), np.uint8))  # a few KB that decode to 2.25 M pixels
    assert len(bomb) < 20_000
    extra = ("--max_upload_mb", "0.05", "--max_image_pixels", "1000000", "--max_queue", "2", "--batch_timeout", "0.2")
    with running_server(patchcore_run, "onnx", audit, *extra, api_key=key) as (client, _):
        anonymous = ServeClient(client.base_url, timeout=30)
        wrong = ServeClient(client.base_url, api_key="s3cret-key-for-test", timeout=30)
        # the key: /health is open; everything else needs it
        assert anonymous.get("/health").status == 200
        for other in (anonymous, wrong):
            for answer in (other.predict(good), other.get("/info"), other.get("/metrics"), other.get("/ready")):
                assert answer.status == 401 and answer.json()["kind"] == "unauthorized"
        raw = {"Content-Type": "application/octet-stream"}
        bearer = client.request("POST", "/predict", good, {**raw, "Authorization": f"Bearer {key}", "X-API-Key": ""})
        assert bearer.status == 401  # an empty X-API-Key never matches
        bearer = ServeClient(client.base_url, timeout=30).request(
            "POST", "/predict", good, {**raw, "Authorization": f"Bearer {key}"}
        )
        assert bearer.status == 200
        assert [line["request_id"] for line in audit_lines(audit)] == [bearer.json()["request_id"]]

        cases = [
            ("empty body", client.predict(b""), 400, "empty_body"),
            ("not an image", client.predict(b"hello, not an image" * 10), 422, "not_an_image"),
            ("truncated", client.predict(good[: len(good) // 2]), 422, "not_an_image"),
            ("decompression bomb", client.predict(bomb), 413, "image_too_large"),
            ("too large upload", client.predict(good + b"\0" * 60_000), 413, "payload_too_large"),
            ("wrong content type", client.predict(good, "application/json"), 415, "unsupported_media_type"),
            ("form urlencoded", client.predict(good, "application/x-www-form-urlencoded"), 415, None),
            ("bad option", client.predict(good, pixel_threshold_mult="-1"), 400, "bad_option"),
            ("bad option", client.predict(good, min_defect_area="many"), 400, "bad_option"),
            ("form without file", client.predict_multipart(good, field="other"), 400, "bad_form"),
            ("misspelt option", client.predict(good, min_defect_aera="3"), 400, "bad_option"),
            ("no such route", client.get("/predicts"), 404, "not_found"),
            ("wrong method", client.get("/predict"), 405, "method_not_allowed"),
        ]
        for what, answer, status, kind in cases:
            assert answer.status == status, (what, answer.body)
            body = answer.json()
            assert b"\n" not in answer.body.strip() and body["error"], what
            assert kind is None or body["kind"] == kind, (what, body)
            assert client.get("/health").status == 200, what
        assert client.predict(good).status == 200  # still serving

        # a full queue answers 503 with Retry-After at once
        with ThreadPoolExecutor(24) as pool:
            burst = list(pool.map(lambda _: client.predict(good), range(48)))
        statuses = {a.status for a in burst}
        assert statuses <= {200, 503} and 503 in statuses and 200 in statuses
        refused = next(a for a in burst if a.status == 503)
        assert refused.headers["retry-after"] == "1" and refused.json()["kind"] == "queue_full"
        assert client.predict(good).status == 200
        text = client.get("/metrics").body.decode()
        assert 'aoi_serve_errors_total{kind="unauthorized"}' in text and 'kind="queue_full"' in text
    # only predictions that reached the model are audited: no line for the 401s or the gate's refusals
    lines = audit_lines(audit)
    answered = [line for line in lines if "record" in line]
    assert len(answered) == 3 + sum(a.status == 200 for a in burst)
    assert {line.get("error", "")[:20] for line in lines if "error" in line} <= {"not a readable image"}


def test_sigkill_under_load_keeps_every_answered_request(patchcore_run, images, tmp_path):
    audit = tmp_path / "audit"
    payloads = [p.read_bytes() for p in sorted(images.glob("*.png"))]
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hammer(k: int) -> None:
        for i in range(400):  # bounded even if the kill never comes
            if stop.is_set():
                return
            try:
                answer = client.predict(payloads[(i + k) % len(payloads)])
            except OSError:
                return
            if answer.status == 200:
                with lock:
                    answered.append(answer.json()["request_id"])

    with running_server(patchcore_run, "onnx", audit, "--max_batch_size", "8", "--audit_fsync", "true") as (
        client,
        proc,
    ):
        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(answered) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole service: API servers, model worker, manager
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len(answered) >= 100
    lines = audit_lines(audit)  # parses every line and checks there is no torn one
    logged = [line["request_id"] for line in lines]
    assert len(logged) == len(set(logged))
    assert set(answered) <= set(logged)


def test_sigterm_stops_the_service_cleanly(patchcore_run, images, tmp_path):
    """SIGTERM to the service (what systemd and Ctrl+C send) ends it with exit code 0, no traceback, and the
    answered request in the audit log."""
    audit = tmp_path / "audit"
    with running_server(patchcore_run, "onnx", audit) as (client, proc):
        assert client.predict(sorted(images.glob("*.png"))[0].read_bytes()).status == 200
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=45)
    assert code == 0
    log = (tmp_path / "server-audit.log").read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log and "error" not in log.lower(), log[-2000:]
    assert len(audit_lines(audit)) == 1


def test_a_killed_model_worker_stops_the_service_with_one_line(patchcore_run, tmp_path):
    """The system may end a model worker (out of memory): the service stops, with exit code 2 and one line
    saying so, not a traceback; a supervisor (systemd) then restarts it."""
    audit = tmp_path / "audit"
    with running_server(patchcore_run, "onnx", audit) as (client, proc):
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == proc.pid:  # the parent pid
                    children.append(stat.parent.name)
        workers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
        assert len(workers) == 1, children
        os.kill(int(workers[0]), signal.SIGKILL)
        code = proc.wait(timeout=60)
    assert code == 2
    log = (tmp_path / "server-audit.log").read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert (
        log.strip().splitlines()[-1]
        == "aoi serve: error: a model worker died (ended by the system?); the service stopped"
    )


def test_serve_modules_import_without_torch():
    code = BLOCK_TORCH + (
        "import aoi_lightning.commands.serve, aoi_lightning.serve.api, aoi_lightning.serve.app\n"
        "import aoi_lightning.serve.gate, aoi_lightning.serve.client, litserve, prometheus_client\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_serve_refuses_bad_arguments(aoi_cli, patchcore_run, tmp_path, capsys, monkeypatch):
    assert aoi_cli(["serve", "--model_dir", tmp_path / "missing"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert aoi_cli(["serve", "--model_dir", tmp_path, "--backend", "onnx"]) == 2
    assert "aoi export" in capsys.readouterr().err
    assert aoi_cli(["serve", "--model_dir", patchcore_run, "--host", "10.0.0.1"]) == 2
    assert "--host" in capsys.readouterr().err
    empty = tmp_path / "key.txt"
    empty.write_text("\n", encoding="utf-8")
    assert aoi_cli(["serve", "--model_dir", patchcore_run, "--api_key_file", empty]) == 2
    assert "is empty" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_damaged_run_is_refused_before_any_server_starts(aoi_cli, patchcore_run, tmp_path, capsys, backend):
    run = tmp_path / "run"
    shutil.copytree(patchcore_run, run)
    damaged = run / ("export/model.onnx" if backend == "onnx" else "weights/model.ckpt")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    assert aoi_cli(["serve", "--model_dir", run, "--backend", backend, "--port", "1"]) == 2
    captured = capsys.readouterr()
    assert "http://" not in captured.out  # nothing was started
    expected = "sha256 differs" if backend == "onnx" else "truncated or corrupt file"
    assert expected in captured.err and len(captured.err.strip().splitlines()) == 1


def test_mismatched_run_or_audit_folder_is_one_line_before_any_server_starts(
    aoi_cli, patchcore_run, padim_run, tmp_path, capsys
):
    """What only loading the model finds (a checkpoint of another model, export metadata that the graph's own
    contradicts) and an audit folder that is a file: one line, as `aoi run` says it, and nothing started."""
    swapped = shutil.copytree(patchcore_run, tmp_path / "swapped")
    shutil.copy(padim_run / "weights" / "model.ckpt", swapped / "weights" / "model.ckpt")
    relabelled = shutil.copytree(patchcore_run, tmp_path / "relabelled")
    meta_path = relabelled / "export" / "export_meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["run_id"] = "another-run"
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    (tmp_path / "afile").write_text("x")
    cases = [
        (swapped, "torch", [], "Padim"),
        (relabelled, "onnx", [], "another-run"),
        (patchcore_run, "onnx", ["--audit_dir", str(tmp_path / "afile")], "--audit_dir"),
    ]
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    cases.append((patchcore_run, "onnx", ["--port", str(holder.getsockname()[1])], "cannot listen on 127.0.0.1"))
    for run, backend, extra, expected in cases:
        assert aoi_cli(["serve", "--model_dir", run, "--backend", backend, "--device", "cpu", *extra]) == 2
        captured = capsys.readouterr()
        assert "http://" not in captured.out, expected  # nothing was started
        assert expected in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    holder.close()


def test_audit_log_keeps_days_and_ng_images(tmp_path, monkeypatch):
    import datetime as dt

    from aoi_lightning.serve import audit as audit_module

    day = [dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)]
    monkeypatch.setattr(audit_module, "utc_now", lambda: day[0])
    log = AuditLog(tmp_path, keep_days=2, save_ng_images=True)
    (tmp_path / "ng.upload").write_bytes(b"png-bytes")
    (tmp_path / "ok.upload").write_bytes(b"ok-bytes")
    log.append({"request_id": "a" * 32, "record": {"label": "NG"}}, image_file=tmp_path / "ng.upload")
    log.append({"request_id": "b" * 32, "record": {"label": "OK"}}, image_file=tmp_path / "ok.upload")
    assert (tmp_path / "ng" / "2026-01-01" / f"{'a' * 32}.img").read_bytes() == b"png-bytes"
    assert not list((tmp_path / "ng").rglob(f"{'b' * 32}*"))  # OK images are not kept
    for offset in (1, 2):
        day[0] = dt.datetime(2026, 1, 1 + offset, 0, 0, 1, tzinfo=dt.timezone.utc)
        log.append({"request_id": f"{offset}" * 32, "record": {"label": "OK"}})
    log.close()
    assert sorted(p.name for p in tmp_path.glob("audit-*.jsonl")) == [
        "audit-2026-01-02.jsonl",
        "audit-2026-01-03.jsonl",
    ]
    assert not (tmp_path / "ng" / "2026-01-01").exists()  # pruned with its day


def test_audit_log_follows_its_file_when_it_is_moved_or_deleted(tmp_path):
    """Log archiving moves or deletes the day's file: the next line goes to a new file under the day's name,
    not to the moved file or to a deleted inode nobody can read."""
    log = AuditLog(tmp_path / "audit")
    log.append({"request_id": "a" * 32})
    (day_file,) = (tmp_path / "audit").glob("audit-*.jsonl")
    day_file.rename(tmp_path / "archived.jsonl")
    log.append({"request_id": "b" * 32})
    assert [line["request_id"] for line in read_audit(tmp_path / "audit")] == ["b" * 32]
    shutil.rmtree(tmp_path / "audit")
    log.append({"request_id": "c" * 32})
    log.close()
    assert [line["request_id"] for line in read_audit(tmp_path / "audit")] == ["c" * 32]
    assert [json.loads(x)["request_id"] for x in (tmp_path / "archived.jsonl").read_text().splitlines()] == ["a" * 32]
