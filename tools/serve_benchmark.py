#!/usr/bin/env python
"""Bounded load run of `aoi serve` on 127.0.0.1, per back end, next to `aoi run` on the same images.

For each back end: start the server, send `--requests` POST /predict (raw PNG bytes, images taken in turn) at
each `--concurrency`, and report images/s, p50/p95/p99 latency, errors, and the audit log check (answered
requests lost from or duplicated in the log); then run `aoi run` over the same images for comparison.

    python tools/serve_benchmark.py --model_dir runs/padim/transistor/RUN \
        --images ../shared/datasets/mvtec_ad/transistor/test --backends torch onnx \
        --requests 1000 --concurrency 1 4 16 --output serve_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aoi_lightning.data.image_io import list_images
from aoi_lightning.serve.client import audit_lines, local_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[k]


def load_run(client, payloads: list[bytes], requests: int, concurrency: int) -> dict:
    """`requests` POST /predict at `concurrency`; latency in ms, answered request ids."""

    def one(i: int):
        start = time.perf_counter()
        try:
            answer = client.predict(payloads[i % len(payloads)], "image/png")
        except OSError as exc:
            return time.perf_counter() - start, None, type(exc).__name__
        rid = answer.json().get("request_id") if answer.status == 200 else None
        return time.perf_counter() - start, rid, None if answer.status == 200 else str(answer.status)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = [r[0] * 1000.0 for r in results if r[1] is not None]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": sum(r[1] is None for r in results),
        "error_kinds": sorted({r[2] for r in results if r[2]}),
        "images_per_second": sum(r[1] is not None for r in results) / wall,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
        "ids": [r[1] for r in results if r[1] is not None],
    }


def batch_sizes(client) -> dict:
    """Count and mean of the batch-size histogram of `/metrics`."""
    text = client.get("/metrics").body.decode()
    values = dict(
        row.rsplit(" ", 1) for row in text.splitlines() if row.startswith("aoi_serve_batch_size_") and " " in row
    )
    count = float(values.get("aoi_serve_batch_size_count", 0))
    return {"batches": count, "mean_batch": float(values.get("aoi_serve_batch_size_sum", 0)) / count if count else 0}


def aoi_run(model_dir: str, images: str, backend: str, batch_size: int, out: Path, num_workers: int = 1) -> dict:
    argv = [sys.executable, "-m", "aoi_lightning.cli", "run", "--model_dir", model_dir, "--input_dir", images]
    argv += ["--output_dir", str(out), "--backend", backend, "--batch_size", str(batch_size), "--device", "cpu"]
    argv += ["--num_workers", str(num_workers)]
    argv += ["--recursive", "--no_progress", "--no_save_masks", "--no_save_overlays"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    match = re.search(r"aoi run: (\d+) images.*?([\d.]+) images/s", done.stdout)
    return {"images": int(match.group(1)), "images_per_second": float(match.group(2))} if match else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx", "openvino"])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--batch_timeout", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--spin_wait", choices=["true", "false"], default="true", help="aoi serve --spin_wait")
    parser.add_argument("--output", default="serve_benchmark.json")
    args = parser.parse_args(argv)
    paths = list_images(Path(args.images), recursive=True)
    if not paths:
        parser.error(f"no images in {args.images}")
    payloads = [p.read_bytes() for p in paths]
    results = []
    with tempfile.TemporaryDirectory(prefix="aoi-serve-bench-") as tmp:
        for backend in args.backends:
            audit = Path(tmp) / f"audit-{backend}"
            extra = ["--device", "cpu", "--max_batch_size", str(args.max_batch_size)]
            extra += ["--batch_timeout", str(args.batch_timeout), "--workers", str(args.workers)]
            extra += ["--spin_wait", args.spin_wait]
            extra += ["--max_queue", str(max(64, 2 * max(args.concurrency)))]
            with local_server(args.model_dir, backend, audit, *extra, log_path=Path(tmp) / f"{backend}.log") as (
                client,
                _,
            ):
                for payload in payloads[:4]:  # first requests of each size
                    client.predict(payload, "image/png")
                for concurrency in args.concurrency:
                    before = batch_sizes(client)
                    row = load_run(client, payloads, args.requests, concurrency)
                    after = batch_sizes(client)
                    batches = after["batches"] - before["batches"]
                    row["mean_batch"] = (
                        (after["mean_batch"] * after["batches"] - before["mean_batch"] * before["batches"]) / batches
                        if batches
                        else 0.0
                    )
                    logged = [line["request_id"] for line in audit_lines(audit)]
                    ids = row.pop("ids")
                    row["audit_lost"] = len(set(ids) - set(logged))
                    row["audit_duplicated"] = len(logged) - len(set(logged))
                    results.append({"backend": backend, "mode": "serve", **row})
                    print(json.dumps(results[-1]), flush=True)
            # batch 1: the reference of concurrency 1, with the next image decoded during the forward (the default)
            # and with each image decoded before its forward (num_workers 0, the order a lone request takes)
            for batch, workers in sorted({(1, 1), (1, 0), (args.max_batch_size, 1)}, key=lambda k: (k[0], -k[1])):
                out = Path(tmp) / f"run-{backend}-{batch}-{workers}"
                run = aoi_run(args.model_dir, args.images, backend, batch, out, workers)
                results.append(
                    {"backend": backend, "mode": "aoi run", "batch_size": batch, "num_workers": workers, **run}
                )
                print(json.dumps(results[-1]), flush=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    head = "| back end | mode | conc. | requests | errors | audit lost/dup | images/s | mean batch | p50/p95/p99 ms |"
    rows = [head]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["mode"] == "serve":
            rows.append(
                f"| {r['backend']} | serve | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                f"{r['audit_lost']}/{r['audit_duplicated']} | {r['images_per_second']:.1f} | {r['mean_batch']:.2f} | "
                f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f} |"
            )
        else:
            decode = ", decode in line" if r.get("num_workers") == 0 else ""
            ips = r.get("images_per_second", float("nan"))
            rows.append(
                f"| {r['backend']} | aoi run (batch {r['batch_size']}{decode}) | - | {r.get('images', '-')} | - | - | "
                f"{ips:.1f} | - | {1000.0 / ips:.1f} per image |"
            )
    table = "\n".join(rows)
    Path(args.output).with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
