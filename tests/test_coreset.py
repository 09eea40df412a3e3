"""Greedy k-center coreset against a brute-force farthest-first reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from aoi_lightning.models.components import coreset
from aoi_lightning.models.components.coreset import greedy_coreset, random_projection


@pytest.fixture(params=["numba", "torch"])
def path(request, monkeypatch) -> str:
    """Runs a test through the numba kernel and through the PyTorch loop."""
    if request.param == "numba":
        assert coreset._kernel() is not None, "numba kernel did not build"
    else:
        monkeypatch.setattr(coreset, "_kernel", lambda: None)
    return request.param


def _farthest_first(x: torch.Tensor, first: int, k: int) -> list[int]:
    """Brute-force farthest-first traversal in float64 with full distance recomputation each step."""
    x = x.double()
    selected = [first]
    for _ in range(k - 1):
        d = torch.cdist(x, x[selected]).min(dim=1).values
        d[selected] = -1.0
        selected.append(int(d.argmax()))
    return selected


def _radius(x: torch.Tensor, centres: list[int]) -> float:
    """Covering radius: the largest distance from a point to its nearest centre."""
    return float(torch.cdist(x.double(), x[centres].double()).min(dim=1).values.max())


@pytest.mark.parametrize("seed", [0, 3])
def test_selection_order_matches_brute_force_without_projection(seed: int, path: str) -> None:
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(10 + seed))
    sel = greedy_coreset(x, 25, projection_dim=0, seed=seed)
    assert sel.dtype == torch.int64 and sel.shape == (25,)
    assert len(set(sel.tolist())) == 25
    assert sel.tolist() == _farthest_first(x, int(sel[0]), 25)


def test_projection_is_seeded_and_reduces_dimension() -> None:
    x = torch.randn(50, 32)
    a, b = random_projection(x, 8, seed=1), random_projection(x, 8, seed=1)
    assert a.shape == (50, 8)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, random_projection(x, 8, seed=2))
    torch.testing.assert_close(random_projection(x, 0, seed=1), x)  # no projection
    torch.testing.assert_close(random_projection(x, 64, seed=1), x)  # dim >= D: identity


def test_selection_with_projection_is_deterministic_under_seed() -> None:
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(0))
    a = greedy_coreset(x, 30, projection_dim=8, seed=5)
    b = greedy_coreset(x, 30, projection_dim=8, seed=5)
    c = greedy_coreset(x, 30, projection_dim=8, seed=6)
    torch.testing.assert_close(a, b)
    assert a.tolist() != c.tolist()


def test_k_equal_n_returns_all() -> None:
    x = torch.randn(12, 3)
    assert sorted(greedy_coreset(x, 12, projection_dim=0).tolist()) == list(range(12))


@pytest.mark.parametrize("k", [0, -1, 13])
def test_invalid_k_raises(k: int) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        greedy_coreset(torch.randn(12, 3), k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_covering_radius_within_twice_optimal(seed: int, path: str) -> None:
    """Farthest-first is a 2-approximation of the optimal k-center radius (centres among the points)."""
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(seed)) * torch.tensor([3.0, 1.0])
    k = 3
    optimal = min(_radius(x, list(c)) for c in itertools.combinations(range(12), k))
    greedy = _radius(x, greedy_coreset(x, k, projection_dim=0, seed=seed).tolist())
    assert greedy <= 2.0 * optimal + 1e-9


def test_coreset_covers_clusters(path: str) -> None:
    """Four tight, far-apart clusters and k=4: one centre per cluster."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    x = torch.cat([c + torch.randn(30, 2, generator=gen) for c in centres])
    sel = greedy_coreset(x, 4, projection_dim=0, seed=1)
    assert sorted(int(i) // 30 for i in sel) == [0, 1, 2, 3]


def test_clustered_bank_matches_brute_force(path: str) -> None:
    """Many clusters and k well past their number: the brute-force order, whichever path runs."""
    gen = torch.Generator().manual_seed(4)
    centres = torch.randn(40, 8, generator=gen) * 20
    x = centres[torch.randint(40, (3000,), generator=gen)] + torch.randn(3000, 8, generator=gen)
    sel = greedy_coreset(x, 150, projection_dim=0, seed=2)
    assert sel.tolist() == _farthest_first(x, int(sel[0]), 150)


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_kernel_result_does_not_depend_on_the_split(parts: int) -> None:
    """The parallel ranges only split the work: any number of them (one range per thread, more ranges than
    points) gives the same selection, ties included."""
    x = torch.cat([torch.randn(5, 4, generator=torch.Generator().manual_seed(1))] * 3)  # ties: every row thrice
    kernel = coreset._kernel()

    def traversal(parts: int, block: int) -> list[int]:
        nearest = np.full(15, np.inf, np.float32)
        selected = np.empty(12, np.int64)
        first = 0
        for start in range(0, 12, block):
            first = kernel(x.numpy(), nearest, selected, start, min(start + block, 12), first, parts)
        return selected.tolist()

    reference = traversal(1, 12)
    selected = traversal(parts if parts < 7 else 40, 5)  # and in blocks of steps, as the progress bar does
    assert selected == reference
    assert sorted(i % 5 for i in reference[:5]) == [0, 1, 2, 3, 4]


def test_duplicates_break_ties_by_lowest_index(path: str) -> None:
    """Five distinct points, each four times: the first five centres are one copy of each; then every distance
    is 0 and the lowest unselected index comes next, as torch.argmax picks the first maximum."""
    base = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 5.0]])
    x = base.repeat(4, 1)  # row i is base[i % 5]
    sel = greedy_coreset(x, 8, projection_dim=0, seed=0).tolist()
    assert sorted(i % 5 for i in sel[:5]) == [0, 1, 2, 3, 4]
    rest = [i for i in range(20) if i not in sel[:5]]
    assert sel[5:] == rest[:3]


def test_kernel_and_torch_agree_on_a_projected_bank(monkeypatch) -> None:
    x = torch.randn(5000, 64, generator=torch.Generator().manual_seed(7))
    kernel = greedy_coreset(x, 100, projection_dim=16, seed=3)
    monkeypatch.setattr(coreset, "_kernel", lambda: None)
    assert greedy_coreset(x, 100, projection_dim=16, seed=3).tolist() == kernel.tolist()


def test_a_kernel_that_fails_when_called_falls_back_to_pytorch(monkeypatch, caplog) -> None:
    """numba compiles on the first call: a failure there (e.g. no threading layer) gives the PyTorch loop's
    selection and a warning, and the kernel is not tried again."""
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(3))
    reference = greedy_coreset(x, 20, projection_dim=0, seed=1)

    def broken(*args):
        raise ValueError("No threading layer could be loaded.")

    monkeypatch.setattr(coreset.KERNEL, "kernel", broken)
    monkeypatch.setattr(coreset.KERNEL, "error", None)
    caplog.set_level("WARNING")
    assert greedy_coreset(x, 20, projection_dim=0, seed=1).tolist() == reference.tolist()
    assert "coreset kernel failed, using PyTorch" in caplog.text
    assert coreset._kernel() is None
