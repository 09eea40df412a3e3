"""The ASGI middleware in front of every route of `aoi serve`: API key, request checks, bounded queue, metrics.

For `POST /predict` it reads the body (at most `max_body_bytes`), takes the image from a raw body
(`application/octet-stream`, `image/*`) or a multipart upload (field `image` or `file`), checks the options
and the image header (`image_header`: no pixel is decoded), writes the image bytes to
`<upload_dir>/<request_id>.img` (`api.upload_path`: a name of the server's, never one from the request) and hands
LitServe a small JSON payload `{"request_id", "filename", "options"}`. The model worker decodes that file, and the
gate deletes it once the answer has been sent: the image never goes through JSON, base64 or LitServe's queues.
Every refusal is a one-line JSON error:

| status | kind | when |
|---|---|---|
| 400 | empty_body, bad_option, bad_form | no bytes; an option out of range; a multipart form without an image |
| 401 | unauthorized | a key is configured and the request has none or a wrong one (`/health` excepted) |
| 413 | payload_too_large, image_too_large | body over the upload limit; image header over the pixel limit |
| 415 | unsupported_media_type | a content type other than raw bytes, `image/*` or multipart |
| 422 | not_an_image | not a PNG/JPEG/BMP/TIFF/WebP header (the worker answers 422 for truncated/corrupt ones) |
| 408 | upload_timeout | the body did not arrive within the body timeout (`--request_timeout`) |
| 503 | queue_full | `max_queue` requests already waiting (with `Retry-After`) |
| 404, 405, 504 | not_found, method_not_allowed, timeout | the framework's own answers, in this form |
| 507 | storage | the upload could not be stored for the model worker (disk full) |
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl

from aoi_lightning.data.image_io import image_header
from aoi_lightning.postprocess.prediction import OutputOptions
from aoi_lightning.serve.api import error_body, upload_path
from aoi_lightning.serve.metrics import metrics

RAW_TYPES = ("application/octet-stream", "image/")
KNOWN_ROUTES = ("/predict", "/health", "/ready", "/info", "/metrics")
#: answers of FastAPI/LitServe themselves (`{"detail": ...}`), given the service's one-line JSON error form
FRAMEWORK_ERRORS = {
    404: ("not_found", "no route {path}: the service answers /predict, /health, /ready, /info and /metrics"),
    405: ("method_not_allowed", "{method} is not allowed on {path}"),
    504: ("timeout", "the model did not answer within the request timeout ({timeout:g} s)"),
}
REPLACED_HEADERS = (b"content-type", b"content-length")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _replay_once(body: bytes, after):
    """An ASGI `receive` that hands over the already read `body` once, then defers to `after()`."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await after()

    return receive


async def _disconnected() -> dict:
    return {"type": "http.disconnect"}


class GateError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


#: the options of `POST /predict` (query parameters or form fields), besides `filename`
OPTIONS = ("pixel_threshold_mult", "min_defect_area", "return_mask", "return_overlay")


