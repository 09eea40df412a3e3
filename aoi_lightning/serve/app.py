"""The LitServer of `aoi serve`: `/predict` (LitServe's dynamic batcher over `InspectionAPI`), `/health`,
`/ready`, `/info` and `/metrics`, behind the `Gate` middleware."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import litserve as ls

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
) -> ls.LitServer:
    """The LitServer around `api` with the service's routes and middleware (see `aoi_lightning.serve`).

    `GET /ready` is LitServe's health check (every model worker loaded and warmed up); `GET /health` answers as
    long as the HTTP process is alive; `GET /info` reads the `info.json` the first worker wrote after warm-up.
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
        middlewares=[
            (
                Gate,
                {
                    "api_key": api_key,
                    "max_body_bytes": max_body_bytes,
                    "max_image_pixels": max_image_pixels,
                    "max_queue": max_queue,
                    "in_flight": in_flight,
                    "upload_dir": api.upload_dir,
                    "body_timeout": request_timeout,
                },
            )
        ],
    )
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
