"""Prometheus metrics of `aoi serve`, shared by the API-server processes and the model workers.

The service runs several processes (uvicorn API servers, LitServe model workers), so the Prometheus client
runs in its multiprocess mode: `enable_multiprocess(folder)` must be called before `prometheus_client` is
imported anywhere in the parent (children inherit the environment variable), and `/metrics` aggregates the
files of every process with `MultiProcessCollector`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: batch sizes are small integers: one bucket per power of two
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def enable_multiprocess(folder: str | Path) -> None:
    """Point the Prometheus client at `folder` (emptied) for this process and every child started after."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)


@lru_cache(maxsize=1)
def metrics() -> SimpleNamespace:
    """The service's metrics (created once per process).

    - `requests` (counter; route, status): answered HTTP requests.
    - `verdicts` (counter; label OK/NG): predictions answered.
    - `errors` (counter; kind): rejected or failed requests by kind (`unauthorized`, `empty_body`,
      `unsupported_media_type`, `payload_too_large`, `image_too_large`, `not_an_image`, `bad_option`,
      `queue_full`, `storage`, `internal`).
    - `latency` (histogram, seconds; route): time from request to answer.
    - `decode` (histogram, seconds): decoding and resizing one uploaded image in a model worker.
    - `inference` (histogram, seconds): one model forward pass of a batch.
    - `postprocess` (histogram, seconds): the record (and pictures) of one answer, its audit line and JSON.
    - `batch_size` (histogram, images): images per forward pass of the dynamic batcher.
    - `queue_depth` (gauge): `/predict` requests accepted and not yet answered (all processes).
    """
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        requests=Counter("aoi_serve_requests", "Answered HTTP requests", ["route", "status"]),
        verdicts=Counter("aoi_serve_verdicts", "Answered predictions by verdict", ["label"]),
        errors=Counter("aoi_serve_errors", "Rejected or failed requests by kind", ["kind"]),
        latency=Histogram("aoi_serve_request_latency_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS),
        decode=Histogram("aoi_serve_decode_seconds", "Decoding one uploaded image", buckets=LATENCY_BUCKETS),
        inference=Histogram("aoi_serve_inference_seconds", "Forward pass of one batch", buckets=LATENCY_BUCKETS),
        postprocess=Histogram(
            "aoi_serve_postprocess_seconds", "Record, audit line and JSON of one answer", buckets=LATENCY_BUCKETS
        ),
        batch_size=Histogram("aoi_serve_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS),
        queue_depth=Gauge(
            "aoi_serve_queue_depth", "Predict requests accepted and not yet answered", multiprocess_mode="livesum"
        ),
    )


def render_latest() -> tuple[bytes, str]:
    """The Prometheus text exposition of every process's metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    if MULTIPROC_ENV in os.environ:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:  # a single process (tests of the pieces)
        from prometheus_client import REGISTRY as registry
    metrics()  # the metrics exist (with zero samples) before the first request
    return generate_latest(registry), CONTENT_TYPE_LATEST
