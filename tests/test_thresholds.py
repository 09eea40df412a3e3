"""Threshold search against sklearn / numpy, and the conformal false-reject guarantee checked empirically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_curve

from aoi_lightning.metrics.pixel_curves import PixelHistograms
from aoi_lightning.thresholds.search import (
    best_f1_threshold,
    best_pixel_threshold,
    conformal_threshold,
    quantile_threshold,
)


def _sklearn_best_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    return float(f1.max())


@pytest.mark.parametrize("seed", range(5))
def test_best_f1_matches_sklearn_precision_recall_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(60) < 0.4).astype(int)
    labels[:2] = [0, 1]
    scores = rng.normal(size=60) + 1.2 * labels
    scores[10:14] = scores[20]  # ties
    scores = scores * 300.0 + 1000.0  # large anomaly scores, far outside [0, 1]
    res = best_f1_threshold(torch.from_numpy(scores), torch.from_numpy(labels))
    assert res.metric == "f1"
    assert res.value == pytest.approx(_sklearn_best_f1(scores, labels), abs=1e-12)
    # the threshold reaches that F1 under the NG rule `score > threshold`
    assert f1_score(labels, scores > res.threshold) == pytest.approx(res.value, abs=1e-12)
    assert res.threshold == float(np.float32(res.threshold))  # survives the float32 threshold buffer


def test_best_f1_threshold_lies_between_distinct_scores() -> None:
    scores = torch.tensor([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = torch.tensor([0, 0, 0, 1, 1])
    res = best_f1_threshold(scores, labels)
    assert res.value == 1.0
    assert 0.3 <= res.threshold < 0.8
    assert res.threshold == pytest.approx(0.55)  # midway: robust to small score shifts


def test_best_f1_prefers_the_highest_threshold_among_ties() -> None:
    # thresholds at 0.9 and at 0.5 both give F1 = 2/3; the higher one rejects fewer good parts
    scores = torch.tensor([0.9, 0.7, 0.6, 0.5, 0.1])
    labels = torch.tensor([1, 0, 0, 1, 0])
    res = best_f1_threshold(scores, labels)
    assert res.value == pytest.approx(2 / 3)
    assert res.threshold > 0.7


def test_best_f1_threshold_robust_when_everything_is_ng() -> None:
    """When the best F1 calls every validation image NG, the threshold must sit below the lowest score with
    a margin: the same image scored again in another batch differs by float32 rounding (seen in `aoi fit`
    of PaDiM: val 263.04535, test pass 263.04532), and a threshold equal to the score flips it to OK."""
    scores = torch.tensor([263.04535, 268.5635, 289.6562, 281.8473, 296.7595, 412.4667], dtype=torch.float32)
    labels = torch.tensor([1, 0, 0, 1, 1, 1])
    res = best_f1_threshold(scores, labels)
    assert res.value == pytest.approx(0.8)
    shifted = scores.double() * (1 - 1e-6)  # a relative change far below any score gap
    assert bool((shifted > res.threshold).all()), f"threshold {res.threshold!r} is not below the lowest score"


def test_best_f1_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        best_f1_threshold(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


def test_best_pixel_threshold_is_a_bin_edge() -> None:
    hist = PixelHistograms(num_bins=1 << 10)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 4:8] = True
    amap = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) + 2.0 * mask
    hist.update("g", amap, mask)
    res = best_pixel_threshold(hist.merged(), hist.edges(), "f1")
    assert res.value == pytest.approx(1.0)
    pred = amap > res.threshold  # strict rule: the edge is exact for it
    assert bool((pred == mask).all())
    with pytest.raises(ValueError):
        best_pixel_threshold(PixelHistograms(num_bins=8).merged(), torch.zeros(8), "f1")


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 1.0])
def test_quantile_threshold_matches_numpy(q: float) -> None:
    values = np.random.default_rng(0).gamma(2.0, 3.0, size=137)
    exact = float(np.quantile(values, q))
    t = quantile_threshold(torch.from_numpy(values), q)
    # rounded up to float32 (the threshold buffer's precision): the quantile itself is not rejected by `s > t`
    assert t == float(np.float32(t)) and t >= exact
    assert float(np.nextafter(np.float32(t), np.float32(-np.inf))) < exact
    if q == 1.0:
        assert not (values.max() > t)


@pytest.mark.parametrize(("values", "q"), [(np.array([]), 0.5), (np.array([1.0]), 0.0), (np.array([1.0]), 1.5)])
def test_quantile_threshold_rejects_bad_input(values: np.ndarray, q: float) -> None:
    with pytest.raises(ValueError):
        quantile_threshold(values, q)


def test_conformal_threshold_rank_and_tie_rule() -> None:
    scores = np.arange(1.0, 20.0)  # n = 19, alpha 0.1: k = ceil(20 * 0.9) = 18
    t, guaranteed = conformal_threshold(scores, 0.1)
    assert guaranteed
    assert t == 18.0  # the 18th smallest score itself: under `s > t` a score equal to it stays OK
    _, small = conformal_threshold(np.arange(5.0), 0.1)  # n = 5 < 1/alpha - 1
    assert not small
    with pytest.raises(ValueError):
        conformal_threshold(np.array([]), 0.1)
    with pytest.raises(ValueError):
        conformal_threshold(scores, 1.0)


@pytest.mark.parametrize(("n", "alpha"), [(45, 0.1), (120, 0.05)])
def test_conformal_false_reject_rate_bounded_over_repeated_draws(n: int, alpha: float) -> None:
    """Exchangeable good parts: on average over calibration draws, the false-reject rate is <= alpha."""
    rng = np.random.default_rng(123)
    draws = 500
    frr = np.empty(draws)
    for i in range(draws):
        calibration = rng.gamma(2.0, 1.5, size=n)
        fresh = rng.gamma(2.0, 1.5, size=2000)
        t, guaranteed = conformal_threshold(calibration, alpha)
        assert guaranteed
        frr[i] = np.mean(fresh > t)
    k = math.ceil((n + 1) * (1 - alpha))
    assert frr.mean() <= alpha
    assert frr.mean() == pytest.approx(1 - k / (n + 1), abs=0.01)  # the exact expectation of the rank rule
    assert np.mean(frr <= alpha + 0.05) >= 0.8
