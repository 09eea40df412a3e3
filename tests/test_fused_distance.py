"""The fused CPU distance kernel against the PyTorch code and a float64 reference, and its fallbacks."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from aoi_lightning.models.components import fused_distance
from aoi_lightning.models.components.gaussian import GaussianStats, whitening_from_covariance
from aoi_lightning.models.padim.torch_model import PadimModel


def _stats(channels: int, positions: int, panels: int, dtype: str, seed: int = 0) -> tuple[GaussianStats, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(positions, channels, channels, generator=gen, dtype=torch.float64)
    cov = mix @ mix.transpose(1, 2) / channels
    whitening = whitening_from_covariance(cov, 0.05)
    mean = torch.randn(channels, positions, generator=gen)
    stats = GaussianStats(panels=panels, dtype=dtype)
    stats.set(mean, whitening.to(torch.float32))
    return stats, whitening


def _reference(stats: GaussianStats, whitening: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Float64 ||W (x - mu)|| per position with the full factor as stored (after the storage rounding)."""
    stored = whitening.to(stats.dtype).to(torch.float64)
    delta = (embedding.to(torch.float64) - stats.mean.to(torch.float64).unsqueeze(0)).permute(2, 0, 1)  # (P, B, C)
    white = torch.einsum("pbc,pdc->pbd", delta, stored)
    return white.pow(2).sum(2).sqrt().transpose(0, 1)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = fused_distance.squared_distances

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fused_distance, "squared_distances", counting)
    return calls


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("panels", [1, 3, 4])
def test_fused_kernel_matches_pytorch_and_float64(dtype: str, panels: int, spy) -> None:
    stats, whitening = _stats(channels=13, positions=37, panels=panels, dtype=dtype)
    for batch in range(1, fused_distance.MAX_BATCH[stats.dtype] + 1):
        embedding = torch.randn(batch, 13, 37, generator=torch.Generator().manual_seed(batch))
        stats.fused = True
        fused = stats(embedding)
        stats.fused = False
        plain = stats(embedding)
        assert fused.shape == plain.shape == (batch, 37)
        torch.testing.assert_close(fused, plain, rtol=2e-6, atol=1e-5)
        np.testing.assert_allclose(fused.numpy(), _reference(stats, whitening, embedding).numpy(), rtol=1e-5)
    assert spy and all(spy), "the fused kernel did not run"


def test_larger_batches_and_gradients_use_pytorch(spy) -> None:
    stats, _ = _stats(channels=8, positions=10, panels=2, dtype="float16")
    stats(torch.randn(fused_distance.MAX_BATCH[torch.float16] + 1, 8, 10))
    stats(torch.randn(1, 8, 10, requires_grad=True))
    assert spy == []
    stats(torch.randn(1, 8, 10))
    assert spy == [True]


def test_switched_off_by_environment(monkeypatch, spy) -> None:
    stats, _ = _stats(channels=8, positions=10, panels=2, dtype="float16")
    monkeypatch.setenv(fused_distance.ENV_SWITCH, "0")
    assert not fused_distance.enabled()
    stats(torch.randn(1, 8, 10))
    assert spy == []


def test_build_failure_falls_back_to_pytorch_once(monkeypatch, caplog) -> None:
    stats, whitening = _stats(channels=8, positions=10, panels=2, dtype="float16")

    def broken():
        raise ImportError("no numba here")

    for name, value in (("kernel", None), ("error", None), ("load", broken)):
        monkeypatch.setattr(fused_distance.KERNEL, name, value)
    embedding = torch.randn(1, 8, 10)
    with caplog.at_level(logging.WARNING, logger=fused_distance.__name__):
        out = stats(embedding)
        again = stats(embedding)
    assert "no numba here" in caplog.text and caplog.text.count("unavailable") == 1
    assert not fused_distance.enabled()
    np.testing.assert_allclose(out.numpy(), _reference(stats, whitening, embedding).numpy(), rtol=1e-5)
    assert torch.equal(out, again)


def test_one_thread_and_non_contiguous_input(spy) -> None:
    stats, whitening = _stats(channels=11, positions=23, panels=4, dtype="float16")
    embedding = torch.randn(11, 23, 2).permute(2, 0, 1)  # (2, 11, 23), not contiguous
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out = stats(embedding)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(out.numpy(), _reference(stats, whitening, embedding).numpy(), rtol=1e-5)
    assert spy == [True]


def test_padim_maps_identical_with_and_without_the_kernel(spy) -> None:
    torch.manual_seed(0)
    model = PadimModel(backbone="resnet18", layers=("layer1", "layer2"), weights="none", n_features=20).eval()
    with torch.inference_mode():
        model.update(torch.rand(6, 3, 64, 64))
        model.finalize()
        images = torch.rand(2, 3, 64, 64)
        fused = model(images)
        model.stats.fused = False
        plain = model(images)
    assert spy == [True]
    torch.testing.assert_close(fused.anomaly_map, plain.anomaly_map, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.pred_score, plain.pred_score, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, fused_distance.MAX_BATCH[torch.float16] + 1])
@pytest.mark.parametrize("fused", [True, False])
def test_position_major_embedding_and_checkpoint_round_trip(batch: int, fused: bool) -> None:
    """A channels-last backbone gives (B, C, P) with C innermost; both paths read it as is, and a reloaded
    module (whose position-major mean copy is rebuilt on load) gives the same distances."""
    stats, whitening = _stats(channels=12, positions=30, panels=4, dtype="float16")
    embedding = torch.randn(batch, 30, 12, generator=torch.Generator().manual_seed(3)).permute(0, 2, 1)
    assert embedding.stride(1) == 1
    loaded = GaussianStats(panels=4, dtype="float16")
    loaded.load_state_dict(stats.state_dict())
    assert "mean_pc" not in stats.state_dict()
    for module in (stats, loaded):
        module.fused = fused
        np.testing.assert_allclose(
            module(embedding).numpy(), _reference(stats, whitening, embedding).numpy(), rtol=1e-5
        )


def test_unwritable_cache_locations_fall_back_to_the_temporary_folder(tmp_path) -> None:
    """Where numba finds no writable cache location (read-only install and home), the kernel still builds: here
    numba is told to look only in NUMBA_CACHE_DIR, which is unset, as it finds nothing else on such a machine."""
    import subprocess
    import sys

    import numba

    if not hasattr(numba.config, "CACHE_LOCATOR_CLASSES"):
        pytest.skip("this numba cannot restrict its cache locators")
    script = tmp_path / "check.py"
    script.write_text(
        "import tempfile\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        "import numba, torch\n"
        "from aoi_lightning.models.components import fused_distance\n"
        "from aoi_lightning.models.components.gaussian import GaussianStats\n"
        "s = GaussianStats(dtype='float16')\n"
        "s.set(torch.zeros(3, 4), torch.eye(3).expand(4, 3, 3).clone())\n"
        "assert torch.allclose(s(torch.ones(1, 3, 4)), torch.full((1, 4), 3 ** 0.5))\n"
        "assert fused_distance.kernel() is not None, fused_distance.KERNEL.error\n"
        "print(numba.config.CACHE_DIR)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["NUMBA_CACHE_LOCATOR_CLASSES"] = "UserProvidedCacheLocator"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    cache = tmp_path / "aoi-numba-cache"
    assert done.stdout.strip() == str(cache)
    assert any(cache.rglob("*.nbi")), "nothing was cached in the fallback folder"
