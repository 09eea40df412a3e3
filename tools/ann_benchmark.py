#!/usr/bin/env python
"""Approximate nearest-neighbour search for PatchCore: recall, speed and AUROC of `ivf_flat` and `hnsw` against
exact faiss search (`flat`).

Uses a fitted PatchCore run (its checkpoint and data settings). Banks measured:

- `coreset`: the run's memory bank (what `aoi fit` stored);
- `full`: every training patch (the bank of `coreset_ratio: 1.0`);
- `enlarged`: the full bank repeated with seeded Gaussian jitter up to `--large_size` rows (the copies lie about
  `--jitter` times the bank's median nearest-neighbour spacing from their originals), standing in for a bank
  of many more training images.

Queries are the patches of test images (one batch = the patches of one image, what a batch-1 inference
searches). Recall@1: share of queries whose returned neighbour is the exact one; recall@9: share of the exact 9
nearest found among the 9 returned; dist_excess: mean relative excess of the returned nearest distance (the
patch score) over the exact one. AUROC: image and pixel AUROC on the whole test folder with each index, scored
through the model's own forward pass (features computed once).

    python tools/ann_benchmark.py --run runs/patchcore/transistor/<run_id> --out ann_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: (index, build parameters, search-time parameter, values of it). Search-time settings reuse one build.
SETTINGS = (
    ("ivf_flat", {}, "nprobe", (4, 8, 16, 32)),
    ("hnsw", {}, "ef_search", (32, 64, 128, 256)),
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median_ms(fn, batches: list) -> float:
    times = []
    for q in batches:
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def _timed_search(searcher, batches: list[torch.Tensor]) -> tuple[float, np.ndarray, np.ndarray]:
    """k=1 search batch by batch: median ms per batch, distances and indices of all queries."""
    times, dists, idxs = [], [], []
    for q in batches:
        start = time.perf_counter()
        d, i = searcher.search(q, 1)
        times.append(time.perf_counter() - start)
        dists.append(d[:, 0].numpy())
        idxs.append(i[:, 0].numpy())
    return statistics.median(times) * 1000.0, np.concatenate(dists), np.concatenate(idxs)


def _set_search_param(searcher, name: str, value: int) -> None:
    """Change a search-time parameter of a built searcher (no rebuild needed)."""
    if searcher.kind == "ivf_flat" and name == "nprobe":
        searcher.index.nprobe = value
    elif searcher.kind == "hnsw" and name == "ef_search":
        searcher.index.hnsw.efSearch = value
    else:
        raise ValueError(f"{name} does not apply to a {searcher.kind} searcher")
    searcher.params[name] = value


def _features(model, samples, size, batch_size: int = 16, keep_batches: bool = False):
    """Patch features (N, D, h, w) of the samples, and the data dicts of the batches (masks, labels)."""
    from torch.utils.data import DataLoader

    from aoi_lightning.data.mvtec import AnomalyDataset

    loader = DataLoader(AnomalyDataset(samples, size), batch_size=batch_size, num_workers=0)
    feats, batches = [], []
    with torch.inference_mode():
        for batch in loader:
            feats.append(model.embed(batch["image"]))
            if keep_batches:
                batch.pop("image")
                batches.append(batch)
    return torch.cat(feats), batches


def _rows(emb: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).numpy(), dtype=np.float32)


def _enlarge(bank: np.ndarray, size: int, jitter: float, seed: int) -> tuple[np.ndarray, float]:
    """`bank` repeated up to at least `size` rows, every copy after the first with Gaussian jitter."""
    from aoi_lightning.models.components.nearest_neighbors import FaissSearcher

    rng = np.random.default_rng(seed)
    probe = bank[rng.choice(bank.shape[0], size=min(2000, bank.shape[0]), replace=False)]
    d, _ = FaissSearcher(torch.from_numpy(bank)).search(torch.from_numpy(probe), 2)
    spacing = float(np.median(d[:, 1].numpy()))  # column 0 is the row itself
    sigma = jitter * spacing / np.sqrt(bank.shape[1])
    copies = -(-size // bank.shape[0])
    out = np.empty((copies * bank.shape[0], bank.shape[1]), dtype=np.float32)
    out[: bank.shape[0]] = bank
    for c in range(1, copies):
        part = out[c * bank.shape[0] : (c + 1) * bank.shape[0]]
        part[:] = bank
        part += rng.standard_normal(part.shape, dtype=np.float32) * np.float32(sigma)
    return out, spacing


def _recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact k neighbours (per row) that are among the k found."""
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True))
    return hits / exact.size


