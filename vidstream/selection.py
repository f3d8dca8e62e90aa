"""Public top-k mid-block selection (SPEC §5). Reference backend only, until the kernels of the
selection issue land."""

from __future__ import annotations

import torch

from . import _validate, backend, reference


def select_blocks(q: torch.Tensor, k_pool: torch.Tensor, block_ranges, k: int, *,
                  query_stride: int = 8, heads=None, score: str = "mean",
                  scale: float | None = None) -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` blocks of ``block_ranges`` [M, 2] whose keys have
    the highest affinity with every ``query_stride``-th query on ``heads`` (default the first
    half). Ties go to the smaller block index."""
    blocks, heads = _validate.select_blocks(q, k_pool, block_ranges, k, query_stride, heads, score)
    scale = _validate.scale_value(scale, q.shape[3])
    return backend.resolve("select_blocks", q)(q, k_pool, blocks, k, query_stride, heads, score, scale)


backend.register("select_blocks", "reference", reference._select_blocks)
