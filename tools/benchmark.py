#!/usr/bin/env python
"""Speed, memory and accuracy of PaDiM and PatchCore against the bare backbone forward.

Each configuration runs in its own process (so peak RSS is its own), on a data root and category in MVTec
layout. Timings are medians over repeated runs; backbone and model calls are interleaved so that both see the
same machine load, and the model/backbone ratio is what to compare across machines.

    python tools/benchmark.py --root ../shared/datasets/mvtec_ad --category transistor \
        --models padim patchcore --coreset_ratios 0.01 0.1 --output benchmark.json

`--aoi_run RUN_DIR [RUN_DIR ...]` measures the `aoi run` loop instead (the folder runner of the command, in
process, after loading): ms per image and images/s over every image of `--input_dir`, without and with masks and
overlays, next to the same back end's model forward at the same batch size, interleaved repeat by repeat:

    python tools/benchmark.py --aoi_run runs/padim/transistor/X runs/patchcore/transistor/Y \
        --input_dir ../shared/datasets/mvtec_ad/transistor/test --backends torch onnx --batch_size 8
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path
from queue import Empty

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import data_parser, markdown_table  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def _interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each callable, calling them in turn so that load drifts hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000.0 for k, v in samples.items()}


def _buffer_bytes(model: torch.nn.Module) -> int:
    """Bytes of the fitted statistics (buffers outside the backbone)."""
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.startswith("feature_extractor."))


def run_one(cfg: dict) -> dict:
    """Fit, time and evaluate one configuration (runs in a child process)."""
    from torch.utils.data import DataLoader

    from aoi_lightning.data.mvtec import AnomalyDataset, scan_mvtec
    from aoi_lightning.metrics.evaluation import EvaluationCollector
    from aoi_lightning.models.padim.torch_model import PadimModel
    from aoi_lightning.models.patchcore.torch_model import PatchcoreModel

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    size = (cfg["image_size"], cfg["image_size"])
    train, test = scan_mvtec(cfg["root"], cfg["category"])
    if cfg.get("train_images"):
        n = cfg["train_images"]
        train = [train[i % len(train)] for i in range(n)]
    if cfg["model"] == "padim":
        model = PadimModel(
            backbone=cfg["backbone"],
            weights=cfg["weights"],
            n_features=cfg.get("n_features"),
            stats_dtype=cfg.get("stats_dtype") or "float16",
        )
    else:
        model = PatchcoreModel(
            backbone=cfg["backbone"],
            weights=cfg["weights"],
            coreset_ratio=cfg["coreset_ratio"],
            projection_dim=cfg["projection_dim"],
        )
        model.allocate(len(train), size)
    model.eval()
    loader = DataLoader(AnomalyDataset(train, size), batch_size=32, num_workers=cfg["workers"])
    flip = cfg.get("train_images", 0) > 0
    out: dict = dict(cfg)
    t_extract = 0.0
    t_load_start = time.perf_counter()
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            images = batch["image"]
            if flip and (i * 32) // len(set(s.image_path for s in train)) % 2 == 1:
                images = images.flip(-1)
            start = time.perf_counter()
            model.update(images)
            t_extract += time.perf_counter() - start
        t_total_extract = time.perf_counter() - t_load_start
        start = time.perf_counter()
        model.finalize()
        t_finalize = time.perf_counter() - start
    out["fit_feature_extraction_s"] = t_extract
    out["fit_data_loading_s"] = t_total_extract - t_extract
    out["fit_finalize_s"] = t_finalize
    out["fit_coreset_s"] = getattr(model, "last_coreset_seconds", 0.0)
    out["fit_total_s"] = t_total_extract + t_finalize
    out["buffer_mb"] = _buffer_bytes(model) / 2**20

    test_loader = DataLoader(AnomalyDataset(test, size), batch_size=32, num_workers=cfg["workers"])
    collector = EvaluationCollector()
    first = None
    with torch.inference_mode():
        for batch in test_loader:
            res = model(batch["image"])
            collector.update(batch, res.pred_score, res.anomaly_map, float("nan"))
            if first is None:
                first = batch["image"]
        full = collector.metrics(("test",))
        out.update({k: full.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "num_images")})
        x1 = first[:1].contiguous()
        xb = first[: min(32, first.shape[0])].contiguous()
        b1 = _interleaved({"model": lambda: model(x1), "backbone": lambda: model.feature_extractor(x1)}, cfg["repeats"])
        bb = _interleaved(
            {"model": lambda: model(xb), "backbone": lambda: model.feature_extractor(xb)},
            max(3, cfg["repeats"] // 4),
            1,
        )
    n = xb.shape[0]
    out["batch1_ms"] = b1["model"]
    out["batch1_backbone_ms"] = b1["backbone"]
    out["batch1_ratio"] = b1["model"] / b1["backbone"]
    out[f"batch{n}_ms_per_image"] = bb["model"] / n
    out[f"batch{n}_backbone_ms_per_image"] = bb["backbone"] / n
    out[f"batch{n}_ratio"] = bb["model"] / bb["backbone"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cfg["model"] == "padim":
        from aoi_lightning.models.components import fused_distance

        out["padim_kernel"] = "fused" if fused_distance.enabled() and fused_distance.kernel() else "torch"
    if cfg.get("onnx"):
        out.update(_onnx_latency(model, size, x1, xb, cfg))
    return out


def _onnx_latency(model, size: tuple[int, int], x1: torch.Tensor, xb: torch.Tensor, cfg: dict) -> dict:
    """ONNX Runtime (CPU provider) against torch on the same inputs, timed alternately."""
    import tempfile

    import onnxruntime as ort

    from aoi_lightning.export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, size, Path(tmp) / "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = cfg["threads"]
        # no busy-waiting after a run: spinning threads would steal the cores from the torch calls timed in turn
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        a1, ab = x1.numpy(), xb.numpy()
        with torch.inference_mode():
            b1 = _interleaved(
                {"onnx": lambda: session.run(None, {"image": a1}), "torch": lambda: model(x1)}, cfg["repeats"]
            )
            bb = _interleaved(
                {"onnx": lambda: session.run(None, {"image": ab}), "torch": lambda: model(xb)},
                max(3, cfg["repeats"] // 4),
                1,
            )
    n = xb.shape[0]
    return {
        "onnx_batch1_ms": b1["onnx"],
        "torch_batch1_ms_vs_onnx": b1["torch"],
        f"onnx_batch{n}_ms_per_image": bb["onnx"] / n,
        f"torch_batch{n}_ms_per_image_vs_onnx": bb["torch"] / n,
    }


def _child(cfg: dict, queue) -> None:
    from aoi_lightning.allocator import keep_freed_memory

    keep_freed_memory()  # as in the `aoi` command (a spawned child does not inherit it)
    try:
        queue.put(run_one(cfg))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        queue.put({**cfg, "error": f"{type(exc).__name__}: {exc}"})


def run_isolated(cfg: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(cfg, queue))
    proc.start()
    while True:  # a child killed by the system (e.g. out of memory) never reports: notice it instead of waiting
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                result = {**cfg, "error": f"the measuring process died (exit code {proc.exitcode}; out of memory?)"}
                break
    proc.join()
    return result


def table(rows: list[dict]) -> str:
    cols = [
        ("model", "model"),
        ("ratio", "coreset_ratio"),
        ("stats", "stats_dtype"),
        ("kernel b1", "padim_kernel"),
        ("N", "train_images"),
        ("fit s", "fit_total_s"),
        ("extract s", "fit_feature_extraction_s"),
        ("finalize s", "fit_finalize_s"),
        ("coreset s", "fit_coreset_s"),
        ("b1 ms", "batch1_ms"),
        ("backbone b1 ms", "batch1_backbone_ms"),
        ("b1 ratio", "batch1_ratio"),
        ("b32 ms/img", "batch32_ms_per_image"),
        ("b32 ratio", "batch32_ratio"),
        ("peak RSS MB", "peak_rss_mb"),
        ("buffers MB", "buffer_mb"),
        ("onnx b1 ms", "onnx_batch1_ms"),
        ("torch b1 ms (onnx run)", "torch_batch1_ms_vs_onnx"),
        ("onnx b32 ms/img", "onnx_batch32_ms_per_image"),
        ("img AUROC", "image_auroc"),
        ("pix AUROC", "pixel_auroc"),
        ("AUPRO", "pixel_aupro"),
    ]
    body = []
    for r in rows:
        values = [r.get(key) for _, key in cols]
        body.append(["-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in values])
        if "error" in r:
            body.append([f"error: {r['error']}"])
    return markdown_table([c for c, _ in cols], body)


def aoi_run_loop(run_dir: str, backend: str, input_dir: str, batch_size: int, num_workers: int, repeats: int) -> dict:
    """`aoi run`'s loop (decode, forward, post-processing, files) over `input_dir`, without and with masks and
    overlays, and the back end's forward alone on a batch of the same size, `repeats` times each, interleaved.
    Medians in ms per image; `ratio_*`: the loop over the forward."""
    import tempfile

    import numpy as np

    from aoi_lightning.inference.folder import load_predictor, run_folder
    from aoi_lightning.postprocess.prediction import OutputOptions

    predictor = load_predictor(backend, run_dir, "cpu")
    paths = sorted(p for p in Path(input_dir).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    if not paths:
        raise SystemExit(f"no images under {input_dir}")
    h, w = predictor.preprocessing.image_size
    batch = np.random.default_rng(0).random((batch_size, 3, h, w), dtype=np.float32)
    predictor.predict(batch)  # warm-up: kernels, allocations
    times: dict[str, list[float]] = {"forward": [], "plain": [], "pictures": []}
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(max(1, len(paths) // batch_size)):
            predictor.predict(batch)
        times["forward"].append((time.perf_counter() - start) / (max(1, len(paths) // batch_size) * batch_size))
        for key, pictures in (("plain", False), ("pictures", True)):
            with tempfile.TemporaryDirectory() as out:
                options = OutputOptions(save_masks=pictures, save_overlays=pictures)
                start = time.perf_counter()
                run_folder(predictor, paths, out, options, input_root=input_dir, batch_size=batch_size,
                           num_workers=num_workers, progress=False)  # fmt: skip
                times[key].append((time.perf_counter() - start) / len(paths))
    med = {k: statistics.median(v) * 1000.0 for k, v in times.items()}
    return {
        "run_dir": str(run_dir),
        "backend": backend,
        "images": len(paths),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "repeats": repeats,
        "forward_ms_per_image": med["forward"],
        "run_ms_per_image": med["plain"],
        "run_pictures_ms_per_image": med["pictures"],
        "run_images_per_s": 1000.0 / med["plain"],
        "run_pictures_images_per_s": 1000.0 / med["pictures"],
        "ratio_run": med["plain"] / med["forward"],
        "ratio_run_pictures": med["pictures"] / med["forward"],
    }


def _run_label(run_dir: str) -> str:
    """`<model>/<category>/<run_id>` of a run directory (the last three parts)."""
    return "/".join(Path(run_dir).parts[-3:])


def aoi_run_table(rows: list[dict]) -> str:
    cols = [
        ("run", "run_dir"), ("backend", "backend"), ("batch", "batch_size"), ("decode threads", "num_workers"),
        ("forward ms/img", "forward_ms_per_image"), ("aoi run ms/img", "run_ms_per_image"),
        ("aoi run img/s", "run_images_per_s"), ("ratio", "ratio_run"),
        ("+ masks, overlays ms/img", "run_pictures_ms_per_image"), ("img/s", "run_pictures_images_per_s"),
        ("ratio", "ratio_run_pictures"),
    ]  # fmt: skip

    def text(key: str, value) -> str:
        if key == "run_dir":
            return _run_label(value)
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    return markdown_table([c for c, _ in cols], [[text(key, row[key]) for _, key in cols] for row in rows])


def _write(rows: list[dict], output: Path, markdown: str) -> None:
    output.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    output.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)


def main(argv: list[str] | None = None) -> int:
    parser = data_parser(__doc__)
    parser.add_argument("--aoi_run", nargs="+", default=None, metavar="RUN_DIR",
                        help="measure the aoi run loop of these runs instead of fitting")  # fmt: skip
    parser.add_argument("--input_dir", default="../shared/datasets/mvtec_ad/transistor/test")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx", "openvino"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--decode_threads", type=int, default=1, help="aoi run --num_workers")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="package")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--coreset_ratios", type=float, nargs="+", default=[0.01])
    parser.add_argument("--projection_dim", type=int, default=32)
    parser.add_argument("--n_features", type=int, default=None)
    parser.add_argument(
        "--padim_stats_dtype", nargs="+", default=["float16"], choices=["float16", "float32"],
        help="PaDiM whitening storage (one row per value)",
    )  # fmt: skip
    parser.add_argument("--train_images", type=int, nargs="+", default=[0], help="0: the training set as is")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no_onnx", action="store_true", help="skip the ONNX Runtime latency")
    parser.add_argument("--output", default="benchmark.json")
    args = parser.parse_args(argv)
    if args.aoi_run:
        rows = []
        for run_dir in args.aoi_run:
            for backend in args.backends:
                print(f"aoi run loop: {run_dir} {backend} ...", file=sys.stderr, flush=True)
                rows.append(aoi_run_loop(run_dir, backend, args.input_dir, args.batch_size, args.decode_threads,
                                         max(1, min(args.repeats, 5))))  # fmt: skip
        _write(rows, Path(args.output), aoi_run_table(rows))
        return 0
    rows = []
    for n_train in args.train_images:
        for model in args.models:
            variants = (
                [(r, None) for r in args.coreset_ratios]
                if model == "patchcore"
                else [(None, d) for d in args.padim_stats_dtype]
            )
            for ratio, stats_dtype in variants:
                cfg = {
                    "model": model,
                    "root": args.root,
                    "category": args.category,
                    "backbone": args.backbone,
                    "weights": args.weights,
                    "image_size": args.image_size,
                    "coreset_ratio": ratio,
                    "projection_dim": args.projection_dim,
                    "n_features": args.n_features,
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "workers": args.workers,
                    "train_images": n_train,
                    "onnx": not args.no_onnx,
                    "stats_dtype": stats_dtype,
                }
                variant = f"ratio={ratio}" if ratio is not None else f"stats={stats_dtype}"
                print(f"running {model} {variant} N={n_train or 'all'} ...", file=sys.stderr, flush=True)
                rows.append(run_isolated(cfg))
    output = Path(args.output)
    output.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    markdown = table(rows)
    output.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    written = [str(output), str(output.with_suffix(".md"))]
    if len(args.train_images) > 1:
        written.append(str(plot_scaling(rows, output.with_suffix(".png"))))
    print("\nwritten: " + ", ".join(written))
    return 0


def plot_scaling(rows: list[dict], path: Path) -> Path:
    """Fit time and peak RSS against the number of training images, one line per model/ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            label = r["model"] + (f" {r['coreset_ratio']}" if r.get("coreset_ratio") else "")
            series.setdefault(label, []).append(r)
    for label, items in series.items():
        items = sorted(items, key=lambda r: r["train_images"])
        n = [r["train_images"] for r in items]
        axes[0].plot(n, [r["fit_total_s"] for r in items], marker="o", label=label)
        axes[1].plot(n, [r["peak_rss_mb"] for r in items], marker="o", label=label)
    for ax, title in zip(axes, ("fit time (s)", "peak RSS (MB)")):
        ax.set_xlabel("training images")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
