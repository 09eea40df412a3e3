"""The way of a request inside `aoi serve`, without a server: the gate hands the upload to the model worker as a
file of the service's own (and removes it once answered), and `FirstRequestLoop` forms batches from the first
request on. Runs in the torch-free line install too."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from aoi_lightning.serve.api import FirstRequestLoop, upload_path
from aoi_lightning.serve.gate import Gate, GateError, parse_options

pytestmark = pytest.mark.torchfree


class Counter:
    """A stand-in for the shared `multiprocessing.Value` of in-flight requests."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self):
        return self._lock


def png(height: int = 8, width: int = 12) -> bytes:
    ok, data = cv2.imencode(".png", np.full((height, width, 3), 90, np.uint8))
    assert ok
    return data.tobytes()


def call(gate: Gate, body: bytes, query: bytes = b"", content_type: bytes = b"image/png") -> tuple[int, dict, bytes]:
    """One POST /predict through `gate`; the status, headers and body of its answer."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": query,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
    }
    sent = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def make_gate(tmp_path, app) -> Gate:
    return Gate(app, None, 1 << 20, 10_000_000, 4, Counter(), str(tmp_path))


def test_gate_hands_the_upload_over_as_a_file_and_removes_it(tmp_path):
    image = png()
    seen = {}

    async def app(scope, receive, send):
        payload = json.loads((await receive())["body"])
        seen["payload"] = payload
        seen["file"] = upload_path(tmp_path, payload["request_id"]).read_bytes()  # there while the model works
        body = json.dumps({"ok": True}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    status, headers, _ = call(make_gate(tmp_path, app), image, b"filename=a%2Fb.png&min_defect_area=3")
    assert status == 200
    payload = seen["payload"]
    assert set(payload) == {"request_id", "filename", "options"}  # no image bytes in the JSON
    assert payload["request_id"] == headers["x-request-id"] and len(payload["request_id"]) == 32
    assert payload["filename"] == "b.png" and payload["options"]["min_defect_area"] == 3
    assert seen["file"] == image
    assert list(tmp_path.iterdir()) == []  # removed once the answer is sent


def test_gate_removes_the_upload_when_the_app_fails(tmp_path):
    async def app(scope, receive, send):
        assert len(list(tmp_path.iterdir())) == 1
        raise RuntimeError("model worker gone")

    with pytest.raises(RuntimeError):
        call(make_gate(tmp_path, app), png())
    assert list(tmp_path.iterdir()) == []


def test_gate_refusals_store_nothing(tmp_path):
    async def app(scope, receive, send):  # pragma: no cover - never reached
        raise AssertionError("a refused request reached the model")

    gate = make_gate(tmp_path, app)
    assert call(gate, b"not an image at all")[0] == 422
    assert call(gate, png(), b"pixel_threshold_mult=-1")[0] == 400
    assert call(gate, png(), content_type=b"application/json")[0] == 415
    assert call(gate, png(4000, 4000))[0] == 413  # 16 M pixels by its header
    assert list(tmp_path.iterdir()) == []


def test_gate_answers_507_when_the_upload_cannot_be_stored(tmp_path):
    async def app(scope, receive, send):  # pragma: no cover - never reached
        raise AssertionError("reached the model without its upload")

    status, _, body = call(make_gate(tmp_path / "missing", app), png())
    assert status == 507 and json.loads(body)["kind"] == "storage"


@pytest.mark.parametrize("bad", ["../" + "a" * 29, "A" * 32, "a" * 31, "a" * 33, "g" * 32, ""])
def test_upload_path_takes_only_request_ids(tmp_path, bad):
    with pytest.raises(ValueError):
        upload_path(tmp_path, bad)
    assert upload_path(tmp_path, "0123456789abcdef" * 2).parent == tmp_path


def lit_api(max_batch_size: int, batch_timeout: float):
    return SimpleNamespace(max_batch_size=max_batch_size, batch_timeout=batch_timeout, request_timeout=30, stream=False)


def request(uid: str):
    return (0, uid, time.monotonic(), {"request_id": uid})


def test_first_request_loop_takes_what_waits_up_to_the_batch_size():
    requests = queue.Queue()
    for uid in "abc":
        requests.put(request(uid))
    loop = FirstRequestLoop()
    batch, timed_out = loop.get_batch_requests(lit_api(2, 0.0), requests, None)
    assert [uid for _, uid, _ in batch] == ["a", "b"] and timed_out == []
    batch, _ = loop.get_batch_requests(lit_api(2, 0.0), requests, None)
    assert [uid for _, uid, _ in batch] == ["c"]  # alone: answered at once, no waiting for company


def test_first_request_loop_waits_for_a_request_then_for_batch_timeout(monkeypatch):
    monkeypatch.setattr(FirstRequestLoop, "idle_wait", 0.05)
    requests = queue.Queue()
    loop = FirstRequestLoop()
    assert loop.get_batch_requests(lit_api(8, 0.0), requests, None) == ([], [])  # nothing came

    def later():
        time.sleep(0.1)
        requests.put(request("second"))

    monkeypatch.setattr(FirstRequestLoop, "idle_wait", 5.0)
    requests.put(request("first"))
    threading.Thread(target=later).start()
    start = time.monotonic()
    batch, _ = loop.get_batch_requests(lit_api(8, 0.5), requests, None)
    assert [uid for _, uid, _ in batch] == ["first", "second"]  # the window opened with the first request
    assert time.monotonic() - start >= 0.45


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_defect_aera": "100"}, "unknown option 'min_defect_aera' (did you mean min_defect_area?)"),
        ({"pixel_treshold_mult": "5"}, "unknown option 'pixel_treshold_mult' (did you mean pixel_threshold_mult?)"),
        ({"pixel_threshold_mult": "1e308"}, "pixel_threshold_mult must be a positive number up to 1e+06"),
        ({"pixel_threshold_mult": "nan"}, "pixel_threshold_mult must be a positive number"),
        ({"min_defect_area": "-3"}, "min_defect_area must be >= 0"),
        ({"return_mask": "maybe"}, "return_mask must be true or false"),
    ],
)
def test_options_are_checked_by_name_and_range(fields, message):
    """A misspelt option is refused (it would be answered with the defaults), and the ranges are `aoi run`'s."""
    with pytest.raises(GateError) as caught:
        parse_options(fields)
    assert caught.value.status == 400 and caught.value.kind == "bad_option" and message in str(caught.value)
    assert parse_options({"filename": "a.png", "pixel_threshold_mult": "0.5", "return_mask": "yes"}) == {
        "pixel_threshold_mult": 0.5,
        "min_defect_area": 0,
        "return_mask": True,
        "return_overlay": False,
    }


