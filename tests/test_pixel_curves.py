"""Binned pixel AUROC / AUPRO against sklearn and an exact AUPRO written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from aoi_lightning.metrics.pixel_curves import PixelHistograms, best_bin, confusion_at_bin, pixel_aupro, pixel_auroc

STRUCTURE_8 = np.ones((3, 3), dtype=int)


def _random_images(seed: int, n: int = 6, size: int = 48, scale: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(map, mask) pairs: smooth noise maps raised inside blob/rectangle defects; some images are good."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        amap = ndimage.gaussian_filter(rng.random((size, size)), 2.0) + 0.3 * rng.random((size, size))
        mask = np.zeros((size, size), dtype=bool)
        if i % 3 != 0:
            for _ in range(int(rng.integers(1, 4))):
                y, x = rng.integers(0, size - 10, size=2)
                h, w = rng.integers(2, 10, size=2)
                mask[y : y + h, x : x + w] = True
            mask[int(rng.integers(size)), int(rng.integers(size))] = True  # single-pixel region
            amap = amap + mask * rng.uniform(0.1, 0.6)
        out.append((amap.astype(np.float32) * scale, mask))
    return out


def _histograms(images: list[tuple[np.ndarray, np.ndarray]], num_bins: int = 1 << 16) -> PixelHistograms:
    hist = PixelHistograms(num_bins=num_bins)
    for amap, mask in images:
        hist.update("g", torch.from_numpy(amap), torch.from_numpy(mask))
    return hist


def exact_aupro(images: list[tuple[np.ndarray, np.ndarray]], fpr_limit: float = 0.3) -> float:
    """Per-region overlap at every distinct threshold (8-connected regions), area up to `fpr_limit` / fpr_limit."""
    values, fp_weight, pro_weight = [], [], []
    n_neg, n_regions = 0, 0
    for amap, mask in images:
        labels, count = ndimage.label(mask, structure=STRUCTURE_8)
        areas = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
        values.append(amap.astype(np.float64).ravel())
        fp_weight.append((labels.ravel() == 0).astype(np.float64))
        w = np.where(labels.ravel() > 0, 1.0 / areas[labels.ravel()], 0.0)
        pro_weight.append(w)
        n_neg += int((labels == 0).sum())
        n_regions += count
    v, fpw, prw = np.concatenate(values), np.concatenate(fp_weight), np.concatenate(pro_weight)
    order = np.argsort(-v, kind="stable")
    v, fpw, prw = v[order], fpw[order], prw[order]
    last = np.r_[v[1:] != v[:-1], True]  # end of each group of equal values: one threshold per distinct value
    fpr = np.r_[0.0, np.cumsum(fpw)[last] / n_neg]
    pro = np.r_[0.0, np.cumsum(prw)[last] / n_regions]
    keep = fpr <= fpr_limit
    xs, ys = fpr[keep], pro[keep]
    nxt = int(keep.sum())
    if nxt < fpr.size and xs[-1] < fpr_limit:
        y = np.interp(fpr_limit, fpr[nxt - 1 : nxt + 1], pro[nxt - 1 : nxt + 1])
        xs, ys = np.r_[xs, fpr_limit], np.r_[ys, y]
    return float(np.trapezoid(ys, xs) / fpr_limit)


@pytest.mark.parametrize("scale", [1.0, 250.0])
def test_pixel_auroc_matches_sklearn(scale: float) -> None:
    images = _random_images(0, scale=scale)
    hist = _histograms(images).merged()
    y = np.concatenate([m.ravel() for _, m in images])
    s = np.concatenate([a.ravel() for a, _ in images])
    assert float(hist.pos.sum()) == y.sum() and float(hist.neg.sum()) == (~y).sum()
    assert pixel_auroc(hist) == pytest.approx(roc_auc_score(y, s), abs=1e-3)


@pytest.mark.parametrize(("seed", "scale"), [(1, 1.0), (2, 40.0), (3, 0.01)])
def test_pixel_aupro_matches_exact_implementation(seed: int, scale: float) -> None:
    images = _random_images(seed, n=8, scale=scale)
    hist = _histograms(images).merged()
    expected_regions = sum(ndimage.label(m, structure=STRUCTURE_8)[1] for _, m in images)
    assert hist.regions == expected_regions
    assert pixel_aupro(hist, 0.3) == pytest.approx(exact_aupro(images, 0.3), abs=2e-3)


def test_regions_are_eight_connected() -> None:
    """Two pixels touching at a corner are one region; one detected and one missed pixel give PRO 0.5."""
    mask = np.zeros((8, 8), dtype=bool)
    mask[2, 2] = mask[3, 3] = True
    amap = np.zeros((8, 8), dtype=np.float32)
    amap[2, 2] = 1.0
    hist = _histograms([(amap, mask)]).merged()
    assert hist.regions == 1
    # at a threshold just above 0 only pixel (2, 2) fires: FPR 0, overlap 1/2
    index = int(hist.pro.nonzero().max())
    assert float(hist.pro[index:].sum()) == pytest.approx(0.5)


def test_perfect_and_inverted_maps() -> None:
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:8, 4:8] = True
    perfect = mask.astype(np.float32) * 5.0
    hist = _histograms([(perfect, mask)]).merged()
    assert pixel_auroc(hist) == pytest.approx(1.0)
    assert pixel_aupro(hist) == pytest.approx(1.0)
    inverted = _histograms([((~mask).astype(np.float32) * 5.0, mask)]).merged()
    assert pixel_auroc(inverted) == pytest.approx(0.0)
    assert pixel_aupro(inverted) == pytest.approx(0.0)


def test_undefined_metrics_are_nan() -> None:
    good_only = _histograms([(np.random.default_rng(0).random((8, 8)).astype(np.float32), np.zeros((8, 8), bool))])
    assert np.isnan(pixel_auroc(good_only.merged()))
    assert np.isnan(pixel_aupro(good_only.merged()))


def test_growing_range_equals_seeing_everything_at_once() -> None:
    """Values larger than the current range arriving later merge bins exactly like a grid fixed from the start."""
    images = [(a * (10.0**i), m) for i, (a, m) in enumerate(_random_images(4, n=5))]
    grown = _histograms(images, num_bins=1 << 12)  # smallest values first: the grid doubles several times
    fixed = _histograms(images[::-1], num_bins=1 << 12)  # largest first: the final grid from the start
    assert grown.exponent == fixed.exponent
    a, b = grown.merged(), fixed.merged()
    torch.testing.assert_close(a.neg, b.neg, rtol=0, atol=0)
    torch.testing.assert_close(a.pos, b.pos, rtol=0, atol=0)
    torch.testing.assert_close(a.pro, b.pro, rtol=1e-12, atol=1e-12)
    assert a.regions == b.regions
    assert pixel_auroc(a) == pytest.approx(pixel_auroc(b), abs=1e-12)
    assert pixel_aupro(a) == pytest.approx(pixel_aupro(b), abs=1e-12)


@pytest.mark.parametrize("top", [256.0, 255.9, 1.0e-6, 3.0e5])
def test_largest_value_is_inside_the_range(top: float) -> None:
    """The maximum is never clamped into the last bin: edge(bin(v)) < v <= edge(bin(v)) + width."""
    hist = PixelHistograms(num_bins=256)
    values = torch.tensor([[0.0, top / 3], [top / 2, top]], dtype=torch.float32)
    hist.update("g", values, torch.zeros(2, 2, dtype=torch.bool))
    v = float(values.max())
    idx = int(hist.bin_index(torch.tensor([v])))
    assert idx * hist.width < v <= (idx + 1) * hist.width
    assert hist.width <= 2 * v / hist.num_bins  # and the grid is not wastefully coarse


def test_groups_merge_by_name() -> None:
    images = _random_images(5, n=4)
    hist = PixelHistograms(num_bins=1 << 10)
    for i, (amap, mask) in enumerate(images):
        hist.update(f"split{i % 2}", torch.from_numpy(amap), torch.from_numpy(mask))
    both = hist.merged()
    only0 = hist.merged(["split0"])
    only1 = hist.merged(["split1"])
    torch.testing.assert_close(only0.neg + only1.neg, both.neg)
    assert only0.regions + only1.regions == both.regions
    assert float(hist.merged(["nope"]).neg.sum()) == 0.0


@pytest.mark.parametrize("metric", ["f1", "iou"])
def test_best_bin_matches_brute_force_over_edges(metric: str) -> None:
    images = _random_images(6, n=4)
    hists = _histograms(images, num_bins=1 << 8)
    hist = hists.merged()
    edges = hists.edges().numpy()
    y = np.concatenate([m.ravel() for _, m in images])
    s = np.concatenate([a.ravel() for a, _ in images]).astype(np.float64)
    best_val, best_idx = -1.0, -1
    for j, edge in enumerate(edges):
        pred = hists.bin_index(torch.from_numpy(s)).numpy() >= j
        tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
        val = 2 * tp / (2 * tp + fp + fn) if metric == "f1" else tp / (tp + fp + fn)
        if val >= best_val:
            best_val, best_idx = val, j
        # a bin edge threshold is exact for the strict rule: bin >= j  <=>  value > edge (edge 0: values > 0)
        assert (s[pred] > edge).all() and (s[~pred] <= edge).all()
    index, value = best_bin(hist, metric)
    assert index == best_idx
    assert value == pytest.approx(best_val, abs=1e-12)
    tp, fp, fn, tn = confusion_at_bin(hist, index)
    assert tp + fp + fn + tn == y.size
