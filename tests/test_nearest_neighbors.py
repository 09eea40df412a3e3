"""Nearest-neighbour search (matrix products and faiss) against `torch.cdist`."""

from __future__ import annotations

import pytest
import torch

from aoi_lightning.models.components.nearest_neighbors import FaissSearcher, knn_torch


@pytest.fixture
def bank_and_queries() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 24, generator=gen) * 3.0 + 1.0
    queries = torch.randn(40, 24, generator=gen) * 3.0 + 1.0
    return bank, queries


def _reference(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(queries.double(), bank.double())
    return torch.topk(d, k, dim=1, largest=False)


@pytest.mark.parametrize(("k", "chunk"), [(1, 64), (5, 64), (5, 3), (1, 1000)])
def test_knn_torch_matches_cdist_with_chunks(bank_and_queries, k: int, chunk: int) -> None:
    bank, queries = bank_and_queries
    dist, index = knn_torch(queries, bank, k=k, chunk=chunk)
    ref_d, ref_i = _reference(queries, bank, k)
    assert dist.shape == (40, k) and index.shape == (40, k) and index.dtype == torch.int64
    torch.testing.assert_close(index, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-4, atol=1e-3)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())  # ascending


def test_knn_torch_self_query_finds_itself(bank_and_queries) -> None:
    bank, _ = bank_and_queries
    dist, index = knn_torch(bank[:17], bank, k=1, chunk=50)
    torch.testing.assert_close(index[:, 0], torch.arange(17))
    assert float(dist.max()) < 0.05  # float32 cancellation in |q|^2 - 2 q.b + |b|^2, distances here are ~20


@pytest.mark.parametrize("k", [1, 5])
def test_faiss_matches_knn_torch(bank_and_queries, k: int) -> None:
    bank, queries = bank_and_queries
    searcher = FaissSearcher(bank)
    assert searcher.size == 300
    dist, index = searcher.search(queries, k)
    ref_d, ref_i = knn_torch(queries, bank, k=k, chunk=128)
    assert index.dtype == torch.int64
    torch.testing.assert_close(index, ref_i)
    torch.testing.assert_close(dist, ref_d, rtol=1e-4, atol=1e-3)


def test_faiss_k_larger_than_bank_is_capped() -> None:
    bank = torch.randn(3, 4)
    dist, index = FaissSearcher(bank).search(torch.randn(2, 4), k=9)
    assert dist.shape == (2, 3)
    assert sorted(index[0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("k", [1, 4])
def test_knn_torch_in_query_chunks_matches_cdist(bank_and_queries, monkeypatch, k: int) -> None:
    """More queries than `QUERY_CHUNK`: taken a block at a time (eager), the same neighbours as one block."""
    from aoi_lightning.models.components import nearest_neighbors

    bank, _ = bank_and_queries
    queries = torch.randn(57, 24, generator=torch.Generator().manual_seed(1)) * 3.0 + 1.0
    monkeypatch.setattr(nearest_neighbors, "QUERY_CHUNK", 8)
    dist, index = knn_torch(queries, bank, k=k, chunk=70)
    ref_d, ref_i = _reference(queries, bank, k)
    assert dist.shape == index.shape == (57, k)
    torch.testing.assert_close(index, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-4, atol=1e-3)


def test_knn_torch_k1_across_bank_chunks_keeps_the_nearer() -> None:
    """k = 1 merges the chunks' minima: the nearest row may lie in any chunk, ties go to the earlier one."""
    bank = torch.tensor([[5.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    queries = torch.tensor([[0.0, 0.0], [3.0, 0.1], [0.0, 1.0]])
    dist, index = knn_torch(queries, bank, k=1, chunk=2)
    assert index[:, 0].tolist() == [4, 2, 1]
    torch.testing.assert_close(dist[:, 0], torch.tensor([0.5, 0.1, 0.0]), atol=1e-5, rtol=0)


def test_flat_search_needs_no_faiss_index(bank_and_queries) -> None:
    """The exact `flat` searcher holds a float32 copy of the bank (not the caller's tensor) and no faiss index."""
    bank, queries = bank_and_queries
    searcher = FaissSearcher(bank.half())
    assert searcher.kind == "flat" and searcher.index is None
    assert searcher.bank.dtype == torch.float32 and searcher.bank.data_ptr() != bank.data_ptr()
    _, index = searcher.search(queries, 1)
    torch.testing.assert_close(index, _reference(queries, bank.half().float(), 1)[1])
