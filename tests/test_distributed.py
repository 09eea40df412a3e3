"""DDP: unpadded shards, exact combination of the ranks' statistics, and 2-process fit/predict over gloo that
match the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aoi_lightning.data.synthetic import generate_synthetic_mvtec
from aoi_lightning.distributed import ShardSampler, StatisticsDDPStrategy, resolve_strategy
from aoi_lightning.metrics.evaluation import EvaluationCollector
from aoi_lightning.metrics.pixel_curves import PixelHistograms
from aoi_lightning.models.components.gaussian import StreamingMoments

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
SIZE = 64
N_TRAIN = 13  # odd: the shards are uneven, and a padding sampler would repeat an image


# -- units ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ranks", [(13, 2), (13, 3), (2, 2), (1, 2), (100, 8)])
def test_shard_sampler_is_a_contiguous_partition(n: int, ranks: int) -> None:
    data = list(range(n))
    shards = [list(ShardSampler(data, ranks, r)) for r in range(ranks)]
    assert sum(shards, []) == data  # in order, every item once, no padding
    assert [len(ShardSampler(data, ranks, r)) for r in range(ranks)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_strategy_names_map_to_the_statistics_strategy() -> None:
    assert isinstance(resolve_strategy("ddp", 2, 1), StatisticsDDPStrategy)
    assert isinstance(resolve_strategy("auto", 4, 1), StatisticsDDPStrategy)
    assert isinstance(resolve_strategy("auto", "0,1", 1), StatisticsDDPStrategy)
    assert isinstance(resolve_strategy("auto", 1, 2), StatisticsDDPStrategy)
    assert resolve_strategy("auto", 1, 1) == "auto"
    assert resolve_strategy("single_device", 1, 1) == "single_device"
    with pytest.raises(ValueError, match="ddp_spawn.*not supported"):
        resolve_strategy("ddp_spawn", 2, 1)


def _moments(x: torch.Tensor) -> StreamingMoments:
    m = StreamingMoments(chunk=3)
    for part in x.split(4):
        m.update(part)
    return m


def test_reshift_then_sum_equals_one_pass() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, 7, generator=gen, dtype=torch.float64) * 3 + 10  # (N, C, P)
    whole = _moments(x)
    a, b = _moments(x[:9]), _moments(x[9:])
    b.reshift_(a.shift)
    a.sum += b.sum
    a.outer += b.outer
    a.count += b.count
    mean_w, cov_w = whole.mean_cov()
    mean_ab, cov_ab = a.mean_cov()
    torch.testing.assert_close(mean_ab, mean_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov_ab, cov_w, rtol=1e-10, atol=1e-10)
    reference = torch.stack([torch.cov(x[:, :, p].T) for p in range(x.shape[2])])
    torch.testing.assert_close(cov_ab, reference, rtol=1e-10, atol=1e-10)


def _maps(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        amap = torch.rand(16, 16, generator=gen) * (1 + 5 * i)  # growing range: the grids differ per share
        mask = torch.zeros(16, 16, dtype=torch.bool)
        mask[2 + i : 6 + i, 3:7] = True
        out.append((amap, mask))
    return out


def test_pixel_histograms_merge_equals_one_histogram() -> None:
    items = _maps(0, 6)
    whole, first, second = PixelHistograms(num_bins=256), PixelHistograms(num_bins=256), PixelHistograms(num_bins=256)
    for i, (amap, mask) in enumerate(items):
        whole.update("test/x", amap, mask)
        (first if i < 2 else second).update("test/x", amap, mask)
    first.merge_from([second])
    assert first.exponent == whole.exponent
    for name in ("neg", "pos", "pro"):
        torch.testing.assert_close(getattr(first.groups["test/x"], name), getattr(whole.groups["test/x"], name))
    assert first.groups["test/x"].regions == whole.groups["test/x"].regions == 6


def test_collector_merge_keeps_order_and_metrics() -> None:
    items = _maps(1, 6)

    def batch(sel):
        return {
            "split": ["test"] * len(sel),
            "defect_type": ["good" if i % 2 else "scratch" for i in sel],
            "label": torch.tensor([0 if i % 2 else 1 for i in sel]),
            "image_path": [f"img{i}.png" for i in sel],
            "has_mask": torch.tensor([not i % 2 for i in sel]),
            "mask": torch.stack([items[i][1] for i in sel]).unsqueeze(1).float(),
        }

    def scores(sel):
        return torch.tensor([float(i) for i in sel]), torch.stack([items[i][0] for i in sel]).unsqueeze(1)

    whole = EvaluationCollector(num_bins=512)
    whole.update(batch(range(6)), *scores(range(6)), pixel_threshold=2.0)
    shares = [EvaluationCollector(num_bins=512) for _ in range(2)]
    shares[0].update(batch(range(3)), *scores(range(3)), pixel_threshold=2.0)
    shares[1].update(batch(range(3, 6)), *scores(range(3, 6)), pixel_threshold=2.0)
    merged = EvaluationCollector(num_bins=512)
    merged.merge_from(shares)
    assert [r["image_path"] for r in merged.records] == [f"img{i}.png" for i in range(6)]
    assert merged.confusion == whole.confusion
    assert merged.metrics(("test",), image_threshold=2.5, pixel_threshold=2.0) == whole.metrics(
        ("test",), image_threshold=2.5, pixel_threshold=2.0
    )


# -- two processes over gloo ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    return Path(generate_synthetic_mvtec(root, n_train=N_TRAIN, n_test_good=5, n_test_per_defect=3, image_size=SIZE))


def _fit_args(model: str, data: Path, runs: Path, run_id: str) -> list[str]:
    return [
        "fit", "--config", str(QUICKSTART), "--model", model,
        "--data.root", str(data), "--data.image_size", str(SIZE), "--data.num_workers", "0",
        "--data.train_batch_size", "4", "--data.eval_batch_size", "4",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--runs_root", str(runs), "--run_id", run_id,
    ]  # fmt: skip


def _aoi_processes(argv: list[str], cwd: Path) -> None:
    """`aoi` as a console command (Lightning's DDP launcher re-runs the command line once per extra process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "aoi_lightning.cli", *argv, "--trainer.strategy", "ddp", "--trainer.devices", "2"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_run(one: Path, two: Path) -> None:
    a = torch.load(one / "weights" / "model.ckpt", weights_only=True)["state_dict"]
    b = torch.load(two / "weights" / "model.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        if a[key].is_floating_point():
            tol = 2e-3 if a[key].dtype == torch.float16 else 1e-4  # float16: one rounding step apart at most
            torch.testing.assert_close(b[key], a[key], rtol=tol, atol=tol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    ta, tb = (json.loads((r / "thresholds.json").read_text()) for r in (one, two))
    assert tb["method"] == ta["method"]
    assert tb["image_threshold"] == pytest.approx(ta["image_threshold"], rel=1e-5)
    assert tb["pixel_threshold"] == pytest.approx(ta["pixel_threshold"], rel=1e-5)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    for section in ("test", "full_test"):
        assert mb[section].keys() == ma[section].keys()
        for key, value in ma[section].items():
            if isinstance(value, float):
                assert mb[section][key] == pytest.approx(value, abs=1e-5), (section, key)
            else:
                assert mb[section][key] == value, (section, key)
    for split in ("train", "val", "test"):
        pa, pb = _lines(one / f"preds_{split}.jsonl"), _lines(two / f"preds_{split}.jsonl")
        assert [r["image_path"] for r in pb] == [r["image_path"] for r in pa]
        assert [r.get("label") for r in pb] == [r.get("label") for r in pa]
        for ra, rb in zip(pa, pb):
            assert rb["pred_score"] == pytest.approx(ra["pred_score"], rel=1e-4, abs=1e-4)
    ca, cb = (json.loads((r / "export" / "consistency.json").read_text()) for r in (one, two))
    assert cb["status"] == ca["status"] == "PASSED" and cb["num_images"] == ca["num_images"]  # all test images
    meta = json.loads((two / "meta.json").read_text())
    assert meta["timings"]["num_processes"] == 2 and meta["timings"]["num_fit_images"] == N_TRAIN


@pytest.mark.parametrize("model", ["Padim", "Patchcore"])
def test_two_process_fit_and_predict_match_one_process(model: str, ddp_data: Path, tmp_path: Path, aoi_cli) -> None:
    runs = tmp_path / "runs"
    assert aoi_cli(_fit_args(model, ddp_data, runs, "one")) == 0
    _aoi_processes(_fit_args(model, ddp_data, runs, "two"), tmp_path)
    one, two = runs / model.lower() / "synthetic" / "one", runs / model.lower() / "synthetic" / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    _assert_same_run(one, two)
    if model != "Patchcore":
        return
    # predict: one file per rank merged in input order, no duplicate from the shards
    ckpt, config = one / "weights" / "model.ckpt", one / "config.yaml"
    base = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"]
    assert aoi_cli(base) == 0
    single = _lines(one / "predictions" / "preds.jsonl")
    (one / "predictions").rename(tmp_path / "single")
    _aoi_processes(base, tmp_path)
    double = _lines(one / "predictions" / "preds.jsonl")
    expected = sorted(str(p) for p in (ddp_data / "synthetic" / "test").rglob("*.png"))
    assert len(single) == len(expected) and sorted(r["image_path"] for r in single) == expected
    assert [r["image_path"] for r in double] == [r["image_path"] for r in single]
    assert [r["label"] for r in double] == [r["label"] for r in single]
    assert [r["num_defects"] for r in double] == [r["num_defects"] for r in single]
    for ra, rb in zip(single, double):
        assert rb["pred_score"] == pytest.approx(ra["pred_score"], rel=1e-4, abs=1e-4)
    assert sorted(p.name for p in (one / "predictions").glob("preds*")) == ["preds.jsonl"]  # rank files merged
    report = json.loads((one / "predictions" / "report.json").read_text())
    assert report["num_images"] == len(expected)