def bench_bank(
    name: str, bank: np.ndarray, query_batches: list[np.ndarray], seed: int, hnsw_build_threads: int = 1
) -> list[dict]:
    """Exact and approximate search over one bank: build time, ms per query batch, recall, distance excess."""
    from aoi_lightning.models.components.nearest_neighbors import FaissSearcher

    tb = torch.from_numpy(bank)
    queries = torch.from_numpy(np.concatenate(query_batches))
    tq = [torch.from_numpy(q) for q in query_batches]
    base = {"bank": name, "bank_size": int(bank.shape[0]), "dim": int(bank.shape[1]), "queries": len(queries)}
    _log(f"[{name}] {bank.shape[0]} x {bank.shape[1]} bank, {len(queries)} queries in {len(tq)} batches")
    start = time.perf_counter()
    exact = FaissSearcher(tb, "flat")
    build = time.perf_counter() - start
    exact_ms, ed1, ei1 = _timed_search(exact, tq)
    ei9 = exact.search(queries, 9)[1].numpy()
    rows = [{**base, "index": "flat", "params": {}, "build_s": build, "ms_per_batch": exact_ms, "speedup": 1.0,
             "recall_at_1": 1.0, "recall_at_9": 1.0, "dist_excess": 0.0}]  # fmt: skip
    del exact
    _log(f"[{name}] flat: {exact_ms:.2f} ms per batch")
    positive = ed1 > 0
    for kind, build_params, knob, values in SETTINGS:
        start = time.perf_counter()
        if kind == "hnsw":
            build_params = {**build_params, "build_threads": hnsw_build_threads}
        searcher = FaissSearcher(tb, kind, build_params, seed)
        build = time.perf_counter() - start
        if searcher.kind != kind:
            _log(f"[{name}] {kind}: falls back to exact search on this bank, skipped")
            continue
        _log(f"[{name}] {kind} built in {build:.1f} s")
        for value in values:
            _set_search_param(searcher, knob, value)
            ms, d1, i1 = _timed_search(searcher, tq)
            i9 = searcher.search(queries, 9)[1].numpy()
            row = {
                **base,
                "index": kind,
                "params": dict(searcher.params),
                "build_s": build,
                "ms_per_batch": ms,
                "speedup": exact_ms / ms,
                "recall_at_1": float(np.mean(i1 == ei1)),
                "recall_at_9": _recall_at(i9, ei9),
                "dist_excess": float(np.mean(d1[positive] / ed1[positive] - 1.0)),
            }
            rows.append(row)
            _log(
                f"[{name}] {kind} {knob}={value}: recall@1 {row['recall_at_1']:.4f}, {ms:.2f} ms, x{row['speedup']:.1f}"
            )
        del searcher
    return rows