def parse_options(fields: dict[str, str]) -> dict:
    """`pixel_threshold_mult` (> 0, at most `MAX_PIXEL_THRESHOLD_MULT`), `min_defect_area` (>= 0), `return_mask`,
    `return_overlay` (booleans) from query or form fields; GateError 400 for a bad value or an unknown name (a
    misspelt option would otherwise be answered with the defaults)."""
    unknown = sorted(set(fields) - set(OPTIONS) - {"filename"})
    if unknown:
        close = difflib.get_close_matches(unknown[0], OPTIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise GateError(
            400, "bad_option", f"unknown option {unknown[0]!r}{hint}; options: {', '.join(OPTIONS)}, filename"
        )
    opts: dict = {"pixel_threshold_mult": 1.0, "min_defect_area": 0, "return_mask": False, "return_overlay": False}
    try:
        if "pixel_threshold_mult" in fields:
            opts["pixel_threshold_mult"] = float(fields["pixel_threshold_mult"])
        if "min_defect_area" in fields:
            opts["min_defect_area"] = int(fields["min_defect_area"])
        OutputOptions(opts["pixel_threshold_mult"], opts["min_defect_area"])  # the ranges `aoi run` accepts
    except ValueError as exc:
        raise GateError(400, "bad_option", f"bad option value: {exc}") from exc
    for key in ("return_mask", "return_overlay"):
        value = str(fields.get(key, "")).strip().lower()
        if value not in TRUE + FALSE:
            raise GateError(400, "bad_option", f"{key} must be true or false, got {value!r}")
        opts[key] = value in TRUE
    return opts


class Gate:
    """Pure ASGI middleware (see the module docstring).

    Args:
        app: the LitServe FastAPI app.
        api_key: the key every request but `/health` must carry (`X-API-Key: KEY` or `Authorization: Bearer KEY`);
            None: no key.
        max_body_bytes: largest request body.
        max_image_pixels: largest image (height x width, from its header) accepted for decoding.
        max_queue: `/predict` requests accepted and not yet answered, over all API-server processes.
        in_flight: a shared `multiprocessing.Value("i")` counting them (shared by the forked API servers).
        upload_dir: folder the uploads are handed to the model workers in (`upload_path`).
        body_timeout: seconds a request's body may take to arrive (408 after); only then does it take a place in
            the queue.
    """

    def __init__(
        self,
        app,
        api_key,
        max_body_bytes: int,
        max_image_pixels: int,
        max_queue: int,
        in_flight,
        upload_dir: str,
        body_timeout: float = 30.0,
    ):
        self.app = app
        self.upload_dir = Path(upload_dir)
        self.body_timeout = body_timeout
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_image_pixels = max_image_pixels
        self.max_queue = max_queue
        self.in_flight = in_flight
        self.metrics = metrics()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in KNOWN_ROUTES else "other"
        start = time.perf_counter()
        status_seen = {"code": 500}
        request_id = uuid.uuid4().hex if path == "/predict" else None

        held: dict = {}  # the start of a framework's own error answer, rewritten once its body is complete

        async def send_wrapped(message) -> None:
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
                if request_id is not None:
                    headers = list(message.get("headers", []))
                    if not any(k.lower() == b"x-request-id" for k, _ in headers):
                        headers.append((b"x-request-id", request_id.encode()))
                    message = {**message, "headers": headers}
                if message["status"] in FRAMEWORK_ERRORS:
                    held["start"] = message
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                if message.get("more_body", False):
                    return
                status = held["start"]["status"]
                kind, text = FRAMEWORK_ERRORS[status]
                text = text.format(path=path, method=scope.get("method"), timeout=self.body_timeout)
                answer = error_body(status, kind, text, request_id)
                headers = [(k, v) for k, v in held.pop("start")["headers"] if k.lower() not in REPLACED_HEADERS]
                headers += [(k, v) for k, v in answer.raw_headers if k.lower() in REPLACED_HEADERS]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": answer.body})
                return
            await send(message)

        counted = False
        try:
            if path != "/health" and self.api_key is not None and not self._authorized(scope):
                raise GateError(401, "unauthorized", "missing or wrong API key (send X-API-Key: <key>)")
            if path != "/predict" or scope.get("method") != "POST":
                await self.app(scope, receive, send_wrapped)
                return
            # the body first, within `body_timeout`: a stalled or slow client holds no place in the queue
            try:
                data, payload = await asyncio.wait_for(self._payload(scope, receive, request_id), self.body_timeout)
            except asyncio.TimeoutError:
                raise GateError(
                    408, "upload_timeout", f"the upload did not arrive within {self.body_timeout:g} s"
                ) from None
            with self.in_flight.get_lock():
                if self.in_flight.value >= self.max_queue:
                    raise GateError(
                        503, "queue_full", f"busy: {self.max_queue} requests waiting, retry later", {"Retry-After": "1"}
                    )
                self.in_flight.value += 1
                counted = True
            self.metrics.queue_depth.inc()
            try:
                with open(upload_path(self.upload_dir, request_id), "xb") as handle:  # a fresh name, never followed
                    handle.write(data)
            except OSError as exc:
                raise GateError(507, "storage", f"cannot store the upload: {exc.strerror or exc}") from exc
            del data
            body = json.dumps(payload).encode("utf-8")
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            inner = {**scope, "headers": headers, "query_string": b""}
            await self.app(inner, _replay_once(body, receive), send_wrapped)
        except GateError as exc:
            self.metrics.errors.labels(exc.kind).inc()
            status_seen["code"] = exc.status
            response = error_body(exc.status, exc.kind, str(exc), request_id, exc.headers)
            await response(scope, receive, send)
        finally:
            if request_id is not None:
                with contextlib.suppress(OSError):
                    os.unlink(upload_path(self.upload_dir, request_id))
            if counted:
                with self.in_flight.get_lock():
                    self.in_flight.value -= 1
                self.metrics.queue_depth.dec()
            self.metrics.requests.labels(route, str(status_seen["code"])).inc()
            if route == "/predict":
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _authorized(self, scope) -> bool:
        given = b""
        for key, value in scope.get("headers", []):
            name = key.lower()
            if name == b"x-api-key":
                given = value.strip()
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        return hmac.compare_digest(given, self.api_key)

    async def _read_body(self, scope, receive) -> bytes:
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise GateError(400, "bad_request", "invalid Content-Length header") from None
                if declared > self.max_body_bytes:
                    raise GateError(413, "payload_too_large", f"upload over {self.max_body_bytes} bytes")
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise GateError(400, "bad_request", "client disconnected")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                raise GateError(413, "payload_too_large", f"upload over {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _payload(self, scope, receive, request_id: str) -> tuple[bytes, dict]:
        """The checked image bytes of a request and the JSON payload for LitServe (GateError for a refusal)."""
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        fields = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        multipart = content_type == "multipart/form-data"
        if not multipart and content_type and not content_type.startswith(RAW_TYPES):
            raise GateError(
                415,
                "unsupported_media_type",
                f"content type {content_type!r}: send the image as application/octet-stream, image/* or multipart "
                "form-data",
            )
        body = await self._read_body(scope, receive)
        if not body:
            raise GateError(400, "empty_body", "empty request body: send one image")
        filename = fields.pop("filename", "") or "upload"
        if multipart:
            data, filename, form_fields = await self._form(scope, body, filename)
            fields.update(form_fields)
        else:
            data = body
        if not data:
            raise GateError(400, "empty_body", "the uploaded image is empty")
        options = parse_options(fields)
        header = image_header(data)
        if header is None or header[1] <= 0 or header[2] <= 0:
            raise GateError(422, "not_an_image", "not a readable image (PNG, JPEG, BMP, TIFF or WebP expected)")
        fmt, height, width = header
        if height * width > self.max_image_pixels:
            raise GateError(
                413, "image_too_large", f"image too large ({width}x{height} pixels > {self.max_image_pixels})"
            )
        return data, {
            "request_id": request_id,
            "filename": filename.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload",
            "options": options,
        }

    async def _form(self, scope, body: bytes, filename: str) -> tuple[bytes, str, dict]:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        replay = _replay_once(body, _disconnected)

        try:
            form = await Request(scope, replay).form(max_files=1, max_fields=20)
        except Exception as exc:  # noqa: BLE001 - python-multipart raises several types
            raise GateError(400, "bad_form", f"malformed multipart form: {str(exc).splitlines()[0]}") from exc
        try:
            upload = form.get("image") or form.get("file")
            if not isinstance(upload, UploadFile):
                raise GateError(400, "bad_form", "multipart form without an `image` (or `file`) file field")
            data = await upload.read()
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            return data, upload.filename or filename, fields
        finally:
            await form.close()
