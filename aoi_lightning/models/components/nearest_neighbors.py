"""Nearest-neighbour search over a memory bank: faiss for inference, chunked torch matmul for export."""

from __future__ import annotations

import torch


def squared_distances(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (Q, M) by matmul (exports to ONNX, unlike `torch.cdist`)."""
    if bank_sq is None:
        bank_sq = bank.pow(2).sum(dim=1)
    q_sq = queries.pow(2).sum(dim=1, keepdim=True)
    return (q_sq - 2.0 * queries @ bank.T + bank_sq.unsqueeze(0)).clamp_min(0.0)


def knn_torch(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours with matmul, bank processed in chunks to bound memory.

    Returns:
        distances (Q, k) (Euclidean, ascending) and indices (Q, k) into the bank.
    """
    best_d: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, bank.shape[0], chunk):
        part = bank[start : start + chunk]
        d2 = squared_distances(queries, part)
        kk = min(k, part.shape[0])
        d, i = torch.topk(d2, kk, dim=1, largest=False)
        i = i + start
        if best_d is None:
            best_d, best_i = d, i
        else:
            cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
            best_d, pos = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False)
            best_i = torch.gather(cat_i, 1, pos)
    assert best_d is not None and best_i is not None
    return best_d.sqrt(), best_i


class FaissSearcher:
    """Exact L2 search with faiss (`IndexFlatL2`) over a float32 bank; built once per bank."""

    def __init__(self, bank: torch.Tensor) -> None:
        import faiss
        import numpy as np

        data = np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32)
        self.index = faiss.IndexFlatL2(data.shape[1])
        self.index.add(data)
        self.size = data.shape[0]

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns Euclidean distances (Q, k) and indices (Q, k)."""
        import numpy as np

        q = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        d2, idx = self.index.search(q, min(k, self.size))
        d = torch.from_numpy(d2).clamp_min_(0).sqrt_().to(queries.device)
        return d, torch.from_numpy(idx).to(device=queries.device, dtype=torch.int64)