def test_a_stalled_upload_holds_no_place_in_the_queue_and_times_out(tmp_path):
    """A client that sends its headers and then nothing (a hung camera PC, a half-open connection) gets 408
    after the body timeout, and meanwhile a full request passes even with a queue of one."""
    answered = []

    async def app(scope, receive, send):
        await receive()
        answered.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = Gate(app, None, 1 << 20, 10_000_000, 1, Counter(), str(tmp_path), body_timeout=0.5)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": b"",
        "headers": [(b"content-type", b"image/png"), (b"content-length", b"5000")],
    }

    async def stalled_receive():
        await asyncio.sleep(30)

    async def both():
        statuses = {}

        async def stalled():
            sent = []

            async def send(message):
                sent.append(message)

            await gate(scope, stalled_receive, send)
            statuses["stalled"] = next(m["status"] for m in sent if m["type"] == "http.response.start")

        async def normal():
            await asyncio.sleep(0.1)  # while the stalled one waits for its body
            statuses["normal"] = await asyncio.to_thread(call, gate, png())

        await asyncio.gather(stalled(), normal())
        return statuses

    statuses = asyncio.run(both())
    assert statuses["stalled"] == 408
    assert statuses["normal"][0] == 200 and answered == [True]
    assert gate.in_flight.value == 0 and list(tmp_path.iterdir()) == []


def test_the_frameworks_own_errors_get_the_services_error_form(tmp_path):
    """LitServe's 504 (the model did not answer in time) arrives as `{"detail": ...}`: the client gets the same
    one-line `{"error", "kind", "request_id"}` as for every other refusal, with the request id header."""

    async def app(scope, receive, send):
        await receive()
        body = b'{"detail":"Request timed out"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 504, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    status, headers, body = call(make_gate(tmp_path, app), png())
    answer = json.loads(body)
    assert status == 504 and answer["kind"] == "timeout" and "request timeout (30 s)" in answer["error"]
    assert answer["request_id"] == headers["x-request-id"] and int(headers["content-length"]) == len(body)
    assert list(tmp_path.iterdir()) == []
