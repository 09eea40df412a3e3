"""A small standard-library client of `aoi serve` (used by the tests and `tools/serve_benchmark.py`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Answer:
    """An HTTP answer: status, headers (lower-case names), body bytes; `json()` decodes the body."""

    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class ServeClient:
    """Requests to a running `aoi serve` at `base_url` (e.g. http://127.0.0.1:8000), with an optional API key.

    Each thread keeps one HTTP/1.1 connection open and sends its requests over it (keep-alive, as a line client
    should: no TCP set-up per image). A connection the server has closed while idle is noticed before it is
    reused and opened again; a request that fails on the wire drops its connection and raises OSError.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._address = (parts.hostname, parts.port)
        self._prefix = parts.path.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
            conn.close()  # readable while idle: the server closed it (or sent something unasked)
            conn = None
        if conn is None:
            conn = self._connection_class(*self._address, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (the next request opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, params: dict | None = None
    ) -> Answer:
        target = self._prefix + path
        if params:
            target += "?" + urllib.parse.urlencode(params)
        all_headers = dict(headers or {})
        if self.api_key is not None and "X-API-Key" not in all_headers:
            all_headers["X-API-Key"] = self.api_key
        conn = self._connection()
        try:
            conn.request(method, target, body=body, headers=all_headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            if isinstance(exc, OSError):
                raise
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        if resp.will_close:
            self.close()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)

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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server(
    model_dir: str | Path,
    backend: str,
    audit_dir: str | Path,
    *extra: str,
    api_key: str | None = None,
    log_path: str | Path | None = None,
    ready_timeout: float = 180.0,
) -> Iterator[tuple[ServeClient, subprocess.Popen]]:
    """`aoi serve` on 127.0.0.1 and a free port, in its own process group, with `extra` options; yields a client
    (carrying `api_key`, which the server gets through its environment variable) and the process once `/ready`
    answers. On exit: SIGTERM (LitServe's graceful shutdown), then SIGKILL of whatever of the group is left."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "AOI_SERVE_API_KEY"}
    if api_key is not None:
        env["AOI_SERVE_API_KEY"] = api_key
    argv = [sys.executable, "-m", "aoi_lightning.cli", "serve", "--model_dir", str(model_dir), "--backend", backend]
    argv += ["--port", str(port), "--audit_dir", str(audit_dir), *extra]
    log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = ServeClient(f"http://127.0.0.1:{port}", api_key=api_key, timeout=60)
    try:
        client.wait_ready(timeout=ready_timeout, process=proc)
        yield client, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its process group left behind
        proc.wait(timeout=30)
        log.close()


def audit_lines(audit_dir: str | Path) -> list[dict]:
    """Every line of every audit file of `audit_dir`; ValueError for a torn (incomplete) line."""
    lines = []
    for path in sorted(Path(audit_dir).glob("audit-*.jsonl")):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            raise ValueError(f"torn last line in {path}")
        lines += [json.loads(line) for line in data.decode("utf-8").splitlines()]
    return lines
