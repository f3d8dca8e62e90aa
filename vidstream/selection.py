"""Public top-k mid-block selection (SPEC §5): ``select_blocks``, the scores behind it
(``block_scores``) and the per-block key sums a cache can keep (``block_key_sums``).

Every backend returns (scores float32 [M], indices int64 [min(k, M)]); the public function keeps
the indices. The kernels never form ``QK^T``: ``"mean"`` factorises as
``sum_i q_i · sum_j k_j``, ``"max"`` needs one dot product per key with the mean sampled query.
"""

from __future__ import annotations

import torch

from . import _extension, _validate, backend, reference


def select_blocks(q: torch.Tensor, k_pool: torch.Tensor, block_ranges, k: int, *,
                  query_stride: int = 8, heads=None, score: str = "mean",
                  scale: float | None = None,
                  block_key_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (int64 [min(k, M)], ascending) of the ``k`` blocks of ``block_ranges`` [M, 2]
    whose keys have the highest affinity with every ``query_stride``-th query of ``q``
    [B, Lq, H, D] on the query ``heads`` (default the first half). Ties go to the smaller block
    index.

    ``block_key_sums`` [M, H_kv, D] (batch 1) or [B, M, H_kv, D], any float dtype (float32
    recommended): the sum over each block's tokens of its keys, as a cache can keep it when it
    writes a block (``block_key_sums(k_pool, block_ranges)`` or ``k_block.sum(1)``). With it,
    ``score="mean"`` costs O(M * H * D) and does not read the keys; ``score="max"`` needs every
    key and ignores it (it is still checked)."""
    blocks, heads, sums = _validate.select_blocks(q, k_pool, block_ranges, k, query_stride, heads,
                                                  score, block_key_sums)
    scale = _validate.scale_value(scale, q.shape[3])
    fn = backend.resolve("select_blocks", q)
    return fn(q, k_pool, blocks, k, query_stride, heads, score, scale, sums)[1]


def block_scores(q: torch.Tensor, k_pool: torch.Tensor, block_ranges, *, query_stride: int = 8,
                 heads=None, score: str = "mean", scale: float | None = None,
                 block_key_sums: torch.Tensor | None = None) -> torch.Tensor:
    """The scores s_m [M] that ``select_blocks`` ranks (SPEC §5), float32 from a kernel; the
    reference backend gives them in q's dtype."""
    blocks, heads, sums = _validate.select_blocks(q, k_pool, block_ranges, 0, query_stride, heads,
                                                  score, block_key_sums)
    scale = _validate.scale_value(scale, q.shape[3])
    fn = backend.resolve("select_blocks", q)
    return fn(q, k_pool, blocks, 0, query_stride, heads, score, scale, sums)[0]


def block_key_sums(k_pool: torch.Tensor, block_ranges) -> torch.Tensor:
    """float32 [B, M, H_kv, D]: the sum of the keys of each block of ``block_ranges`` (float64
    for float64 keys). A cache computes this once when it writes a block (``k_block.sum(1,
    dtype=torch.float32)`` is the same thing for one block). One plain reduction per block, so
    equal blocks get bitwise-equal sums on every device (no atomics)."""
    _validate.tensor(k_pool, "k_pool", 4, "[B, P, H_kv, D]")
    _validate.floating(k_pool, "k_pool")
    host = _validate.ranges(block_ranges, k_pool.shape[1], "block_ranges")
    acc = torch.float64 if k_pool.dtype == torch.float64 else torch.float32
    B, _, H_kv, D = k_pool.shape
    out = torch.zeros(B, host.shape[0], H_kv, D, dtype=acc, device=k_pool.device)
    for m, (s, e) in enumerate(host.tolist()):
        if e > s:
            out[:, m] = k_pool[:, s:e].sum(1, dtype=acc)
    return out


def _reference(q, k_pool, blocks, k, query_stride, heads, score, scale, sums):
    s = reference._block_scores(q, k_pool, blocks, query_stride, heads, score, scale, sums)
    return s, reference.topk_ascending(s, k).to(q.device)


def _native(q, k_pool, blocks, k, query_stride, heads, score, scale, sums):
    return torch.ops.vidstream.select_blocks(q, k_pool, blocks, k, query_stride,
                                             heads, score, scale, sums)


def _triton(q, k_pool, blocks, k, query_stride, heads, score, scale, sums):
    from .triton_kernels import select_blocks as kernels

    return kernels.select_blocks_triton(q, k_pool, blocks.to(q.device), k, query_stride, heads,
                                        score, scale, sums)


@_extension.register_fake("select_blocks")
def _select_blocks_fake(q, k_pool, block_ranges, k, query_stride, heads, score, scale,
                        block_key_sums=None):
    M = block_ranges.shape[0]
    return (q.new_empty(M, dtype=torch.float32),
            q.new_empty(min(k, M), dtype=torch.int64))


backend.register("select_blocks", "reference", _reference)
backend.register("select_blocks", "cpu", _native)
backend.register("select_blocks", "cuda", _native)
backend.register("select_blocks", "triton", _triton)
