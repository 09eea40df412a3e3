"""The LitServer of `aoi serve`: `/predict` (LitServe's dynamic batcher over `InspectionAPI`), `/health`,
`/ready`, `/info` and `/metrics`, behind the `Gate` middleware."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import litserve as ls
from litserve.transport.zmq_transport import ZMQTransport

from aoi_lightning.serve.api import INFO_FILE, InspectionAPI, error_body, json_response
from aoi_lightning.serve.gate import Gate
from aoi_lightning.serve.metrics import render_latest


def build_server(
    api: InspectionAPI,
    workers: int,
    accelerator: str,
    api_key: str | None,
    max_body_bytes: int,
    max_image_pixels: int,
    max_queue: int,
    request_timeout: float,
    fast_queue: bool = True,
) -> ls.LitServer:
    """The LitServer around `api` with the service's routes and middleware (see `aoi_lightning.serve`).

    `GET /ready` is LitServe's health check (every model worker loaded and warmed up); `GET /health` answers as
    long as the HTTP process is alive; `GET /info` reads the `info.json` the first worker wrote after warm-up.
    `fast_queue`: answers travel from the model workers to the HTTP process over LitServe's ZeroMQ transport
    (`use_zeromq_answers`) instead of its multiprocessing-manager queue.
    """
    in_flight = mp.get_context("fork").Value("i", 0)
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers,
        timeout=request_timeout,
        healthcheck_path="/ready",
        info_path="/server_info",
        disable_openapi_url=True,
        fast_queue=fast_queue,
        middlewares=[
            (
                Gate,
                {
                    "api_key": api_key,
                    "max_body_bytes": max_body_bytes,
                    "max_image_pixels": max_image_pixels,
                    "max_queue": max_queue,
                    "in_flight": in_flight,
                },
            )
        ],
    )
    if fast_queue:
        use_zeromq_answers(server)
    info_path = Path(api.state_dir) / INFO_FILE

    async def health():
        return json_response({"status": "alive"})

    async def info():
        try:
            return json_response(json.loads(info_path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return error_body(503, "not_ready", "the model is not loaded yet")

    async def metrics_endpoint():
        from starlette.responses import Response

        body, content_type = render_latest()
        return Response(body, media_type=content_type)

    server.app.add_api_route("/health", health, methods=["GET"])
    server.app.add_api_route("/info", info, methods=["GET"])
    server.app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    return server


def use_zeromq_answers(server: ls.LitServer) -> bool:
    """Make `fast_queue=True` take effect: LitServe's ZeroMQ transport for the answers of the model workers.

    LitServe 0.2.19 drops the flag (it builds its `TransportConfig` with a misspelt keyword, so the transport stays
    the multiprocessing-manager queue) and, once the type is set, wires its broker's two addresses the wrong way
    round (Lightning-AI/LitServe issue 751). This sets the type and builds the transport with the addresses by
    name, through LitServe's own `Broker` and `ZMQTransport`. A LitServe that honours the flag is left alone.
    The broker is a thread of the launching process on two ipc sockets in /tmp; publishers drop messages past
    1,000 queued, far above the 2 x `max_queue` a full queue of requests can have in flight.

    Returns:
        True when the ZeroMQ transport will be used.
    """
    config = getattr(server, "transport_config", None)
    if config is None or not hasattr(config, "transport_type"):
        return False  # another LitServe layout: keep its own transport
    if config.transport_type == "zmq":
        return True
    from litserve.transport import factory
    from litserve.transport.zmq_queue import Broker

    def create_zmq_transport(config):
        broker = Broker()
        broker.start()
        config.frontend_address, config.backend_address = broker.frontend_address, broker.backend_address
        transport = ZeroMQAnswers(backend_address=broker.backend_address, frontend_address=broker.frontend_address)
        transport.owner = True  # this process's copy: not pickled into the workers
        return transport

    factory._create_zmq_transport = create_zmq_transport
    config.transport_type = "zmq"
    return True


class ZeroMQAnswers(ZMQTransport):
    """LitServe's `ZMQTransport` with a `close` that works in the launching process, which never opens a socket of
    its own (LitServe's raises there, and the service then hangs on SIGTERM), and that removes the broker's two
    ipc socket files when the launching process closes it."""

    owner = False

    def close(self, **kwargs) -> None:
        if self._zmq is not None:
            self._zmq.close()
        if self.owner:
            for address in (self.backend_address, self.frontend_address):
                if address.startswith("ipc://"):
                    Path(address.removeprefix("ipc://")).unlink(missing_ok=True)

    def __reduce__(self):
        return ZeroMQAnswers, (self.backend_address, self.frontend_address)