def thread_check(bank: np.ndarray, batch: np.ndarray, seed: int, default_threads: int, restore: int) -> list[dict]:
    """ms per batch-1 search (the patches of one image, k=1; and the one re-weighting query, k=9) at the default
    OpenMP thread count and at one thread, per index (default parameters)."""
    import faiss

    from aoi_lightning.models.components.nearest_neighbors import FaissSearcher

    tb, q = torch.from_numpy(bank), torch.from_numpy(batch)
    out = []
    # search-time behaviour: the HNSW graph is built with a narrower beam here to save time
    for kind, params in (("flat", None), ("ivf_flat", None), ("hnsw", {"ef_construction": 64})):
        searcher = FaissSearcher(tb, kind, params, seed)
        row = {"index": kind, "bank_size": int(bank.shape[0]), "default_threads": default_threads}
        for label, threads in (("default_threads", default_threads), ("one_thread", 1)):
            faiss.omp_set_num_threads(threads)
            row[f"ms_{label}"] = _median_ms(lambda x, s=searcher: s.search(x, 1), [q] * 9)
            row[f"ms_k9_one_query_{label}"] = _median_ms(lambda x, s=searcher: s.search(x[:1], 9), [q] * 25)
        out.append(row)
    faiss.omp_set_num_threads(restore)
    return out


def auroc_rows(model, bank_name: str, emb: torch.Tensor, batches: list[dict], size, configs) -> list[dict]:
    """Image / pixel AUROC on the test folder with each index, through the model's forward pass."""
    from aoi_lightning.metrics.evaluation import EvaluationCollector

    rows = []
    current: dict = {}
    model.embed = lambda images: current["emb"]  # features computed once, the rest of the forward pass as is
    try:
        for kind, params in configs:
            model.use_index(kind, dict(params))
            collector = EvaluationCollector()
            start = time.perf_counter()
            offset = 0
            with torch.inference_mode():
                for batch in batches:
                    n = len(batch["label"])
                    current["emb"] = emb[offset : offset + n]
                    offset += n
                    out = model(torch.zeros(n, 3, *size))
                    collector.update(batch, out.pred_score, out.anomaly_map, float("nan"))
            seconds = time.perf_counter() - start
            m = collector.metrics(("test",))
            effective = model.active_index or kind
            rows.append({"bank": bank_name, "bank_size": int(model.memory_bank.shape[0]), "index": kind,
                         "effective_index": effective, "params": dict(params), "image_auroc": m["image_auroc"],
                         "pixel_auroc": m["pixel_auroc"], "pixel_aupro": m["pixel_aupro"],
                         "num_images": m["num_images"], "seconds": seconds})  # fmt: skip
            _log(f"[auroc {bank_name}] {kind} {params}: image {m['image_auroc']:.4f} pixel {m['pixel_auroc']:.4f}")
    finally:
        del model.embed
        model.use_index("flat")
    exact = rows[0]
    for row in rows:
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            row[f"{key}_diff"] = row[key] - exact[key]
    return rows


