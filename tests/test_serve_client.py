"""`serve.client.ServeClient` against a real HTTP server on 127.0.0.1: one kept-alive connection per thread, a
connection the server closed while idle opened again, and wire failures as OSError."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from aoi_lightning.serve.client import ServeClient

pytestmark = pytest.mark.torchfree


class _Handler(http.server.BaseHTTPRequestHandler):
    """Echoes the request: `<client port> <method> <path> <body length> <x-api-key>`."""

    protocol_version = "HTTP/1.1"
    close_after: bool = False

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        text = f"{self.client_address[1]} {self.command} {self.path} {len(body)} {self.headers.get('X-API-Key')}"
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if self.close_after:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        if self.close_after:
            self.close_connection = True

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def test_requests_of_a_thread_share_one_connection(server) -> None:
    client = ServeClient(_url(server), api_key="k1")
    first = client.request("POST", "/predict", b"abc", {"Content-Type": "image/png"}, {"min_defect_area": 3})
    second = client.get("/health")
    port1, method, path, length, key = first.body.decode().split()
    assert (method, path, length, key) == ("POST", "/predict?min_defect_area=3", "3", "k1")
    assert second.status == 200 and second.body.decode().split()[0] == port1  # the same client socket
    assert first.headers["content-length"] == str(len(first.body))


def test_each_thread_has_its_own_connection(server) -> None:
    client = ServeClient(_url(server))
    barrier = threading.Barrier(4)

    def work(_: int) -> tuple[str, str]:
        first = client.get("/x").body.decode().split()[0]
        barrier.wait(timeout=30)  # four threads at once, so four connections
        return first, client.get("/x").body.decode().split()[0]

    with ThreadPoolExecutor(4) as pool:
        pairs = list(pool.map(work, range(4)))
    assert all(first == second for first, second in pairs)
    assert len({first for first, _ in pairs}) == 4


def test_a_connection_the_server_closed_is_opened_again(server) -> None:
    _Handler.close_after = True
    try:
        client = ServeClient(_url(server))
        ports = [client.get("/x").body.decode().split()[0] for _ in range(3)]
    finally:
        _Handler.close_after = False
    assert len(set(ports)) == 3  # three connections, no error


def test_idle_connection_closed_by_the_server_is_noticed_before_reuse(server) -> None:
    client = ServeClient(_url(server))
    first = client.get("/x").body.decode().split()[0]
    client._local.conn.sock.shutdown(socket.SHUT_RD)  # as when the server's keep-alive timeout ends: readable, EOF
    second = client.get("/x").body.decode().split()[0]
    assert second != first


def test_no_server_is_an_oserror() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        ServeClient(f"http://127.0.0.1:{port}", timeout=5).get("/health")


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        ServeClient("ftp://127.0.0.1:21")
