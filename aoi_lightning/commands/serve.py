"""`aoi serve`: the HTTP inspection service (LitServe) over a trained run; see `aoi_lightning.serve`."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from aoi_lightning.fileio import check_output_dir

log = logging.getLogger(__name__)

#: Environment variable holding the API key (the key never goes on the command line).
API_KEY_ENV = "AOI_SERVE_API_KEY"
HOSTS = ("127.0.0.1", "0.0.0.0", "::")


class ServeError(ValueError):
    """A wrong argument of `aoi serve` or a model that cannot be served; the message is one line."""


def read_api_key(api_key_file: str | None) -> str | None:
    """The API key from `api_key_file` (first line) or else the `AOI_SERVE_API_KEY` environment variable; None when
    neither is set. ServeError for an unreadable or empty file."""
    if api_key_file:
        path = Path(api_key_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of the key
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeError(f"--api_key_file: cannot read {path}: {exc}") from exc
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ServeError(f"--api_key_file: {path} is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def _check_model_dir(model_dir: Path, backend: str) -> None:
    if not model_dir.is_dir():
        raise ServeError(f"--model_dir: run directory not found: {model_dir}")
    if backend in ("onnx", "openvino"):
        if not ((model_dir / "model.onnx").is_file() or (model_dir / "export" / "model.onnx").is_file()):
            raise ServeError(f"no ONNX export in {model_dir}: create it with `aoi export --run_dir {model_dir}`")
    elif not (model_dir / "weights" / "model.ckpt").is_file():
        raise ServeError(f"no checkpoint in {model_dir} (weights/model.ckpt): is it a trained run directory?")
    # the model is loaded here once, with every check `aoi run` makes (checkpoint and config of one model,
    # thresholds.json, export metadata against the graph's own): a damaged or mismatched run is one line before
    # any server process starts, not a worker's traceback
    from aoi_lightning.inference.folder import load_predictor

    load_predictor(backend, str(model_dir), "cpu")  # built and dropped: the workers load their own


def _check_port_free(host: str, port: int) -> None:
    """ServeError when `host:port` cannot be bound (another service holds it), before any model is loaded."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _stop_on_signals(server) -> None:
    """SIGINT/SIGTERM stop the server through LitServe's graceful shutdown (its shutdown event, set from a thread:
    the main thread is blocked on that event) once the HTTP servers run; before that (model loading, or a model
    worker that died before reporting), the worker processes are ended and the start is interrupted."""
    import multiprocessing
    import signal
    import threading

    serving = threading.Event()
    start_http = server._start_server

    def start_and_mark(*args, **kwargs):
        workers = start_http(*args, **kwargs)
        serving.set()
        return workers

    server._start_server = start_and_mark

    main_pid = os.getpid()

    def stop(signum, frame) -> None:
        if os.getpid() != main_pid:  # a forked API server inherited this handler: die of the signal as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        event = getattr(server, "_shutdown_event", None)
        if event is not None and serving.is_set():
            threading.Thread(target=event.set, daemon=True).start()
            return
        for child in multiprocessing.active_children():
            child.kill()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def serve(
    model_dir: str,
    backend: Literal["torch", "onnx", "openvino"] = "torch",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    batch_timeout: float = 0.0,
    workers: int = 1,
    device: Literal["cpu", "cuda", "auto"] = "auto",
    spin_wait: bool = True,
    api_key_file: str | None = None,
    audit_dir: str = "serve_audit",
    audit_keep_days: int = 30,
    audit_fsync: bool = False,
    save_ng_images: bool = False,
    max_upload_mb: float = 20.0,
    max_image_pixels: int = 40_000_000,
    max_queue: int = 64,
    request_timeout: float = 30.0,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning",
) -> int:
    """Serve a trained run over HTTP: `POST /predict` answers the `preds.jsonl` record of one image.

    Endpoints: `POST /predict`, `GET /health` (alive), `GET /ready` (model loaded and warmed up), `GET /info`
    (model identity, thresholds, versions), `GET /metrics` (Prometheus). Runs until interrupted (Ctrl+C).

    Args:
        model_dir: trained run directory (for onnx, also a folder holding model.onnx and export_meta.json).
        backend: torch: weights/model.ckpt; onnx: export/model.onnx with ONNX Runtime; openvino: export/model.onnx
            with the OpenVINO runtime (the last two need no torch).
        host: address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface).
        port: TCP port (1024-65535).
        max_batch_size: largest batch the dynamic batcher forms from concurrent requests.
        batch_timeout: seconds the batcher waits, after the first request of a batch, for more to fill it (0: it
            takes the requests already waiting; those arriving while a batch runs form the next one).
        workers: model worker processes (each holds a copy of the model).
        device: where the model runs (auto: cuda when available).
        spin_wait: onnx: ONNX Runtime's threads busy-wait between operators and for a moment after each forward
            (its own default): a lone request is answered sooner. false: they sleep at once, leaving the cores to
            other work (several workers, or other programs, on few cores).
        api_key_file: file holding the API key (first line); else the AOI_SERVE_API_KEY environment variable.
            With a key, every request but /health must send `X-API-Key: <key>` (or `Authorization: Bearer <key>`).
        audit_dir: folder of the audit log (audit-YYYY-MM-DD.jsonl, one line per answered prediction).
        audit_keep_days: daily audit files kept (0: keep all).
        audit_fsync: fsync every audit line (survives a power cut; slower).
        save_ng_images: keep the uploaded bytes of NG images in AUDIT_DIR/ng/YYYY-MM-DD/<request_id>.img.
        max_upload_mb: largest request body in MB (413 above).
        max_image_pixels: largest image (height x width) decoded (413 above: decompression bombs).
        max_queue: requests accepted and not yet answered; beyond it 503 with Retry-After.
        request_timeout: seconds a request may wait for the model (504 after).
        log_level: server log level.

    Returns:
        0 after a clean shutdown.

    Raises:
        ServeError: a wrong option, a missing model or export, a model worker that failed to start.
    """
    model_path = Path(model_dir).expanduser()
    _check_model_dir(model_path, backend)
    if host not in HOSTS:
        raise ServeError(f"--host must be one of {', '.join(HOSTS)}, got {host!r}")
    if not 1024 <= port <= 65535:
        raise ServeError(f"--port must be between 1024 and 65535, got {port}")
    for name, value in (("max_batch_size", max_batch_size), ("workers", workers), ("max_queue", max_queue)):
        if value < 1:
            raise ServeError(f"--{name} must be >= 1, got {value}")
    if batch_timeout < 0 or request_timeout <= 0 or max_upload_mb <= 0 or max_image_pixels < 1:
        raise ServeError("--batch_timeout must be >= 0; --request_timeout, --max_upload_mb, --max_image_pixels > 0")
    if audit_keep_days < 0:
        raise ServeError(f"--audit_keep_days must be >= 0, got {audit_keep_days}")
    check_output_dir(audit_dir, "audit_dir")
    _check_port_free(host, port)
    api_key = read_api_key(api_key_file)
    if host != "127.0.0.1" and api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model", host)

    state_dir = Path(tempfile.mkdtemp(prefix="aoi-serve-"))
    try:
        from aoi_lightning.serve.metrics import enable_multiprocess

        enable_multiprocess(state_dir / "metrics")  # before prometheus_client is imported anywhere
        from aoi_lightning.serve.api import InspectionAPI
        from aoi_lightning.serve.app import build_server

        api = InspectionAPI(
            str(model_path.resolve()),
            backend,
            device,
            str(state_dir),
            str(Path(audit_dir).expanduser().resolve()),
            audit_keep_days=audit_keep_days,
            audit_fsync=audit_fsync,
            save_ng_images=save_ng_images,
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            spin_wait=spin_wait,
        )
        server = build_server(
            api,
            workers=workers,
            accelerator="cuda" if device == "cuda" else "cpu",
            api_key=api_key,
            max_body_bytes=int(max_upload_mb * 1024 * 1024),
            max_image_pixels=max_image_pixels,
            max_queue=max_queue,
            request_timeout=request_timeout,
        )
        _stop_on_signals(server)
        print(f"aoi serve: {backend} model {model_path} on http://{host}:{port} (audit log in {audit_dir})", flush=True)
        try:
            server.run(host=host, port=port, log_level=log_level, generate_client_file=False)
        except KeyboardInterrupt:
            print("aoi serve: interrupted while starting", flush=True)
            return 130
        except RuntimeError as exc:
            if "workers failed to start" in str(exc):
                raise ServeError("the model worker failed to start (its error is in the log above)") from exc
            raise
        except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
            # a model worker died (e.g. ended by the system for lack of memory): LitServe stops the service and
            # its process manager goes with it
            raise ServeError("a model worker died (ended by the system?); the service stopped") from exc
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0
