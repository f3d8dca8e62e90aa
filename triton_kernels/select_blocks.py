"""Triton kernels of select_blocks (docs/spec.md §5), registered as ``vidstream::select_blocks_triton``.

Two launches, no ``QK^T``: (1) one program per (batch, chosen head) sums the sampled queries
(float64 accumulators fed by float32 tiles);
(2) one program per block reduces its keys (or reads the cached key sums) against those sums and
writes s_m; the program that finishes last (an acq_rel atomic counter, zeroed by launch 1) ranks
all M scores and writes the top-k indices, ascending, in torch.sort(descending, stable) order
(NaN first, ties to the smaller index). A NaN among the keys a block reads, or in the sampled
queries, makes its score NaN under both scores (the "max" reduction propagates NaN)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._ieee import max_nan, maximum_nan


@triton.jit
def _reduce_queries_kernel(q_ptr, heads_ptr, qred_ptr, counter_ptr, Lq, n_sampled, stride, Hs,
                           sqb, sql, sqh, inv,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // Hs
    hi = pid % Hs
    if pid == 0:
        tl.store(counter_ptr, 0)
    h = tl.load(heads_ptr + hi)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    # float32 sums of BLOCK_S rows, folded into float64: thousands of queries stay accurate.
    acc = tl.zeros([BLOCK_D], tl.float64)
    for s0 in range(0, n_sampled, BLOCK_S):
        i = (s0 + tl.arange(0, BLOCK_S)) * stride
        m = (i < Lq)[:, None] & dm[None, :]
        tile = tl.load(q_ptr + b * sqb + h * sqh + i[:, None].to(tl.int64) * sql + d[None, :],
                       mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(tile, axis=0).to(tl.float64)
    tl.store(qred_ptr + pid * D + d, acc * inv, mask=dm)


@triton.jit
def _topk_tail(scores_ptr, idx_ptr, M, K, TILE: tl.constexpr):
    """Block m is kept when fewer than K blocks beat it (higher score, or equal and smaller
    index); kept blocks are written in index order. One program, O(M^2 / TILE) steps."""
    base = 0
    for t0 in range(0, M, TILE):
        mi = t0 + tl.arange(0, TILE)
        mv = mi < M
        s_i = tl.load(scores_ptr + mi, mask=mv, other=float("-inf"), volatile=True)
        rank = tl.zeros([TILE], tl.int32)
        for c0 in range(0, M, TILE):
            mj = c0 + tl.arange(0, TILE)
            s_j = tl.load(scores_ptr + mj, mask=mj < M, other=float("-inf"), volatile=True)
            # torch.sort(descending=True, stable=True) order: NaN above every number, equal
            # scores (NaN among NaN too) to the smaller index.
            nan_i = (s_i != s_i)[:, None]
            nan_j = (s_j != s_j)[None, :]
            tie = ((s_j[None, :] == s_i[:, None]) | (nan_j & nan_i)) & (mj[None, :] < mi[:, None])
            better = (s_j[None, :] > s_i[:, None]) | (nan_j & ~nan_i) | tie
            better = better & (mj < M)[None, :]
            rank += tl.sum(better.to(tl.int32), axis=1)
        sel = ((rank < K) & mv).to(tl.int32)
        pos = base + tl.cumsum(sel, axis=0) - sel
        tl.store(idx_ptr + pos, mi.to(tl.int64), mask=(sel > 0) & (pos < K))
        base += tl.sum(sel, axis=0)


@triton.jit
def _block_scores_kernel(k_ptr, ranges_ptr, qred_ptr, heads_ptr, sums_ptr, scores_ptr, idx_ptr,
                         counter_ptr, B, Hs, M, K, group, skb, skl, skh, ssb, ssm, ssh,
                         scale, norm,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                         MEAN: tl.constexpr, HAS_SUMS: tl.constexpr, TILE: tl.constexpr):
    m = tl.program_id(0)
    start = tl.load(ranges_ptr + 2 * m)
    end = tl.load(ranges_ptr + 2 * m + 1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    # "mean" sums in float64 (float32 within a tile): the factorised score cancels terms of
    # size |q| |k| down to a small s_m, which float32 sums would not resolve.
    total = tl.sum(tl.zeros([BLOCK_D], tl.float64), axis=0)
    for b in range(B):
        for hi in range(Hs):
            kvh = tl.load(heads_ptr + hi) // group
            qv64 = tl.load(qred_ptr + (b * Hs + hi) * D + d, mask=dm, other=0.0)
            kbase = k_ptr + b * skb + kvh * skh
            if MEAN:
                if HAS_SUMS:
                    ks = tl.load(sums_ptr + b * ssb + m * ssm + kvh * ssh + d, mask=dm,
                                 other=0.0).to(tl.float64)
                else:
                    ks = tl.zeros([BLOCK_D], tl.float64)
                    for j0 in range(start, end, BLOCK_J):
                        j = j0 + tl.arange(0, BLOCK_J)
                        msk = (j < end)[:, None] & dm[None, :]
                        tile = tl.load(kbase + j[:, None].to(tl.int64) * skl + d[None, :],
                                       mask=msk, other=0.0).to(tl.float32)
                        ks += tl.sum(tile, axis=0).to(tl.float64)
                # An empty block is an empty sum: 0, even where a sampled query is NaN.
                total += tl.where(end > start, tl.sum(qv64 * ks, axis=0), 0.0)
            else:
                qv = qv64.to(tl.float32)
                best = tl.full([BLOCK_J], float("-inf"), tl.float32)
                for j0 in range(start, end, BLOCK_J):
                    j = j0 + tl.arange(0, BLOCK_J)
                    msk = (j < end)[:, None] & dm[None, :]
                    kk = tl.load(kbase + j[:, None].to(tl.int64) * skl + d[None, :], mask=msk,
                                 other=0.0).to(tl.float32)
                    dots = tl.sum(kk * qv[None, :], axis=1) * scale
                    best = maximum_nan(best, tl.where(j < end, dots, float("-inf")))
                total += max_nan(best, 0).to(tl.float64)  # a NaN key is kept
    tl.store(scores_ptr + m, (total * norm).to(tl.float32))
    # Every thread's part of the store happens before the ticket (release is cumulative).
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if done == M - 1:
        _topk_tail(scores_ptr, idx_ptr, M, K, TILE)


@triton_op("vidstream::select_blocks_triton", mutates_args=())
def select_blocks_triton(q: torch.Tensor, k_pool: torch.Tensor, block_ranges: torch.Tensor,
                         k: int, query_stride: int, heads: List[int], score: str, scale: float,
                         block_key_sums: Optional[torch.Tensor],
                         block_deltas: Optional[torch.Tensor] = None, theta: float = 10000.0,
                         t_theta: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if block_deltas is not None:
        raise NotImplementedError("select_blocks: block_deltas is not implemented on triton yet")
    B, Lq, H, D = q.shape
    M = block_ranges.shape[0]
    dev = q.device
    scores = torch.empty(M, dtype=torch.float32, device=dev)
    idx = torch.empty(min(k, M), dtype=torch.int64, device=dev)
    if M == 0:
        return scores, idx
    if B == 0:  # a mean over no (batch, head, query) terms: NaN; an empty block keeps 0 / -inf
        r = block_ranges.to(dev)
        empty = 0.0 if score == "mean" else float("-inf")
        scores = torch.where(r[:, 1] > r[:, 0], float("nan"), empty).to(torch.float32)
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        return scores, torch.sort(order).values
    if q.stride(3) != 1:
        q = q.contiguous()
    if k_pool.stride(3) != 1:
        k_pool = k_pool.contiguous()
    mean = score == "mean"
    sums = block_key_sums if (mean and block_key_sums is not None) else None
    if sums is not None and sums.stride(3) != 1:
        sums = sums.contiguous()
    ranges = block_ranges.to(dev, torch.int32).contiguous()
    heads_t = torch.tensor(heads, dtype=torch.int32, device=dev)
    Hs = len(heads)
    query_stride = min(query_stride, max(Lq, 1))  # the kernel's stride * sample stays in int64
    n_sampled = (Lq + query_stride - 1) // query_stride
    qred = torch.empty(B * Hs, D, dtype=torch.float64, device=dev)
    counter = torch.empty(1, dtype=torch.int32, device=dev)
    block_d = triton.next_power_of_2(D)
    wrap_triton(_reduce_queries_kernel)[(B * Hs,)](
        q, heads_t, qred, counter, Lq, n_sampled, query_stride, Hs,
        q.stride(0), q.stride(1), q.stride(2), 1.0 if mean else 1.0 / n_sampled,
        D=D, BLOCK_D=block_d, BLOCK_S=32)
    norm = scale / (B * Hs * n_sampled) if mean else 1.0 / (B * Hs)
    s_src = sums if sums is not None else qred  # any pointer when unused
    s_strides = (sums.stride(0), sums.stride(1), sums.stride(2)) if sums is not None else (0, 0, 0)
    wrap_triton(_block_scores_kernel)[(M,)](
        k_pool, ranges, qred, heads_t, s_src, scores, idx, counter, B, Hs, M, min(k, M),
        H // k_pool.shape[2], k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), *s_strides,
        scale, norm, D=D, BLOCK_D=block_d, BLOCK_J=32, MEAN=mean, HAS_SUMS=sums is not None,
        TILE=64)
    return scores, idx


@select_blocks_triton.register_fake
def _(q, k_pool, block_ranges, k, query_stride, heads, score, scale, block_key_sums):
    M = block_ranges.shape[0]
    return (q.new_empty(M, dtype=torch.float32), q.new_empty(min(k, M), dtype=torch.int64))
