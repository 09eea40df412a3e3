"""`aoi serve`: the HTTP inspection service on LitServe.

- `api.InspectionAPI`: the LitAPI (decode -> batch -> `Predictor.predict` -> record, as `aoi run` writes it).
- `gate.Gate`: the ASGI middleware in front of every route (API key, size and content checks, bounded queue).
- `audit.AuditLog`: one flushed JSON line per answered prediction, a file per UTC day.
- `metrics`: Prometheus metrics shared by the API-server and model-worker processes.
- `app.build_server`: the LitServer with `/predict`, `/health`, `/ready`, `/info` and `/metrics`.

Nothing here imports torch: with `--backend onnx` the service runs on onnxruntime alone.
"""
