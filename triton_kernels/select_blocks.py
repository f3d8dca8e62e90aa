"""Triton kernels of select_blocks (docs/spec.md §5), registered as ``vidstream::select_blocks_triton``.

Two launches, no ``QK^T``: (1) one program per (batch, chosen head) sums the sampled queries
(float64 accumulators fed by float32 tiles);
(2) one program per block reduces its keys (or reads the cached key sums) against those sums and
writes s_m; the program that finishes last (an acq_rel atomic counter, zeroed by launch 1) ranks
all M scores and writes the top-k indices, ascending, in torch.sort(descending, stable) order
(NaN first, ties to the smaller index). A NaN among the keys a block reads, or in the sampled
queries, makes its score NaN under both scores (the "max" reduction propagates NaN).

Per-block temporal offsets (``block_deltas``, issue #12): block m is scored as if its keys were
rope3d_shift_-ed by block_deltas[m], so selection sees the keys where attention will. Since one
orthogonal rotation moves all of a block's keys, the kernel rotates the reduced query by
-delta_m instead (``_unrotate_query``): O(D) per block and head, for both scores and with or
without cached key sums; see there for why this is exact to rounding."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vidstream.ops.rope_math import cos_sin, rope_bands, temporal_angles

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
def _unrotate_query(qv64, q_row, d, tab_row, C_T: tl.constexpr):
    """The reduced query qv64 [BLOCK_D] (float64; its row q_row in memory) rotated by minus
    the block's offset in its temporal band (channels < 2 C_T; table row tab_row [C_T, 2]).

    Block offsets (docs/spec.md §5, positions as metadata) score block m as if its keys were
    rope3d_shift_-ed by delta_m. The rotation R is orthogonal and one per block, so
    q . R(delta) k = R(-delta) q . k for every key: instead of rotating every key ("max") or
    every block's key sum ("mean", where the sum lives in registers and its pair partners would
    need a reshape), the kernel rotates the one query vector it already holds per (block,
    batch, head), O(D) per block instead of O(D * tokens), with the partner channel d ^ 1 read
    back from the query sums in memory (L1-resident). Exact to rounding: the reference rounds
    each rotated key to the input dtype, this works on the unrounded values in float64 (the
    table's cos and sin are the float32 values rope3d_shift_ uses). Pair (a, b) under
    R(-delta): (a cos + b sin, b cos - a sin)."""
    band = d < 2 * C_T
    partner = tl.load(q_row + (d ^ 1), mask=band, other=0.0)
    row = tab_row + (d // 2) * 2
    cos = tl.load(row, mask=band, other=1.0).to(tl.float64)
    sin = tl.load(row + 1, mask=band, other=0.0).to(tl.float64)
    sin = tl.where(d % 2 == 0, sin, -sin)
    return tl.where(band, qv64 * cos + partner * sin, qv64)


@triton.jit
def _block_scores(k_ptr, ranges_ptr, qred_ptr, heads_ptr, sums_ptr, scores_ptr, idx_ptr,
                  counter_ptr, B, Hs, M, K, group, skb, skl, skh, ssb, ssm, ssh, scale, norm,
                  tab_ptr, tab_sr, tab_sh,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                  MEAN: tl.constexpr, HAS_SUMS: tl.constexpr, TILE: tl.constexpr,
                  HAS_DELTAS: tl.constexpr, C_T: tl.constexpr):
    """The body of launch (2), block m = program 0, with or without block offsets (a table of
    rotations, ``_unrotate_query``)."""
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
            if HAS_DELTAS:
                qv64 = _unrotate_query(qv64, qred_ptr + (b * Hs + hi) * D, d,
                                       tab_ptr + m * tab_sr + kvh * tab_sh, C_T)
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


# Two entry points over one body: the kernel without offsets keeps its signature and code (no
# table argument, nothing rotated), the one with offsets adds the table of block rotations.
@triton.jit
def _block_scores_kernel(k_ptr, ranges_ptr, qred_ptr, heads_ptr, sums_ptr, scores_ptr, idx_ptr,
                         counter_ptr, B, Hs, M, K, group, skb, skl, skh, ssb, ssm, ssh,
                         scale, norm,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                         MEAN: tl.constexpr, HAS_SUMS: tl.constexpr, TILE: tl.constexpr):
    _block_scores(k_ptr, ranges_ptr, qred_ptr, heads_ptr, sums_ptr, scores_ptr, idx_ptr,
                  counter_ptr, B, Hs, M, K, group, skb, skl, skh, ssb, ssm, ssh, scale, norm,
                  scores_ptr, 0, 0, D, BLOCK_D, BLOCK_J, MEAN, HAS_SUMS, TILE, False, 0)


@triton.jit
def _block_scores_shifted_kernel(k_ptr, ranges_ptr, qred_ptr, heads_ptr, sums_ptr, scores_ptr,
                                 idx_ptr, counter_ptr, B, Hs, M, K, group, skb, skl, skh,
                                 ssb, ssm, ssh, scale, norm, tab_ptr, tab_sr, tab_sh,
                                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                                 MEAN: tl.constexpr, HAS_SUMS: tl.constexpr, TILE: tl.constexpr,
                                 C_T: tl.constexpr):
    _block_scores(k_ptr, ranges_ptr, qred_ptr, heads_ptr, sums_ptr, scores_ptr, idx_ptr,
                  counter_ptr, B, Hs, M, K, group, skb, skl, skh, ssb, ssm, ssh, scale, norm,
                  tab_ptr, tab_sr, tab_sh, D, BLOCK_D, BLOCK_J, MEAN, HAS_SUMS, TILE, True, C_T)


@triton_op("vidstream::select_blocks_triton", mutates_args=())
def select_blocks_triton(q: torch.Tensor, k_pool: torch.Tensor, block_ranges: torch.Tensor,
                         k: int, query_stride: int, heads: List[int], score: str, scale: float,
                         block_key_sums: Optional[torch.Tensor],
                         block_deltas: Optional[torch.Tensor] = None, theta: float = 10000.0,
                         t_theta: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``block_deltas``: float64 [M] host values (finite) or None; ``t_theta`` [H_kv] or None."""
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
    c_t = rope_bands(D)[0]
    has_deltas = block_deltas is not None and c_t > 0
    if has_deltas:
        # float32 (cos, sin) [M, Ht, C_T, 2] from float64 angles, as rope3d_shift_ builds them;
        # Ht = H_kv with a per-head t_theta (head stride C_T * 2), else 1 (stride 0).
        tab = cos_sin(temporal_angles(block_deltas.to(dev, torch.float64), c_t, theta, t_theta))
        tab_sr, tab_sh = tab.shape[1] * c_t * 2, (c_t * 2 if tab.shape[1] > 1 else 0)
    args = (k_pool, ranges, qred, heads_t, s_src, scores, idx, counter, B, Hs, M, min(k, M),
            H // k_pool.shape[2], k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), *s_strides,
            scale, norm)
    consts = dict(D=D, BLOCK_D=block_d, BLOCK_J=32, MEAN=mean, HAS_SUMS=sums is not None, TILE=64)
    if has_deltas:
        wrap_triton(_block_scores_shifted_kernel)[(M,)](*args, tab, tab_sr, tab_sh, **consts,
                                                        C_T=c_t)
    else:
        wrap_triton(_block_scores_kernel)[(M,)](*args, **consts)
    return scores, idx


@select_blocks_triton.register_fake
def _(q, k_pool, block_ranges, k, query_stride, heads, score, scale, block_key_sums,
      block_deltas=None, theta=10000.0, t_theta=None):
    M = block_ranges.shape[0]
    return (q.new_empty(M, dtype=torch.float32), q.new_empty(min(k, M), dtype=torch.int64))