def markdown(result: dict) -> str:
    lines = [
        "| bank | size | index | params | build s | recall@1 | recall@9 | dist excess | ms / batch | speed-up |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["search"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k != "build_threads") or "-"
        lines.append(
            f"| {r['bank']} | {r['bank_size']:,} | {r['index']} | {params} | {r['build_s']:.1f} | "
            f"{r['recall_at_1']:.4f} | {r['recall_at_9']:.4f} | {r['dist_excess']:.2e} | "
            f"{r['ms_per_batch']:.2f} | {r['speedup']:.1f}x |"
        )
    lines += [
        "",
        "| bank | size | index | params | image AUROC | diff | pixel AUROC | diff | pixel AUPRO | diff |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["auroc"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        lines.append(
            f"| {r['bank']} | {r['bank_size']:,} | {r['index']} | {params} | {r['image_auroc']:.4f} | "
            f"{r['image_auroc_diff']:+.4f} | {r['pixel_auroc']:.4f} | {r['pixel_auroc_diff']:+.5f} | "
            f"{r['pixel_aupro']:.4f} | {r['pixel_aupro_diff']:+.5f} |"
        )
    lines += [
        "",
        "| index | bank size | threads (default) | batch ms, default | batch ms, 1 thread | 1-query k=9 ms, default "
        "| 1-query k=9 ms, 1 thread |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["threads"]:
        lines.append(
            f"| {r['index']} | {r['bank_size']:,} | {r['default_threads']} | {r['ms_default_threads']:.2f} | "
            f"{r['ms_one_thread']:.2f} | {r['ms_k9_one_query_default_threads']:.3f} | "
            f"{r['ms_k9_one_query_one_thread']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a fitted PatchCore run directory")
    parser.add_argument("--root", default=None, help="MVTec root (default: the run's data.root)")
    parser.add_argument("--query_images", type=int, default=20, help="test images whose patches are the queries")
    parser.add_argument("--large_query_images", type=int, default=8, help="query images on the enlarged bank")
    parser.add_argument("--large_size", type=int, default=1_000_000, help="rows of the enlarged bank (0: skip)")
    parser.add_argument("--jitter", type=float, default=0.5, help="jitter of the copies, in bank NN spacings")
    parser.add_argument("--full_bank_auroc", action="store_true", help="AUROC with the full bank too (slow)")
    parser.add_argument(
        "--hnsw_build_threads", type=int, default=1, help="build_threads of the HNSW builds of the search table"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="OpenMP threads of faiss and torch for the timings (0: default)"
    )
    parser.add_argument("--out", default="ann_benchmark.json", help="JSON result (the table goes beside it, .md)")
    args = parser.parse_args(argv)

    import faiss

    from aoi_lightning.data.mvtec import scan_mvtec
    from aoi_lightning.rundir.loading import load_run_model

    torch.manual_seed(args.seed)
    default_threads = faiss.omp_get_max_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    module, info = load_run_model(args.run, require_thresholds=False)
    model = module.model
    root = args.root or (info.config.get("data") or {}).get("root")
    train, test = scan_mvtec(root, info.category)
    size = info.image_size
    start = time.perf_counter()
    test_emb, test_batches = _features(model, test, size, keep_batches=True)
    train_emb, _ = _features(model, train, size)
    _log(f"features of {len(train)} train and {len(test)} test images in {time.perf_counter() - start:.1f} s")

    step = max(1, len(test) // max(1, args.query_images))
    picked = list(range(0, len(test), step))
    query_batches = [_rows(test_emb[i : i + 1]) for i in picked[: args.query_images]]
    coreset = model.memory_bank.float().numpy()
    full = _rows(train_emb)
    del train_emb
    result: dict = {
        "run": str(Path(args.run).resolve()),
        "category": info.category,
        "image_size": list(size),
        "query_images": len(query_batches),
        "patches_per_image": int(query_batches[0].shape[0]),
        "threads": args.threads or "default",
        "hnsw_build_threads": args.hnsw_build_threads,
        "search": [],
    }
    result["search"] += bench_bank("coreset", coreset, query_batches, args.seed)
    result["search"] += bench_bank("full", full, query_batches, args.seed, args.hnsw_build_threads)
    result["threads"] = thread_check(
        full, query_batches[0], args.seed, default_threads, args.threads or default_threads
    )
    if args.large_size > 0:
        large, spacing = _enlarge(full, args.large_size, args.jitter, args.seed)
        result["enlarged"] = {"rows": int(large.shape[0]), "jitter": args.jitter, "nn_spacing": spacing,
                              "query_images": args.large_query_images}  # fmt: skip
        result["search"] += bench_bank(
            "enlarged", large, query_batches[: args.large_query_images], args.seed, args.hnsw_build_threads
        )
        del large

    configs = [("flat", {})] + [(k, {knob: v}) for k, _, knob, values in SETTINGS for v in values]
    result["auroc"] = auroc_rows(model, "coreset", test_emb, test_batches, size, configs)
    if args.full_bank_auroc:
        model.memory_bank = torch.from_numpy(full)
        defaults = [("flat", {}), ("ivf_flat", {}), ("hnsw", {})]
        result["auroc"] += auroc_rows(model, "full", test_emb, test_batches, size, defaults)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
