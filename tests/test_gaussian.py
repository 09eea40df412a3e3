"""Per-position Gaussian statistics against numpy/scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from aoi_lightning.models.components.gaussian import (
    GaussianStats,
    StreamingMoments,
    mahalanobis,
    panel_bounds,
    whitening_from_covariance,
)


def _random_embeddings(rng: np.random.Generator, n: int, channels: int, positions: int, offset: float) -> np.ndarray:
    """(N, C, P) correlated data with a per-channel offset."""
    mix = rng.normal(size=(positions, channels, channels))
    z = rng.normal(size=(n, positions, channels))
    x = np.einsum("npc,pdc->ndp", z, mix)  # (N, C, P)
    return x + offset + rng.normal(size=(1, channels, positions))


def _numpy_mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C, P) and unbiased covariance (P, C, C) with np.cov per position."""
    mean = x.mean(axis=0)
    cov = np.stack([np.cov(x[:, :, p], rowvar=False) for p in range(x.shape[2])])
    return mean, cov


def _feed(x: np.ndarray, batch_sizes: list[int]) -> StreamingMoments:
    moments = StreamingMoments()
    start = 0
    for size in batch_sizes:
        moments.update(torch.from_numpy(x[start : start + size]))
        start += size
    assert start == x.shape[0]
    return moments


@pytest.mark.parametrize("offset", [0.0, 1.0e7])
def test_streaming_moments_match_numpy_over_several_batches(offset: float) -> None:
    rng = np.random.default_rng(0)
    x = _random_embeddings(rng, n=37, channels=6, positions=5, offset=offset)
    moments = _feed(x, [5, 1, 13, 8, 10])
    mean, cov = moments.mean_cov()
    ref_mean, ref_cov = _numpy_mean_cov(x)
    assert moments.count == 37
    assert mean.dtype == torch.float64 and tuple(mean.shape) == (6, 5)
    assert tuple(cov.shape) == (5, 6, 6)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12, atol=1e-9)
    # a naive sum-of-squares estimate loses every digit at an offset of 1e7; the shifted one keeps them
    np.testing.assert_allclose(cov.numpy(), ref_cov, rtol=1e-7, atol=1e-7)


def test_streaming_moments_independent_of_batching() -> None:
    x = _random_embeddings(np.random.default_rng(1), n=20, channels=4, positions=3, offset=5.0)
    _, cov_a = _feed(x, [20]).mean_cov()
    _, cov_b = _feed(x, [1] * 20).mean_cov()
    np.testing.assert_allclose(cov_a.numpy(), cov_b.numpy(), rtol=1e-10, atol=1e-12)


def test_streaming_moments_need_two_images() -> None:
    moments = StreamingMoments()
    moments.update(torch.randn(1, 3, 2))
    with pytest.raises(ValueError, match="at least 2"):
        moments.mean_cov()


@pytest.mark.parametrize("regularization", [0.0, 0.01, 1.0])
def test_whitening_is_inverse_cholesky_of_regularised_covariance(regularization: float) -> None:
    x = _random_embeddings(np.random.default_rng(2), n=50, channels=7, positions=4, offset=0.0)
    _, cov = _numpy_mean_cov(x)
    w = whitening_from_covariance(torch.from_numpy(cov), regularization).numpy()
    assert w.dtype == np.float64
    for p in range(cov.shape[0]):
        expected = np.linalg.inv(cov[p] + regularization * np.eye(7))
        np.testing.assert_allclose(w[p].T @ w[p], expected, rtol=1e-8, atol=1e-10)
        assert np.allclose(np.triu(w[p], 1), 0.0)  # lower triangular


def test_whitening_rejects_indefinite_covariance() -> None:
    cov = -torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone()
    with pytest.raises(ValueError, match="positive definite"):
        whitening_from_covariance(cov, 0.01)


def test_mahalanobis_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    train = _random_embeddings(rng, n=40, channels=5, positions=6, offset=2.0)
    mean, cov = _numpy_mean_cov(train)
    reg = 0.05
    w_t = whitening_from_covariance(torch.from_numpy(cov), reg).transpose(1, 2)
    queries = _random_embeddings(rng, n=4, channels=5, positions=6, offset=2.5)
    dist = mahalanobis(torch.from_numpy(queries), torch.from_numpy(mean), w_t).numpy()
    assert dist.shape == (4, 6)
    for b in range(4):
        for p in range(6):
            vi = np.linalg.inv(cov[p] + reg * np.eye(5))
            expected = scipy_mahalanobis(queries[b, :, p], mean[:, p], vi)
            assert dist[b, p] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("panels", [1, 2, 3, 4, 7])
