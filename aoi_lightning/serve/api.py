"""The LitAPI of `aoi serve`: request payload -> decoded image -> dynamic batch -> `Predictor.predict` -> the
record `aoi run` writes for that image, plus the request id.

Runs in LitServe's model-worker processes. Decoding uses `inference.folder.load_image` with the model's `Preprocessing`
(as `aoi run`); the record from `postprocess.prediction.postprocess_prediction`, as in
`PredictionOutputs.write`. torch is imported only by the torch back end.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import platform
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

import cv2
import litserve as ls
import numpy as np
from litserve.loops.base import collate_requests
from litserve.loops.simple_loops import BatchedLoop

from aoi_lightning.allocator import enable_startup_freeze, keep_freed_memory
from aoi_lightning.fileio import dumps, sha256_of, write_json
from aoi_lightning.inference.folder import LoadedImage, load_image, load_predictor
from aoi_lightning.postprocess.prediction import OutputOptions, postprocess_prediction
from aoi_lightning.serve.audit import AuditLog
from aoi_lightning.serve.metrics import metrics

log = logging.getLogger(__name__)

INFO_FILE = "info.json"
UPLOAD_DIR = "uploads"


def json_response(body: dict, status: int = 200, request_id: str | None = None, headers: dict | None = None):
    """A JSON answer written like `preds.jsonl` (`fileio.dumps`: NaN/inf -> null), with `X-Request-ID`."""
    from starlette.responses import Response

    extra = dict(headers or {})
    if request_id:
        extra["X-Request-ID"] = request_id
    return Response(dumps(body), status_code=status, headers=extra, media_type="application/json")


def error_body(status: int, kind: str, message: str, request_id: str | None = None, headers: dict | None = None):
    """The one-line JSON error answer of the service: `{"error": message, "kind": kind, "request_id": id}`."""
    text = str(message).strip()
    body = {"error": text.splitlines()[0] if text else kind, "kind": kind}
    if request_id:
        body["request_id"] = request_id
    return json_response(body, status, request_id, headers)


def _versions(backend: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    names = ["aoi-lightning", "litserve", "numpy", "opencv-python-headless"]
    names += {"onnx": ["onnxruntime"], "openvino": ["openvino"]}.get(backend, ["torch", "lightning"])
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["torch_imported"] = "torch" in sys.modules
    return out


def upload_path(upload_dir: str | Path, request_id: str) -> Path:
    """Where the gate puts the bytes of request `request_id` for the model worker (`request_id`: 32 hex digits
    the gate made; ValueError for anything else, so no name from outside can become a path)."""
    if len(request_id) != 32 or any(c not in "0123456789abcdef" for c in request_id):
        raise ValueError(f"not a request id: {request_id!r}")
    return Path(upload_dir) / f"{request_id}.img"


def png_base64(image: np.ndarray) -> str:
    """(H, W) or (H, W, 3) BGR uint8 -> base64 of its PNG encoding."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("cannot encode PNG")
    return base64.b64encode(data.tobytes()).decode("ascii")


class _FirstThen:
    """A request queue whose first `get` answers `first` (already taken from `queue`), then `queue`'s."""

    def __init__(self, first, queue) -> None:
        self.first, self.queue, self.taken = first, queue, False

    def get(self, block: bool = True, timeout: float | None = None):
        if not self.taken:
            self.taken = True
            return self.first
        return self.queue.get(block, timeout)

    def get_nowait(self):
        return self.get(block=False)


class FirstRequestLoop(BatchedLoop):
    """LitServe's batched loop with the batch window opened by the first request.

    LitServe's own loop polls the queue every millisecond while idle and closes a batch `batch_timeout` after it
    started looking, wherever the first request fell in that window. This loop blocks on the queue until a request
    arrives (no polling), then lets LitServe's `collate_requests` gather more for `batch_timeout` seconds, or only
    those already waiting when `batch_timeout` is 0. Requests that queue up while a batch runs form the next one.
    """

    #: seconds one wait for a request lasts before the loop looks round (LitServe's own loops use 1 s)
    idle_wait = 1.0

    def get_batch_requests(self, lit_api, request_queue, transport):
        try:
            first = request_queue.get(timeout=self.idle_wait)
        except Empty:
            return [], []
        return collate_requests(self, lit_api, _FirstThen(first, request_queue), transport)


@dataclass
class Job:
    """One request inside the worker: the gate's payload, the upload it stored, the decoded image, the prediction."""

    request_id: str
    filename: str
    options: dict
    upload: Path
    loaded: LoadedImage | None = None
    score: float | None = None
    anomaly_map: np.ndarray | None = None


