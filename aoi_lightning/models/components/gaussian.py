"""Per-position multivariate Gaussian: streaming moments, Cholesky whitening, batched Mahalanobis distance."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from aoi_lightning.models.components import fused_distance


class StreamingMoments:
    """Streaming sum and sum of outer products per position, in float64, shifted for numerical stability.

    Memory is (P, C, C) whatever the number of images. Feed (B, C, P) batches with `update`.
    """

    def __init__(self, chunk: int = 512) -> None:
        self.chunk = chunk
        self.count = 0
        self.shift: torch.Tensor | None = None  # (C, P)
        self.sum: torch.Tensor | None = None  # (C, P)
        self.outer: torch.Tensor | None = None  # (P, C, C)

    def update(self, embeddings: torch.Tensor) -> None:
        """Add a batch of embeddings (B, C, P)."""
        x = embeddings.detach().to(torch.float64, copy=True)
        if self.shift is None:
            self.shift = x.mean(dim=0)
            channels, positions = self.shift.shape
            self.sum = torch.zeros(channels, positions, dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(positions, channels, channels, dtype=torch.float64, device=x.device)
        centred = x.sub_(self.shift)  # in place: x is our own float64 copy
        self.sum += centred.sum(dim=0)
        # (P, C, B) @ (P, B, C) -> (P, C, C), a block of positions at a time so that the contiguous copies the
        # batched matmul needs stay small
        per_pos = centred.permute(2, 1, 0)
        for start in range(0, per_pos.shape[0], self.chunk):
            part = per_pos[start : start + self.chunk].contiguous()
            self.outer[start : start + self.chunk].baddbmm_(part, part.transpose(1, 2))
        self.count += x.shape[0]

    def reshift_(self, new_shift: torch.Tensor) -> None:
        """Re-centre the accumulated moments on `new_shift` (C, P), exactly: with y = x - s and d = s - s',
        sum(y + d) = sum(y) + n d and sum((y + d)(y + d)^T) = sum(y y^T) + d sum(y)^T + sum(y) d^T + n d d^T.
        Moments of several processes become summable once they share a shift."""
        if self.shift is None:
            return
        d = (self.shift - new_shift.to(self.shift)).transpose(0, 1).contiguous()  # (P, C)
        s = self.sum.transpose(0, 1).contiguous()  # (P, C), the old sum
        for start in range(0, d.shape[0], self.chunk):
            dp, sp = d[start : start + self.chunk].unsqueeze(2), s[start : start + self.chunk].unsqueeze(2)
            block = self.outer[start : start + self.chunk]
            block.baddbmm_(dp, sp.transpose(1, 2)).baddbmm_(sp, dp.transpose(1, 2))
            block.baddbmm_(dp, dp.transpose(1, 2), alpha=float(self.count))
        self.sum += self.count * d.transpose(0, 1)
        self.shift = new_shift.to(self.shift).clone()

    def mean_cov(self, positions: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (C, P) and unbiased covariance (P, C, C), float64; `positions` selects a range of P."""
        if self.count < 2:
            raise ValueError(f"need at least 2 training images to estimate a covariance, got {self.count}")
        sel = positions if positions is not None else slice(None)
        n = self.count
        m = self.sum[:, sel] / n  # mean of centred data (C, p)
        mean = self.shift[:, sel] + m
        mt = m.transpose(0, 1).unsqueeze(2)  # (p, C, 1)
        # outer - n m m^T in one batched product into a new tensor (no full-size temporaries; same values)
        cov = torch.baddbmm(self.outer[sel], mt, mt.transpose(1, 2), alpha=-float(n))
        return mean, cov.div_(n - 1)

    def whitening_blocks(self, regularization: float = 0.01, chunk: int = 256):
        """Yield (start, mean (C, n), whitening W (n, C, C)) in float32 for blocks of n <= `chunk` positions,
        inverted in float64 block by block: the caller can store each block (e.g. `GaussianStats.set_block`)
        without a full float32 copy of W beside the accumulators."""
        positions = self.outer.shape[0]
        for start in range(0, positions, chunk):
            m, cov = self.mean_cov(slice(start, min(start + chunk, positions)))
            yield start, m.to(torch.float32), whitening_from_covariance(cov, regularization).to(torch.float32)

    def whitening(self, regularization: float = 0.01, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (C, P) and whitening W (P, C, C) as float32 (`whitening_blocks` put together)."""
        mean = torch.empty(self.sum.shape, dtype=torch.float32, device=self.sum.device)
        out = torch.empty(self.outer.shape, dtype=torch.float32, device=self.outer.device)
        for start, m, w in self.whitening_blocks(regularization, chunk):
            mean[:, start : start + m.shape[1]] = m
            out[start : start + w.shape[0]] = w
        return mean, out


def whitening_from_covariance(cov: torch.Tensor, regularization: float = 0.01) -> torch.Tensor:
    """Inverse Cholesky factor W (P, C, C) with W^T W = (cov + reg I)^-1, computed in float64.

    The Mahalanobis distance is then ||W (x - mu)||, a sum of squares that cannot turn negative.
    """
    cov = cov.to(torch.float64)
    eye = torch.eye(cov.shape[-1], dtype=torch.float64, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(cov + regularization * eye)
    if bool((info > 0).any()):
        raise ValueError("covariance is not positive definite even after regularisation; raise `regularization`")
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def mahalanobis(embedding: torch.Tensor, mean: torch.Tensor, whitening_t: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance per position, as the norm of the whitened deviation.

    The product is taken as row vectors times the transposed factor, (P, B, C) @ (P, C, C): each position's
    matrix is then read once in memory order, which makes batch-1 inference memory-bound instead of
    compute-bound (about 3x faster on CPU than whitening @ column vectors).

    Args:
        embedding: (B, C, P).
        mean: (C, P).
        whitening_t: (P, C, C) transposed inverse Cholesky factor, W^T.

    Returns:
        (B, P) distances.
    """
    delta = (embedding - mean.unsqueeze(0)).permute(2, 0, 1).contiguous()  # (P, B, C), contiguous for bmm
    white = torch.bmm(delta, whitening_t)  # (P, B, C)
    return white.pow(2).sum(dim=2).clamp_min(0).sqrt().transpose(0, 1)


def panel_bounds(channels: int, panels: int) -> list[int]:
    """Channel boundaries of `panels` near-equal row panels of a (channels x channels) triangle."""
    panels = max(1, min(int(panels), channels))
    return [round(i * channels / panels) for i in range(panels + 1)]


class GaussianStats(nn.Module):
    """Fitted statistics as buffers: mean (C, P) and the upper-triangular W^T stored as row panels without the
    zero blocks, position by position.

    With channel boundaries s_0 = 0 < s_1 < ... < s_K = C, panel i holds rows s_i..s_{i+1} of W^T from column
    s_i on, ((s_{i+1} - s_i) x (C - s_i)); row p of `wt_panels` (P, total) is position p's panels one after the
    other. That is (K + 1) / 2K of the full matrices: at batch 1, where reading them is the cost, K = 2 reads
    3/4 and K = 4 reads 5/8. The whitened vector's column block i is final once panels 0..i are added, so its
    squared norm is taken then. Positions are processed `chunk` at a time so that the intermediate products of a
    batch stay in cache; `float16` storage halves the memory read (and the checkpoint) and is widened to
    float32 a chunk at a time, all arithmetic being float32. The result equals `mahalanobis` with the full
    factor to float32 rounding (float32 storage) or about 1e-4 relative (float16).

    Args:
        panels: number of row panels K (1: the full matrices).
        dtype: storage of W^T, `float32` or `float16`.
        chunk: positions per step of the forward pass.
    """

    def __init__(self, panels: int = 4, dtype: str = "float32", chunk: int = 256) -> None:
        super().__init__()
        if int(panels) < 1:
            raise ValueError(f"panels must be >= 1, got {panels}")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"stats dtype must be 'float32' or 'float16', got {dtype!r}")
        self.panels = int(panels)
        self.dtype = getattr(torch, dtype)
        self.chunk = max(1, int(chunk))
        self.fused = True  # small CPU batches through fused_distance; False: always the PyTorch code
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("mean_pc", torch.empty(0), persistent=False)  # mean (P, C), position-major copy
        self.register_buffer("wt_panels", torch.empty(0))
        self.register_buffer("bounds", torch.empty(0, dtype=torch.int64))
        self._bounds: list[int] = []
        #: float32 panels per block of positions while `export_panels` is active (else None)
        self._export_panels: list[list[torch.Tensor]] | None = None

    def set(self, mean: torch.Tensor, whitening: torch.Tensor) -> None:
        """Store mean (C, P) in float32 and whitening W (P, C, C, lower triangular) in the storage dtype."""
        self.allocate(mean.shape[0], mean.shape[1], mean.device)
        self.set_block(0, mean, whitening)
        self.finish()

    def allocate(self, channels: int, positions: int, device: torch.device | str | None = None) -> None:
        """Lay out empty buffers for `channels` x `positions`; fill them with `set_block`, then call `finish`."""
        bounds = panel_bounds(channels, self.panels)
        per_position = sum((b - a) * (channels - a) for a, b in zip(bounds[:-1], bounds[1:]))
        self.mean = torch.empty(channels, positions, dtype=torch.float32, device=device)
        self.wt_panels = torch.empty(positions, per_position, dtype=self.dtype, device=device)
        self.bounds = torch.tensor(bounds, dtype=torch.int64, device=device)
        self._bounds = bounds

    def set_block(self, start: int, mean: torch.Tensor, whitening: torch.Tensor) -> None:
        """Store positions start..start+n: mean (C, n) and whitening W (n, C, C, lower triangular)."""
        channels, count = mean.shape
        self.mean[:, start : start + count] = mean
        wt = whitening.transpose(1, 2)
        rows = self.wt_panels[start : start + count]
        offset = 0
        for a, b in zip(self._bounds[:-1], self._bounds[1:]):
            size = (b - a) * (channels - a)
            rows[:, offset : offset + size].view(count, b - a, channels - a).copy_(wt[:, a:b, a:])
            offset += size

    def finish(self) -> None:
        """Derived buffers once every block is stored."""
        self.mean_pc = self.mean.t().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        # the buffers' shapes (and the storage dtype) come from the fitted data: take the checkpoint's
        for name in ("mean", "wt_panels", "bounds"):
            key = prefix + name
            if key in state_dict:
                current, saved = getattr(self, name), state_dict[key]
                if tuple(saved.shape) != tuple(current.shape) or saved.dtype != current.dtype:
                    setattr(self, name, torch.empty_like(saved, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)
        self._bounds = [int(v) for v in self.bounds.tolist()]
        self.finish()
        if self._bounds:
            channels, positions = self.mean.shape
            per_position = sum((b - a) * (channels - a) for a, b in zip(self._bounds[:-1], self._bounds[1:]))
            if self._bounds[-1] != channels or tuple(self.wt_panels.shape) != (positions, per_position):
                errs.append(f"{prefix}wt_panels: shape {tuple(self.wt_panels.shape)} does not match the panel bounds")

    def panel_views(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Panels of a block of `rows` of `wt_panels` (n, total) as (n, s_{i+1} - s_i, C - s_i) views."""
        channels = self.mean.shape[0]
        views, offset = [], 0
        for a, b in zip(self._bounds[:-1], self._bounds[1:]):
            size = (b - a) * (channels - a)
            views.append(rows[:, offset : offset + size].view(rows.shape[0], b - a, channels - a))
            offset += size
        return views

    def _squared(
        self, delta: torch.Tensor, rows: torch.Tensor | None, panels: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Squared norms (n, B) of the whitened deviations delta (n, B, C) with the panels of `rows` (or the
        given `panels`)."""
        bounds = self._bounds
        dist2 = None
        rest = None  # whitened columns s_i.. accumulated over panels 0..i
        for i, panel in enumerate(self.panel_views(rows) if panels is None else panels):
            a, b = bounds[i], bounds[i + 1]
            part = torch.bmm(delta[..., a:b], panel)
            rest = part if rest is None else rest + part
            done = rest[..., : b - a].pow(2).sum(dim=2)
            dist2 = done if dist2 is None else dist2 + done
            rest = rest[..., b - a :]
        return dist2

    @contextlib.contextmanager
    def export_panels(self) -> Iterator[None]:
        """Within the block a traced forward reads each (block of positions, panel) matrix as a float32 tensor of
        its own instead of slicing and widening `wt_panels` in the graph: the ONNX exporter's shape inference
        then handles each matrix once (5.6 s -> 0.3 s for transistor's 4096 positions) and its constant folding
        has nothing to copy. The graph computes the same products."""
        step = self.chunk
        self._export_panels = [
            [view.to(torch.float32).contiguous() for view in self.panel_views(self.wt_panels[start : start + step])]
            for start in range(0, self.wt_panels.shape[0], step)
        ]
        try:
            yield
        finally:
            self._export_panels = None

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Embedding (B, C, P) -> distances (B, P).

        Small CPU batches go through the fused kernel of `fused_distance` when `fused` is set (the default) and
        it is available; the result is the same to float32 rounding. Otherwise batched products, `chunk`
        positions at a time (also in an exported graph: ONNX Runtime then works block by block too)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            delta = (embedding - self.mean.unsqueeze(0)).permute(2, 0, 1)  # (P, B, C)
            return self._panel_distances(lambda start, stop: delta[start:stop], delta.shape[0], self._export_panels)
        positions = embedding.shape[2]
        if self.fused and fused_distance.applicable(embedding, self.wt_panels):
            dist2 = fused_distance.squared_distances(
                self._deviations(embedding, 0, positions), self.wt_panels, self.bounds
            )
            if dist2 is not None:
                return dist2.clamp_min_(0).sqrt_().transpose(0, 1)
        return self._panel_distances(lambda start, stop: self._deviations(embedding, start, stop), positions)

    def _deviations(self, embedding: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Deviations (n, B, C), contiguous, of positions start..stop from the embedding (B, C, P).

        Written in that order: with a channels-last backbone the embedding is already position-major and this
        reads it in order (a permute-copy of the whole deviation would transpose 90 MB at batch 32)."""
        if embedding.requires_grad:
            return (embedding[..., start:stop] - self.mean[:, start:stop].unsqueeze(0)).permute(2, 0, 1).contiguous()
        batch, channels, _ = embedding.shape
        out = torch.empty((stop - start, batch, channels), dtype=torch.float32, device=embedding.device)
        return torch.sub(embedding.permute(2, 0, 1)[start:stop], self.mean_pc[start:stop].unsqueeze(1), out=out)

    def _panel_distances(self, deviations, positions: int, blocks: list[list[torch.Tensor]] | None = None):
        """Distances (B, P), panel by panel, `chunk` positions at a time; `deviations(start, stop)` gives the
        (n, B, C) deviations of a block (built block by block, they stay in cache). `blocks`: the float32 panels
        of each block already cut (`export_panels`); default: cut from `wt_panels`."""
        step = self.chunk
        parts = [
            self._squared(
                deviations(p, min(p + step, positions)),
                self.wt_panels[p : p + step].to(torch.float32) if blocks is None else None,
                blocks[k] if blocks is not None else None,
            )
            for k, p in enumerate(range(0, positions, step))
        ]
        dist2 = parts[0] if len(parts) == 1 else torch.cat(parts)
        return dist2.clamp_min(0).sqrt().transpose(0, 1)