def test_gaussian_stats_module_float32_close_to_float64(panels: int) -> None:
    rng = np.random.default_rng(4)
    channels, positions = 7, 3
    train = _random_embeddings(rng, n=30, channels=channels, positions=positions, offset=0.0)
    moments = _feed(train, [30])
    mean, cov = moments.mean_cov()
    w = whitening_from_covariance(cov, 0.01)
    stats = GaussianStats(panels=panels)
    stats.set(mean, w)
    state = stats.state_dict()
    assert set(state) == {"mean", "wt_panels", "bounds"}
    assert state["mean"].dtype == state["wt_panels"].dtype == torch.float32
    # the zero blocks below the row panels are not stored: sum over panels of rows x (C - first column)
    bounds = panel_bounds(channels, panels)
    assert stats.bounds.tolist() == bounds and bounds[0] == 0 and bounds[-1] == channels
    stored = sum((b - a) * (channels - a) for a, b in zip(bounds[:-1], bounds[1:]))
    assert tuple(stats.wt_panels.shape) == (positions, stored)
    if panels == channels:  # one row per panel: exactly the upper triangle
        assert stored == channels * (channels + 1) // 2
    q = torch.from_numpy(train[:5]).float()
    expected = mahalanobis(q.double(), mean, w.transpose(1, 2)).numpy()
    np.testing.assert_allclose(stats(q).numpy(), expected, rtol=1e-4, atol=1e-4)
    # a fresh module takes the fitted shapes from a state dict
    loaded = GaussianStats(panels=1)
    loaded.load_state_dict(state)
    np.testing.assert_array_equal(loaded(q).numpy(), stats(q).numpy())


@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_gaussian_stats_chunks_and_float16_storage(chunk: int) -> None:
    rng = np.random.default_rng(6)
    channels, positions = 9, 5
    train = _random_embeddings(rng, n=40, channels=channels, positions=positions, offset=1.0)
    mean, cov = _feed(train, [40]).mean_cov()
    w = whitening_from_covariance(cov, 0.01)
    q = torch.from_numpy(train[:7]).float()
    expected = mahalanobis(q.double(), mean, w.transpose(1, 2)).numpy()
    full = GaussianStats(panels=3, chunk=chunk)
    full.set(mean, w)
    np.testing.assert_allclose(full(q).numpy(), expected, rtol=1e-5, atol=1e-5)
    half = GaussianStats(panels=3, dtype="float16", chunk=chunk)
    half.set(mean, w)
    assert half.wt_panels.dtype == torch.float16 and half.mean.dtype == torch.float32
    assert half.wt_panels.element_size() * 2 == full.wt_panels.element_size()
    out = half(q)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-3)
    # a float32 module takes a float16 checkpoint as it is
    loaded = GaussianStats()
    loaded.load_state_dict(half.state_dict())
    assert loaded.wt_panels.dtype == torch.float16
    np.testing.assert_array_equal(loaded(q).numpy(), out.numpy())


def test_gaussian_stats_refuses_inconsistent_panels() -> None:
    stats = GaussianStats(panels=2)
    mean = torch.zeros(4, 3, dtype=torch.float64)
    stats.set(mean, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    state = stats.state_dict()
    state["wt_panels"] = state["wt_panels"][:, :-1]
    with pytest.raises(RuntimeError, match="does not match the panel bounds"):
        GaussianStats().load_state_dict(state)


def test_fit_on_x_score_x_mean_squared_distance_is_exact() -> None:
    """With no regularisation, sum_i d_i^2 over the training set equals (N - 1) * C at every position."""
    n, channels = 25, 6
    train = _random_embeddings(np.random.default_rng(5), n=n, channels=channels, positions=4, offset=3.0)
    mean, cov = _feed(train, [10, 15]).mean_cov()
    w_t = whitening_from_covariance(cov, 0.0).transpose(1, 2)
    d2 = mahalanobis(torch.from_numpy(train), mean, w_t).pow(2).sum(dim=0).numpy()
    np.testing.assert_allclose(d2, (n - 1) * channels, rtol=1e-8)
    # the mean itself is at distance 0
    at_mean = mahalanobis(mean.unsqueeze(0), mean, w_t)
    assert float(at_mean.abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_blockwise_storage_equals_whole_storage(dtype: str) -> None:
    """Storing the factor block by block (as the PaDiM fit does, without a full float32 copy) gives exactly the
    buffers of storing it whole, including blocks that do not divide the positions."""
    x = _random_embeddings(np.random.default_rng(4), n=30, channels=9, positions=11, offset=2.0)
    moments = _feed(x, [30])
    whole = GaussianStats(panels=3, dtype=dtype)
    whole.set(*moments.whitening(0.01))
    blocks = GaussianStats(panels=3, dtype=dtype)
    blocks.allocate(9, 11)
    for start, mean, w in moments.whitening_blocks(0.01, chunk=4):
        blocks.set_block(start, mean, w)
    blocks.finish()
    for name in ("mean", "wt_panels", "bounds", "mean_pc"):
        assert torch.equal(getattr(whole, name), getattr(blocks, name)), name
