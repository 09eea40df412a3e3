"""A small standard-library client of `aoi serve` (used by the tests and `tools/serve_benchmark.py`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass


@dataclass
class Answer:
    """An HTTP answer: status, headers (lower-case names), body bytes; `json()` decodes the body."""

    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class ServeClient:
    """Requests to a running `aoi serve` at `base_url` (e.g. http://127.0.0.1:8000), with an optional API key."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, params: dict | None = None
    ) -> Answer:
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        all_headers = dict(headers or {})
        if self.api_key is not None and "X-API-Key" not in all_headers:
            all_headers["X-API-Key"] = self.api_key
        req = urllib.request.Request(url, data=body, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def predict(self, data: bytes, content_type: str = "application/octet-stream", **params) -> Answer:
        """POST one image as a raw body; `params`: pixel_threshold_mult, min_defect_area, return_mask,
        return_overlay, filename."""
        return self.request("POST", "/predict", data, {"Content-Type": content_type}, params or None)

    def predict_multipart(self, data: bytes, filename: str = "image.png", field: str = "image", **fields) -> Answer:
        """POST one image as a multipart upload (`field`), with `fields` as form fields."""
        boundary = "aoi-serve-boundary-7f3a9c"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        ]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def wait_ready(self, timeout: float = 120.0, process=None) -> None:
        """Wait until `GET /ready` answers 200; RuntimeError after `timeout` s or when `process` has exited."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"aoi serve exited with code {process.returncode} before it was ready")
            try:
                if self.request("GET", "/ready").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"aoi serve at {self.base_url} not ready after {timeout:.0f} s")