class InspectionAPI(ls.LitAPI):
    """LitAPI over a trained run (`torch`: weights/model.ckpt; `onnx`: export/model.onnx).

    Args:
        model_dir: run directory (or, for `onnx`, a folder holding model.onnx and export_meta.json).
        backend: `torch` or `onnx`.
        device: `cpu`, `cuda` or `auto` (as `aoi run --device`).
        state_dir: folder of the service's state (`info.json` written once the model is warmed up; `uploads/`, where
            the gate hands over the image of each request).
        audit_dir: folder of the audit log (`audit.AuditLog`).
        audit_keep_days: daily audit files kept.
        audit_fsync: fsync each audit line.
        save_ng_images: keep the uploaded bytes of NG images in the audit folder.
        max_batch_size: largest batch of the dynamic batcher.
        batch_timeout: seconds the batcher waits, after the first request of a batch, for more (`FirstRequestLoop`).
        decode_threads: threads decoding the images of a batch (0: one per CPU, at most `max_batch_size`).
        spin_wait: ONNX Runtime's threads busy-wait between operators and briefly after each forward
            (`OnnxPredictor.from_run`).
    """

    def __init__(
        self,
        model_dir: str,
        backend: str,
        device: str,
        state_dir: str,
        audit_dir: str,
        audit_keep_days: int = 30,
        audit_fsync: bool = False,
        save_ng_images: bool = False,
        max_batch_size: int = 8,
        batch_timeout: float = 0.0,
        decode_threads: int = 0,
        spin_wait: bool = True,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, loop=FirstRequestLoop())
        self.model_dir = str(model_dir)
        self.backend = backend
        self.predictor_device = device
        self.state_dir = str(state_dir)
        self.upload_dir = str(Path(state_dir) / UPLOAD_DIR)
        Path(self.upload_dir).mkdir(parents=True, exist_ok=True)
        self.audit_args = (str(audit_dir), audit_keep_days, audit_fsync, save_ng_images)
        self.decode_threads = decode_threads
        self.spin_wait = spin_wait

    # ---- worker start -----------------------------------------------------------------------------------
    def setup(self, device) -> None:
        with contextlib.suppress(ValueError):  # Ctrl+C reaches the whole group: the main process stops the workers
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        keep_freed_memory()  # a worker started by spawn does not inherit the CLI process's settings
        enable_startup_freeze()  # the worker process's runtime and model are kept out of later collections
        self.predictor = load_predictor(self.backend, self.model_dir, self.predictor_device, self.spin_wait)
        self.facts = self.predictor.facts
        h, w = self.facts.input_size
        for n in sorted({1, self.max_batch_size}):  # warm-up: first-call allocations and kernel choices
            self.predictor.predict(np.zeros((n, 3, h, w), np.float32))
        self.audit = AuditLog(*self.audit_args)
        threads = self.decode_threads or min(self.max_batch_size, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads)) if threads > 1 else None
        self.metrics = metrics()
        self.identity = self.model_identity()
        write_json(Path(self.state_dir) / INFO_FILE, self.info())

    def model_identity(self) -> dict:
        """Model, category, run id, back end and the sha256 of the file the model was loaded from."""
        model_dir = Path(self.model_dir).expanduser()
        if self.backend in ("onnx", "openvino"):
            from aoi_lightning.inference.onnx_backend import EXPORT_DIR, ONNX_FILE

            file = model_dir / ONNX_FILE if (model_dir / ONNX_FILE).is_file() else model_dir / EXPORT_DIR / ONNX_FILE
        else:
            from aoi_lightning.rundir.layout import RunDir

            file = RunDir(model_dir).checkpoint
        return {
            "model": self.facts.model,
            "category": self.facts.category,
            "run_id": self.predictor.run_id,
            "backend": self.backend,
            "model_file": file.name,
            "sha256": sha256_of(file),
        }

    def info(self) -> dict:
        """What `GET /info` answers."""
        return {
            **self.identity,
            "model_dir": str(Path(self.model_dir).expanduser().resolve()),
            "thresholds": self.facts.report_thresholds(),
            "input_size": list(self.facts.input_size),
            "resize": self.facts.resize,
            "max_batch_size": self.max_batch_size,
            "versions": _versions(self.backend),
        }

    # ---- per request and per batch ------------------------------------------------------------------------
    def decode_request(self, request: dict) -> Job:
        """The gate's JSON payload -> a Job (decoding happens for the whole batch in `batch`)."""
        request_id = str(request["request_id"])
        return Job(
            request_id=request_id,
            filename=str(request.get("filename") or "upload"),
            options=dict(request.get("options") or {}),
            upload=upload_path(self.upload_dir, request_id),
        )

    def _decode(self, job: Job) -> Job:
        keep_original = bool(job.options.get("return_overlay"))
        start = time.perf_counter()
        job.loaded = load_image(job.upload, self.predictor.preprocessing, keep_original=keep_original)
        self.metrics.decode.observe(time.perf_counter() - start)
        if job.loaded.error:  # the server's file name means nothing to the client
            job.loaded.error = job.loaded.error.replace(f": {job.upload}", "").replace(str(job.upload), "upload")
        return job

    def batch(self, inputs: list[Job]) -> list[Job]:
        if self.pool is not None and len(inputs) > 1:
            return list(self.pool.map(self._decode, inputs))
        return [self._decode(job) for job in inputs]

    def predict(self, jobs: list[Job]) -> list[Job]:
        """One forward pass over the decoded jobs of a batch (`FirstRequestLoop` hands over lists, whatever
        `max_batch_size`); undecodable ones are passed through for their error answer."""
        good = [job for job in jobs if job.loaded is not None and not job.loaded.error]
        if good:
            start = time.perf_counter()
            scores, maps = self.predictor.predict(np.stack([job.loaded.model_input for job in good]))
            self.metrics.inference.observe(time.perf_counter() - start)
            self.metrics.batch_size.observe(len(good))
            for job, score, amap in zip(good, scores, maps):
                job.score, job.anomaly_map = float(score), amap
        return jobs

    def unbatch(self, output: list[Job]) -> list[Job]:
        return output

    def record(self, job: Job) -> tuple[dict, dict]:
        """The `preds.jsonl` record of a predicted job (`postprocess_prediction`, as `PredictionOutputs.write`;
        no file saved) and the requested pictures (`mask_png`, `overlay_png`: base64 PNG at the original size)."""
        opts, loaded = job.options, job.loaded
        options = OutputOptions(
            pixel_threshold_mult=float(opts.get("pixel_threshold_mult", 1.0)),
            min_defect_area=int(opts.get("min_defect_area", 0)),
        )
        want_overlay = bool(opts.get("return_overlay")) and loaded.original is not None
        result = postprocess_prediction(
            job.filename,
            job.score,
            job.anomaly_map,
            self.facts,
            options,
            loaded.original_size,
            None,
            loaded.original if want_overlay else None,
        )
        pictures = {}
        if opts.get("return_mask"):
            h, w = loaded.original_size
            full = (np.asarray(result.mask) > 0).astype(np.uint8) * 255
            if full.shape != (h, w):
                full = cv2.resize(full, (w, h), interpolation=cv2.INTER_NEAREST)
            pictures["mask_png"] = png_base64(full)
        if result.overlay is not None:
            pictures["overlay_png"] = png_base64(result.overlay)
        return result.record, pictures

    def encode_response(self, output: Job):
        """The answer of one job: 200 with `{"request_id", **record, [mask_png], [overlay_png]}` or a one-line
        JSON error (422 for an unreadable image). The audit line is written before the answer leaves."""
        rid = output.request_id
        try:
            loaded = output.loaded
            if loaded is None or loaded.error or output.score is None:
                message = loaded.error if loaded is not None and loaded.error else "the image was not decoded"
                kind, status = ("image_too_large", 413) if "too large" in message else ("not_an_image", 422)
                entry = {"request_id": rid, "model": self.identity, "status": status, "error": message}
                self.audit.append({**entry, "filename": output.filename})
                self.metrics.errors.labels(kind).inc()
                return error_body(status, kind, message, rid)
            start = time.perf_counter()
            record, pictures = self.record(output)
            self.audit.append({"request_id": rid, "model": self.identity, "record": record}, image_file=output.upload)
            self.metrics.verdicts.labels(record["label"]).inc()
            response = json_response({"request_id": rid, **record, **pictures}, 200, rid)
            self.metrics.postprocess.observe(time.perf_counter() - start)
            return response
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the batch down
            log.exception("request %s failed", rid)
            self.metrics.errors.labels("internal").inc()
            return error_body(500, "internal", f"internal error ({type(exc).__name__})", rid)

    def teardown(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False)
        if getattr(self, "audit", None) is not None:
            self.audit.close()
