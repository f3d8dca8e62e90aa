"""Triton backward of chunk_attention (docs/spec.md §1) and cached_attention (docs/spec.md §2),
FlashAttention-2 style, registered with ``torch.library.triton_op`` as
``vidstream::chunk_attention_backward_triton`` and ``vidstream::cached_attention_backward_triton``.

From the forward's saved ``out`` and ``lse`` (natural log, float32 [B, H, L]):

    Delta_i = dout_i . out_i                         (one small kernel, float32)
    P_ij    = exp(scale * q_i . k_j - lse_i)         (recomputed tile by tile, never L x L)
    dV_j    = sum_i P_ij dout_i
    dS_ij   = P_ij (dout_i . v_j - Delta_i)
    dQ_i    = scale sum_j dS_ij k_j,   dK_j = scale sum_i dS_ij q_i

Two kernels, neither with atomics: dK/dV, one program per (key block, batch x kv head), walks the
query blocks that may see its keys, for each of the G query heads sharing the kv head in turn (so
a kv head's gradient is summed in registers); dQ, one program per (query block, batch x head),
walks its key ranges as the forward does. Each gradient thus has one writer, and the sums run in
a fixed order (deterministic). The price is computing P and dS twice (once per kernel), as
FlashAttention-2 does; the alternative, one pass with atomic dQ adds, would make the float32 sums
order-dependent and cost a zeroed float32 dQ buffer.

Chunk mask: arithmetic on frame and chunk indices, as in the forward. A key j in frame f_j, chunk
c_j is seen by the queries of chunks c_j .. (f_j + window) // chunk_frames - 1 (all later chunks
for a sink key or without a window): for a key block, one contiguous query range, of which the
middle part (queries seeing every key of the block) takes the unmasked path and only the edges
evaluate the mask. Blocks no query of the other side may see are never visited (not masked):
``counts=`` of the launchers reports how many blocks each program visited (tests).

Cached form: every query sees every key of the ranges. dK/dV runs one program per pool block of
BLOCK_N tokens (keys outside every range get 0, so dk_pool/dv_pool need no zeroing pass, and no
host read of the range lengths is needed to size the grid); dQ walks the ranges as the forward.
With ``kv_deltas`` the forward reads key j of range r rotated on its temporal band (the first
2 * c_t channels, adjacent pairs) by kv_deltas[r] frames: keys are rotated as loaded (float32,
rounded once to k's dtype as rope3d_shift_ rounds them), and dk_pool = R(delta)^T dk' (the
inverse rotation of the gradient of the rotated key).

Precision: scores, P, dS and every accumulator in float32; dot operands in the input dtype (P and
dS rounded to it, as the forward rounds P), IEEE float32 dots for float32 inputs; gradients
returned in the input dtype.

NaN and Inf (docs/spec.md, Conventions): gradients equal float64 autograd of the eager reference
where that is finite, and a gradient element is NaN wherever autograd's is NaN, given the
forward's ``out`` and ``lse``:
- a non-finite element of q, k, v or dout reaches exactly the gradients whose autograd formula
  reads it through an allowed (query, key) pair: masked pairs are dropped by selection (never
  multiplied by 0), and where a tile's mask differs by row and the operand read through it holds
  a NaN or Inf (rare), its product is formed pair by pair over the allowed pairs only, as the
  forward does for P @ V; keys outside the ranges and rows past the end are never read;
- rows with lse = -inf and nothing to attend (an empty union of ranges) get dq = 0 and give
  nothing to dk/dv; lse = -inf with keys present (all scores -inf) has a NaN ``out`` (forward
  rule), so its Delta and gradients are NaN, as autograd's are;
- Inf (rather than NaN) gradients: where autograd forms inf - inf the kernels do too, but Delta is
  dout . out where autograd sums P * dP, so with infinite v or dout an element autograd gives as
  +-Inf may come out NaN here or the reverse (both non-finite; never a finite value for either).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vidstream.ops.rope_math import cos_sin, rope_bands, temporal_angles

# The forward's P @ V for rows with different masks, its key/value tile load, its autotune
# configs and layout rule (kernels address the head dim with unit stride; other strides, 0
# included, are passed).
from .attention import _allowed_dot, _configs, _inner, _load_kv

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Under the interpreter every config would run: one, with 16-row tiles so that the tests' small
# sequences still span several blocks (the block-skipping logic is what they check).
INTERPRET_TILE = 16

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The dK/dV program keeps k, v and two float32
# accumulators [BLOCK_N, D] resident, the dQ program q, dout and one accumulator [BLOCK_M, D]:
# square 64 x 64 tiles first, then shapes that favour the resident side. float32 inputs run IEEE
# FMA dots at twice the shared memory per tile.
_TILES_16BIT = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2), (32, 64, 4, 3)]
_TILES_FP32 = [(32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2)]


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _rotate(x, cos, sin, C_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """x [ROWS, BLOCK_D] float32 with its first C_T adjacent pairs rotated by (cos, sin)
    [ROWS or 1, BLOCK_D // 2]; the other channels are returned bitwise (selected, not multiplied
    by 1 and 0, which would turn an Inf there into NaN)."""
    a, b = tl.split(tl.reshape(x, (ROWS, BLOCK_D // 2, 2)))
    band = (tl.arange(0, BLOCK_D // 2) < C_T)[None, :]
    ra = tl.where(band, a * cos - b * sin, a)
    rb = tl.where(band, a * sin + b * cos, b)
    return tl.reshape(tl.join(ra, rb), (ROWS, BLOCK_D))


@triton.jit
def _row_stats(lse_ptr, delta_ptr, offs_m, n_rows):
    """lse and Delta of rows offs_m. A row with lse = -inf attended nothing: its lse is read as
    +inf so that exp(s - lse) = 0 and it gives nothing (exp(s + inf) would be +inf). Rows past
    the end read +inf too."""
    lse = tl.load(lse_ptr + offs_m, mask=offs_m < n_rows, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_ptr + offs_m, mask=offs_m < n_rows, other=0.0)
    return lse, delta


# ----------------------------------------------------------------------------- Delta


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, L, heads,
                  so_b, so_l, so_h, sdo_b, sdo_l, sdo_h,
                  DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_DV)
    mask = (offs_m < L)[:, None] & (offs_e < DV)[None, :]
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_e[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_e[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


# ----------------------------------------------------------------------------- dK / dV


@triton.jit
def _dkdv_block(dk, dv, k, v, offs_n, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_l, sdo_l, m0, n_rows,
                scale, ft, cf, sink, window,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CHUNK_MASK: tl.constexpr,
                HAS_WINDOW: tl.constexpr, PREC: tl.constexpr):
    """One query block [m0, m0 + BLOCK_M) of one head against the program's keys, transposed
    (keys are rows): dk, dv [BLOCK_N, *] float32 accumulators."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n_rows
    q = tl.load(q_ptr + offs_m[:, None] * sq_l + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    do = tl.load(do_ptr + offs_m[:, None] * sdo_l + offs_e[None, :],
                 mask=row_ok[:, None] & (offs_e < DV)[None, :], other=0.0)
    # _row_stats inline (likewise the mask below): the interpreter pays for every nested
    # call, and this runs once per block.
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2((s_t - lse[None, :]) * 1.4426950408889634)
    ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
    if MASKED:
        ok = row_ok[None, :]
        if CHUNK_MASK:  # docs/spec.md §1, keys as rows
            chunk_i = offs_m // ft // cf
            frame_j = offs_n // ft
            ok = ok & ((frame_j // cf)[:, None] <= chunk_i[None, :])
            if HAS_WINDOW:
                ok = ok & ((frame_j[:, None] < sink)
                           | (frame_j[:, None] >= ((chunk_i + 1) * cf - window)[None, :]))
        # Selected, not multiplied: a masked pair's NaN/Inf score or dP is dropped here.
        p_t = tl.where(ok, p_t, 0.0)
        ds_t = tl.where(ok, ds_t, 0.0)
    if MASKED and CHUNK_MASK:
        bad = (~(tl.abs(q.to(tl.float32)) < float("inf"))).to(tl.int32)
        bad_do = (~(tl.abs(do.to(tl.float32)) < float("inf"))).to(tl.int32)
        if tl.sum(bad) + tl.sum(bad_do) > 0:
            # The mask differs by row and a row holds a NaN/Inf: the two products pair by pair
            # over the allowed pairs only (0 * NaN must not reach a key the row may not see).
            dv += _allowed_dot(p_t.to(do.dtype).to(tl.float32), ok, do_ptr, sdo_l, m0, n_rows,
                               BLOCK_M, DV, BLOCK_DV)
            dk += _allowed_dot(ds_t.to(q.dtype).to(tl.float32), ok, q_ptr, sq_l, m0, n_rows,
                               BLOCK_M, D, BLOCK_D)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, k, v, offs_n, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_l, sdo_l,
                qs, qe, fs, fe, n_rows, scale, ft, cf, sink, window,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, CHUNK_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                PREC: tl.constexpr):
    """Query blocks qs + t * BLOCK_M covering [qs, qe); those wholly inside [fs, fe) (queries
    that see every key of the block) skip the mask. Returns dk, dv and the blocks visited."""
    n_blocks = tl.cdiv(tl.maximum(qe - qs, 0), BLOCK_M)
    t_lo = tl.minimum(tl.cdiv(tl.maximum(fs - qs, 0), BLOCK_M), n_blocks)
    t_hi = tl.minimum(tl.maximum(tl.maximum(fe - qs, 0) // BLOCK_M, t_lo), n_blocks)
    for t in range(0, t_lo):
        dk, dv = _dkdv_block(dk, dv, k, v, offs_n, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_l, sdo_l,
                             qs + t * BLOCK_M, n_rows, scale, ft, cf, sink, window, D, DV, BLOCK_D,
                             BLOCK_DV, BLOCK_M, True, CHUNK_MASK, HAS_WINDOW, PREC)
    for t in range(t_lo, t_hi):
        dk, dv = _dkdv_block(dk, dv, k, v, offs_n, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_l, sdo_l,
                             qs + t * BLOCK_M, n_rows, scale, ft, cf, sink, window, D, DV, BLOCK_D,
                             BLOCK_DV, BLOCK_M, False, CHUNK_MASK, HAS_WINDOW, PREC)
    for t in range(t_hi, n_blocks):
        dk, dv = _dkdv_block(dk, dv, k, v, offs_n, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_l, sdo_l,
                             qs + t * BLOCK_M, n_rows, scale, ft, cf, sink, window, D, DV, BLOCK_D,
                             BLOCK_DV, BLOCK_M, True, CHUNK_MASK, HAS_WINDOW, PREC)
    return dk, dv, n_blocks


@triton.jit
def _chunk_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cnt_ptr,
                       L, heads, kv_heads, group, scale, ft, cf, sink, window,
                       sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, sdo_b, sdo_l, sdo_h,
                       sdk_b, sdk_l, sdk_h, sdv_b, sdv_l, sdv_h,
                       D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
                       COUNT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // kv_heads).to(tl.int64)  # batch offsets can pass 2**31 elements
    hk = bhk % kv_heads
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    # Keys past L are loaded as 0; their (unmasked) rows of dk/dv are never stored, and each key
    # row accumulates alone, so they need no mask.
    key_ok = offs_n < L
    k = tl.load(k_ptr + b * sk_b + hk * sk_h + offs_n[:, None] * sk_l + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    v = tl.load(v_ptr + b * sv_b + hk * sv_h + offs_n[:, None] * sv_l + offs_e[None, :],
                mask=key_ok[:, None] & (offs_e < DV)[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # The block's keys lie in frames f_lo..f_hi. Queries of chunk(f_lo) onwards may see a key;
    # those from chunk(f_hi) on see all of them causally. With a window, a non-sink key in frame
    # f is seen up to the chunk whose end is f + window: the latest such chunk over the block's
    # keys ends the range, the earliest (over its non-sink keys) ends the unmasked part.
    f_lo = n0 // ft
    f_hi = (tl.minimum(n0 + BLOCK_N, L) - 1) // ft
    q_start = f_lo // cf * cf * ft
    full_start = f_hi // cf * cf * ft
    if HAS_WINDOW:
        q_end = tl.where(f_lo < sink, L, tl.minimum((f_hi + window) // cf * cf * ft, L))
        full_end = tl.where(f_hi < sink, L,
                            tl.minimum((tl.maximum(f_lo, sink) + window) // cf * cf * ft, L))
    else:
        q_end = L
        full_end = L
    visited = 0
    for g in range(0, group):  # the G query heads of this kv head, summed here (no atomics)
        h = hk * group + g
        bh = b * heads + h
        dk, dv, n = _dkdv_range(dk, dv, k, v, offs_n, q_ptr + b * sq_b + h * sq_h,
                                do_ptr + b * sdo_b + h * sdo_h, lse_ptr + bh * L,
                                delta_ptr + bh * L, sq_l, sdo_l, q_start, q_end, full_start,
                                full_end, L, scale, ft, cf, sink, window, D, DV, BLOCK_D, BLOCK_DV,
                                BLOCK_M, True, HAS_WINDOW, PREC)
        visited += n
    if COUNT:
        tl.store(cnt_ptr + bhk * tl.num_programs(0) + tl.program_id(0), visited)
    tl.store(dk_ptr + b * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_l + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_ok[:, None] & (offs_d < D)[None, :])
    tl.store(dv_ptr + b * sdv_b + hk * sdv_h + offs_n[:, None] * sdv_l + offs_e[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None] & (offs_e < DV)[None, :])


@triton.jit
def _cached_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                        ranges_ptr, tab_ptr, num_ranges, P, Lq, heads, kv_heads, group, scale,
                        sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, sdo_b, sdo_l, sdo_h,
                        sdk_b, sdk_l, sdk_h, sdv_b, sdv_l, sdv_h,
                        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, HAS_DELTA: tl.constexpr, C_T: tl.constexpr,
                        T_HEADS: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // kv_heads).to(tl.int64)
    hk = bhk % kv_heads
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    # Which range holds each key of this pool block (ranges are disjoint; any order).
    member = offs_n < 0
    r_of = tl.zeros([BLOCK_N], dtype=tl.int32)
    for r in range(0, num_ranges):
        inside = (offs_n >= tl.load(ranges_ptr + 2 * r)) & (offs_n < tl.load(ranges_ptr + 2 * r + 1))
        member = member | inside
        r_of = tl.where(inside, r, r_of)
    # Keys outside every range are never read (a NaN there cannot enter) and get 0.
    k = tl.load(k_ptr + b * sk_b + hk * sk_h + offs_n[:, None] * sk_l + offs_d[None, :],
                mask=member[:, None] & (offs_d < D)[None, :], other=0.0)
    v = tl.load(v_ptr + b * sv_b + hk * sv_h + offs_n[:, None] * sv_l + offs_e[None, :],
                mask=member[:, None] & (offs_e < DV)[None, :], other=0.0)
    if HAS_DELTA:
        p = tl.arange(0, BLOCK_D // 2)
        th = hk if T_HEADS > 1 else 0
        tab = tab_ptr + ((r_of[:, None] * T_HEADS + th) * C_T + p[None, :]) * 2
        in_band = member[:, None] & (p < C_T)[None, :]
        cos = tl.load(tab, mask=in_band, other=1.0)
        sin = tl.load(tab + 1, mask=in_band, other=0.0)
        # The key as the forward reads it: rotated in float32, rounded once to k's dtype.
        k = _rotate(k.to(tl.float32), cos, sin, C_T, BLOCK_N, BLOCK_D).to(k.dtype)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Every query sees every key of the ranges: all query blocks, unless no key here is in one.
    q_end = tl.where(tl.sum(member.to(tl.int32)) > 0, Lq, 0)
    for g in range(0, group):
        h = hk * group + g
        bh = b * heads + h
        dk, dv, n = _dkdv_range(dk, dv, k, v, offs_n, q_ptr + b * sq_b + h * sq_h,
                                do_ptr + b * sdo_b + h * sdo_h, lse_ptr + bh * Lq,
                                delta_ptr + bh * Lq, sq_l, sdo_l, 0, q_end, 0, 0, Lq, scale,
                                1, 1, 0, 0, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, False, False, PREC)
    dk = dk * scale
    if HAS_DELTA:
        dk = _rotate(dk, cos, -sin, C_T, BLOCK_N, BLOCK_D)  # R^T: the gradient of the stored key
    in_pool = offs_n < P
    tl.store(dk_ptr + b * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_l + offs_d[None, :],
             tl.where(member[:, None], dk, 0.0).to(dk_ptr.dtype.element_ty),
             mask=in_pool[:, None] & (offs_d < D)[None, :])
    tl.store(dv_ptr + b * sdv_b + hk * sdv_h + offs_n[:, None] * sdv_l + offs_e[None, :],
             tl.where(member[:, None], dv, 0.0).to(dv_ptr.dtype.element_ty),
             mask=in_pool[:, None] & (offs_e < DV)[None, :])


# ----------------------------------------------------------------------------- dQ


@triton.jit
def _dq_block(dq, q, do, lse, delta, offs_m, k_ptr, v_ptr, sk_l, sv_l, n0, key_end, scale,
              ft, cf, sink, window, cos, sin,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CHUNK_MASK: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_DELTA: tl.constexpr, C_T: tl.constexpr,
              PREC: tl.constexpr):
    """One key block [n0, n0 + BLOCK_N) of a range ending at key_end against the program's
    queries: dq [BLOCK_M, BLOCK_D] float32 accumulator."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k, v = _load_kv(k_ptr, v_ptr, sk_l, sv_l, offs_n, key_end, D, DV, BLOCK_D, BLOCK_DV, MASKED)
    if HAS_DELTA:
        k = _rotate(k.to(tl.float32), cos, sin, C_T, BLOCK_N, BLOCK_D).to(k.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    p = tl.math.exp2((s - lse[:, None]) * 1.4426950408889634)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
    if MASKED:
        ok = (offs_n < key_end)[None, :]
        if CHUNK_MASK:  # docs/spec.md §1
            chunk_i = offs_m // ft // cf
            frame_j = offs_n // ft
            ok = ok & ((frame_j // cf)[None, :] <= chunk_i[:, None])
            if HAS_WINDOW:
                ok = ok & ((frame_j[None, :] < sink)
                           | (frame_j[None, :] >= ((chunk_i + 1) * cf - window)[:, None]))
        ds = tl.where(ok, ds, 0.0)  # a masked pair's NaN/Inf score or dP is dropped here
    if MASKED and CHUNK_MASK:
        if tl.sum((~(tl.abs(k.to(tl.float32)) < float("inf"))).to(tl.int32)) > 0:
            # 0 * NaN must not reach a row that may not see the key: pair by pair
            dq += _allowed_dot(ds.to(k.dtype).to(tl.float32), ok, k_ptr, sk_l, n0, key_end,
                               BLOCK_N, D, BLOCK_D)
        else:
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    else:
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _dq_range(dq, q, do, lse, delta, offs_m, k_ptr, v_ptr, sk_l, sv_l, rs, re, fs, fe, scale,
              ft, cf, sink, window, cos, sin,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, CHUNK_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_DELTA: tl.constexpr, C_T: tl.constexpr, PREC: tl.constexpr):
    """Key blocks rs + t * BLOCK_N covering [rs, re); those wholly inside [fs, fe) (keys every
    query of the block sees) skip the mask. Returns dq and the blocks visited."""
    n_blocks = tl.cdiv(tl.maximum(re - rs, 0), BLOCK_N)
    t_lo = tl.minimum(tl.cdiv(tl.maximum(fs - rs, 0), BLOCK_N), n_blocks)
    t_hi = tl.minimum(tl.maximum(tl.maximum(fe - rs, 0) // BLOCK_N, t_lo), n_blocks)
    for t in range(0, t_lo):
        dq = _dq_block(dq, q, do, lse, delta, offs_m, k_ptr, v_ptr, sk_l, sv_l, rs + t * BLOCK_N,
                       re, scale, ft, cf, sink, window, cos, sin, D, DV, BLOCK_D, BLOCK_DV,
                       BLOCK_N, True, CHUNK_MASK, HAS_WINDOW, HAS_DELTA, C_T, PREC)
    for t in range(t_lo, t_hi):
        dq = _dq_block(dq, q, do, lse, delta, offs_m, k_ptr, v_ptr, sk_l, sv_l, rs + t * BLOCK_N,
                       re, scale, ft, cf, sink, window, cos, sin, D, DV, BLOCK_D, BLOCK_DV,
                       BLOCK_N, False, CHUNK_MASK, HAS_WINDOW, HAS_DELTA, C_T, PREC)
    for t in range(t_hi, n_blocks):
        dq = _dq_block(dq, q, do, lse, delta, offs_m, k_ptr, v_ptr, sk_l, sv_l, rs + t * BLOCK_N,
                       re, scale, ft, cf, sink, window, cos, sin, D, DV, BLOCK_D, BLOCK_DV,
                       BLOCK_N, True, CHUNK_MASK, HAS_WINDOW, HAS_DELTA, C_T, PREC)
    return dq, n_blocks


@triton.jit
def _load_rows(q_ptr, do_ptr, sq_l, sdo_l, offs_m, n_rows, D: tl.constexpr, DV: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n_rows
    q = tl.load(q_ptr + offs_m[:, None] * sq_l + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    do = tl.load(do_ptr + offs_m[:, None] * sdo_l + offs_e[None, :],
                 mask=row_ok[:, None] & (offs_e < DV)[None, :], other=0.0)
    return q, do


@triton.jit
def _store_dq(dq_ptr, dq, offs_m, sdq_l, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(dq_ptr + offs_m[:, None] * sdq_l + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=(offs_m < n_rows)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _chunk_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cnt_ptr,
                     L, heads, group, scale, ft, cf, sink, window,
                     sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, sdo_b, sdo_l, sdo_h,
                     sdq_b, sdq_l, sdq_h,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
                     COUNT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q, do = _load_rows(q_ptr + b * sq_b + h * sq_h, do_ptr + b * sdo_b + h * sdo_h, sq_l, sdo_l,
                       offs_m, L, D, DV, BLOCK_D, BLOCK_DV)
    lse, delta = _row_stats(lse_ptr + bh * L, delta_ptr + bh * L, offs_m, L)
    kp = k_ptr + b * sk_b + hk * sk_h
    vp = v_ptr + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The key ranges of the forward (triton_kernels/attention.py): the rows lie in chunks
    # c_lo..c_hi; end = first frame after a chunk; at most a sink and a window range.
    last = tl.minimum(m0 + BLOCK_M, L) - 1
    end_lo = (m0 // ft // cf + 1) * cf
    end_hi = (last // ft // cf + 1) * cf
    keys_end = tl.minimum(end_hi * ft, L)
    all_end = tl.minimum(end_lo * ft, L)  # keys before it are causal for every row
    if HAS_WINDOW:
        sink_end = tl.minimum(tl.minimum(sink, end_hi) * ft, keys_end)
        win_lo = tl.maximum(end_lo - window, 0) * ft  # earliest window key of any row
        win_all = tl.maximum(end_hi - window, 0) * ft  # window keys every row sees start here
        if sink_end >= win_lo:  # sink and window touch: one range
            fs = tl.where(win_all <= tl.minimum(sink, end_lo) * ft, 0, win_all)
            dq, visited = _dq_range(dq, q, do, lse, delta, offs_m, kp, vp, sk_l, sv_l, 0, keys_end,
                                    fs, all_end, scale, ft, cf, sink, window, 1.0, 0.0, D, DV,
                                    BLOCK_D, BLOCK_DV, BLOCK_N, True, True, False, 0, PREC)
        else:
            dq, n1 = _dq_range(dq, q, do, lse, delta, offs_m, kp, vp, sk_l, sv_l, 0, sink_end, 0,
                               tl.minimum(tl.minimum(sink, end_lo) * ft, L), scale, ft, cf, sink,
                               window, 1.0, 0.0, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, True,
                               False, 0, PREC)
            dq, n2 = _dq_range(dq, q, do, lse, delta, offs_m, kp, vp, sk_l, sv_l, win_lo, keys_end,
                               win_all, all_end, scale, ft, cf, sink, window, 1.0, 0.0, D, DV,
                               BLOCK_D, BLOCK_DV, BLOCK_N, True, True, False, 0, PREC)
            visited = n1 + n2
    else:
        dq, visited = _dq_range(dq, q, do, lse, delta, offs_m, kp, vp, sk_l, sv_l, 0, keys_end, 0,
                                all_end, scale, ft, cf, sink, window, 1.0, 0.0, D, DV, BLOCK_D,
                                BLOCK_DV, BLOCK_N, True, False, False, 0, PREC)
    if COUNT:
        tl.store(cnt_ptr + bh * tl.num_programs(0) + tl.program_id(0), visited)
    _store_dq(dq_ptr + b * sdq_b + h * sdq_h, dq * scale, offs_m, sdq_l, L, D, BLOCK_D)


@triton.jit
def _cached_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, ranges_ptr, tab_ptr,
                      num_ranges, Lq, heads, group, scale,
                      sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, sdo_b, sdo_l, sdo_h,
                      sdq_b, sdq_l, sdq_h,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, HAS_DELTA: tl.constexpr, C_T: tl.constexpr,
                      T_HEADS: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q, do = _load_rows(q_ptr + b * sq_b + h * sq_h, do_ptr + b * sdo_b + h * sdo_h, sq_l, sdo_l,
                       offs_m, Lq, D, DV, BLOCK_D, BLOCK_DV)
    lse, delta = _row_stats(lse_ptr + bh * Lq, delta_ptr + bh * Lq, offs_m, Lq)
    kp = k_ptr + b * sk_b + hk * sk_h
    vp = v_ptr + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p = tl.arange(0, BLOCK_D // 2)
    th = hk if T_HEADS > 1 else 0
    for r in range(0, num_ranges):
        rs = tl.load(ranges_ptr + 2 * r)
        re = tl.load(ranges_ptr + 2 * r + 1)
        if HAS_DELTA:  # one rotation per range
            tab = tab_ptr + ((r * T_HEADS + th) * C_T + p) * 2
            cos = tl.load(tab, mask=p < C_T, other=1.0)[None, :]
            sin = tl.load(tab + 1, mask=p < C_T, other=0.0)[None, :]
        else:
            cos = 1.0
            sin = 0.0
        dq, n = _dq_range(dq, q, do, lse, delta, offs_m, kp, vp, sk_l, sv_l, rs, re, rs, re, scale,
                          1, 1, 0, 0, cos, sin, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, False,
                          HAS_DELTA, C_T, PREC)
    _store_dq(dq_ptr + b * sdq_b + h * sdq_h, dq * scale, offs_m, sdq_l, Lq, D, BLOCK_D)


# One autotuner per kernel and precision (keyed by whether the inputs are float32). Every kernel
# writes each output element exactly once (no accumulation across launches), so the autotuner's
# repeated benchmark launches leave correct results.
def _tuned(kernel, key: list) -> dict:
    return {ieee: triton.autotune(configs=_configs(_TILES_FP32 if ieee else _TILES_16BIT,
                                                   INTERPRET_TILE),
                                  key=key)(kernel) for ieee in (False, True)}


_TUNED_CHUNK_DKDV = _tuned(_chunk_dkdv_kernel, ["D", "DV", "HAS_WINDOW"])
_TUNED_CHUNK_DQ = _tuned(_chunk_dq_kernel, ["D", "DV", "HAS_WINDOW"])
_TUNED_CACHED_DKDV = _tuned(_cached_dkdv_kernel, ["D", "DV", "HAS_DELTA"])
_TUNED_CACHED_DQ = _tuned(_cached_dq_kernel, ["D", "DV", "HAS_DELTA"])
_DELTA_ROWS = 16 if _INTERPRET else 64


# ----------------------------------------------------------------------------- launchers


def _strides(*ts) -> tuple:
    return tuple(s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2)))


def _dims(q, v) -> dict:
    D, DV = q.shape[3], v.shape[3]
    return dict(D=D, DV=DV, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(DV)),
                # IEEE float32 dots for float32 inputs; 16-bit inputs take the default (tensor cores)
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _check(dout, q, k, v, out, lse, k_name: str, v_name: str) -> None:
    """What the kernels assume of their inputs (the autograd layer passes the forward's own
    tensors; a mismatch here would otherwise read out of bounds or silently mis-scale)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention backward (triton): q must be float16, bfloat16 or float32, "
                         f"got {q.dtype}")
    for name, t in (("dout", dout), (k_name, k), (v_name, v), ("out", out)):
        if t.dtype != q.dtype or t.device != q.device or t.dim() != 4:
            raise ValueError(f"attention backward (triton): {name} must be a 4-d {q.dtype} tensor "
                             f"on {q.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    B, L, H, D = q.shape
    Hk = k.shape[2]
    if (k.shape[0] != B or k.shape[3] != D or Hk < 1 or H % Hk or v.shape[:3] != k.shape[:3]
            or tuple(out.shape) != (B, L, H, v.shape[3]) or dout.shape != out.shape):
        raise ValueError(f"attention backward (triton): shapes do not match: q {tuple(q.shape)}, "
                         f"{k_name} {tuple(k.shape)}, {v_name} {tuple(v.shape)}, out "
                         f"{tuple(out.shape)}, dout {tuple(dout.shape)}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != (B, H, L) or lse.device != q.device:
        raise ValueError(f"attention backward (triton): lse must be float32 [B, H, L] = "
                         f"{[B, H, L]} on {q.device}, got {lse.dtype} {tuple(lse.shape)}")


def _delta(out, dout):
    B, L, H, DV = out.shape
    delta = torch.empty(B, H, L, dtype=torch.float32, device=out.device)
    if delta.numel():
        wrap_triton(_delta_kernel)[(triton.cdiv(L, _DELTA_ROWS), B * H)](
            out, dout, delta, L, H, *_strides(out, dout), DV=DV,
            BLOCK_DV=max(16, triton.next_power_of_2(DV)), BLOCK_M=_DELTA_ROWS)
    return delta


def _bounded(frames: int, chunk_frames: int, sink_frames: int, window_frames):
    # The forward's bounded_mask_params (vidstream/ops/attention.py), applied again so that no
    # caller's large value can overflow the kernels' int arithmetic; idempotent.
    n = max(frames, 1)
    chunk = min(chunk_frames, n)
    window = None if window_frames is None else max(chunk, min(window_frames, 2 * n))
    return chunk, min(sink_frames, n), window


def chunk_backward_launch(dout, q, k, v, out, lse, frame_tokens, chunk_frames, sink_frames,
                          window_frames, scale, counts: Optional[dict] = None):
    """(dq, dk, dv). ``counts``: a dict that receives the blocks each program visited, "dkdv"
    int32 [B * H_kv, key blocks] (summed over the G query heads) and "dq" int32 [B * H, query
    blocks] (tests: excluded blocks are never visited)."""
    _check(dout, q, k, v, out, lse, "k", "v")
    if not (isinstance(frame_tokens, int) and frame_tokens >= 1 and isinstance(chunk_frames, int)
            and chunk_frames >= 1 and sink_frames >= 0
            and (window_frames is None or window_frames >= chunk_frames)):
        raise ValueError(f"chunk_attention backward (triton): bad mask parameters frame_tokens="
                         f"{frame_tokens}, chunk_frames={chunk_frames}, sink_frames={sink_frames}, "
                         f"window_frames={window_frames}")
    B, L, H, D = q.shape
    if L % frame_tokens:
        raise ValueError(f"chunk_attention backward (triton): L = {L} is not a multiple of "
                         f"frame_tokens = {frame_tokens}")
    cf, sink, window = _bounded(L // frame_tokens, chunk_frames, sink_frames, window_frames)
    dout, q, k, v, out = (_inner(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    Hk = k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if B * L * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _delta(out, dout)
    ieee = q.dtype == torch.float32
    dims = _dims(q, v)
    common = dict(HAS_WINDOW=window is not None, COUNT=counts is not None, **dims)
    win = 0 if window is None else window
    scale = float(scale)
    cnt = {}
    if counts is not None:
        tile = INTERPRET_TILE if _INTERPRET else None
        if tile is None:
            raise ValueError("counts= needs the interpreter's fixed tile")
        cnt["dkdv"] = torch.zeros(B * Hk, triton.cdiv(L, tile), dtype=torch.int32, device=q.device)
        cnt["dq"] = torch.zeros(B * H, triton.cdiv(L, tile), dtype=torch.int32, device=q.device)
    wrap_triton(_TUNED_CHUNK_DKDV[ieee])[lambda m: (triton.cdiv(L, m["BLOCK_N"]), B * Hk)](
        q, k, v, dout, lse, delta, dk, dv, cnt.get("dkdv", delta), L, H, Hk, H // Hk, scale,
        frame_tokens, cf, sink, win, *_strides(q, k, v, dout, dk, dv), **common)
    wrap_triton(_TUNED_CHUNK_DQ[ieee])[lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, cnt.get("dq", delta), L, H, H // Hk, scale, frame_tokens,
        cf, sink, win, *_strides(q, k, v, dout, dq), **common)
    if counts is not None:
        counts.update(cnt)
    return dq, dk, dv


def cached_backward_launch(dout, q, k_pool, v_pool, out, lse, kv_ranges, scale, kv_deltas=None,
                           theta=10000.0, t_theta=None):
    """(dq, dk_pool, dv_pool); ``kv_ranges`` int32 [R, 2] on q's device, already checked (in
    bounds, disjoint); ``kv_deltas`` float64 [R] or None."""
    _check(dout, q, k_pool, v_pool, out, lse, "k_pool", "v_pool")
    if kv_ranges.dim() != 2 or kv_ranges.shape[1] != 2 or kv_ranges.device != q.device:
        raise ValueError(f"cached_attention backward (triton): kv_ranges must be [R, 2] on "
                         f"{q.device}, got {tuple(kv_ranges.shape)} on {kv_ranges.device}")
    R = kv_ranges.shape[0]
    if kv_deltas is not None and tuple(kv_deltas.shape) != (R,):
        raise ValueError(f"cached_attention backward (triton): kv_deltas must have shape [{R}], "
                         f"got {tuple(kv_deltas.shape)}")
    ranges = kv_ranges.to(torch.int32).contiguous()
    dout, q, k, v, out = (_inner(t) for t in (dout, q, k_pool, v_pool, out))
    lse = lse.contiguous()
    B, Lq, H, D = q.shape
    P, Hk = k.shape[1], k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if B * Hk * P == 0 or Lq * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _delta(out, dout)
    c_t = rope_bands(D)[0]
    if kv_deltas is not None:
        # [R, Ht, c_t, 2] float32 from float64 angles, as the forward and rope3d_shift_ build it.
        tab = cos_sin(temporal_angles(kv_deltas.to(q.device, torch.float64), c_t, theta, t_theta))
    else:
        tab = delta  # never read
    rot = dict(HAS_DELTA=kv_deltas is not None, C_T=c_t,
               T_HEADS=tab.shape[1] if kv_deltas is not None else 1)
    ieee = q.dtype == torch.float32
    dims = _dims(q, v)
    scale = float(scale)
    wrap_triton(_TUNED_CACHED_DKDV[ieee])[lambda m: (triton.cdiv(P, m["BLOCK_N"]), B * Hk)](
        q, k, v, dout, lse, delta, dk, dv, ranges, tab, R, P, Lq, H, Hk, H // Hk, scale,
        *_strides(q, k, v, dout, dk, dv), **rot, **dims)
    wrap_triton(_TUNED_CACHED_DQ[ieee])[lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, ranges, tab, R, Lq, H, H // Hk, scale,
        *_strides(q, k, v, dout, dq), **rot, **dims)
    return dq, dk, dv


# ----------------------------------------------------------------------------- ops


def _grads_like(q, k, v):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


@triton_op("vidstream::chunk_attention_backward_triton", mutates_args=())
def _chunk_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 frame_tokens: int, chunk_frames: int, sink_frames: int,
                                 window_frames: Optional[int], scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return chunk_backward_launch(dout, q, k, v, out, lse, frame_tokens, chunk_frames, sink_frames,
                                 window_frames, scale)


@_chunk_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, frame_tokens, chunk_frames, sink_frames, window_frames, scale):
    return _grads_like(q, k, v)


@triton_op("vidstream::cached_attention_backward_triton", mutates_args=())
def _cached_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k_pool: torch.Tensor,
                                  v_pool: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  kv_ranges: torch.Tensor, scale: float,
                                  kv_deltas: Optional[torch.Tensor] = None,
                                  theta: float = 10000.0, t_theta: Optional[torch.Tensor] = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cached_backward_launch(dout, q, k_pool, v_pool, out, lse, kv_ranges, scale, kv_deltas,
                                  theta, t_theta)


@_cached_attention_backward_op.register_fake
def _(dout, q, k_pool, v_pool, out, lse, kv_ranges, scale, kv_deltas=None, theta=10000.0,
      t_theta=None):
    return _grads_like(q, k_pool, v_pool)


def chunk_attention_backward_triton(dout, q, k, v, out, lse, frame_tokens: int, chunk_frames: int,
                                    sink_frames: int, window_frames: Optional[int], scale: float):
    """(dq, dk, dv) of chunk_attention (docs/spec.md §1) from the forward's ``out`` and float32
    ``lse`` [B, H, L], in q's dtype; the op ``vidstream::chunk_attention_backward_triton``."""
    return _chunk_attention_backward_op(dout, q, k, v, out, lse, int(frame_tokens),
                                        int(chunk_frames), int(sink_frames),
                                        None if window_frames is None else int(window_frames),
                                        float(scale))


def cached_attention_backward_triton(dout, q, k_pool, v_pool, out, lse, kv_ranges, scale: float,
                                     kv_deltas=None, theta: float = 10000.0, t_theta=None):
    """(dq, dk_pool, dv_pool) of cached_attention (docs/spec.md §2); dk_pool and dv_pool are 0
    outside the ranges, and with ``kv_deltas`` (float64 [R]) dk_pool is the gradient of the
    stored, unshifted keys. ``kv_ranges``: int32 [R, 2] on q's device, already checked; the op
    ``vidstream::cached_attention_backward_triton``."""
    return _cached_attention_backward_op(dout, q, k_pool, v_pool, out, lse, kv_ranges,
                                         float(scale), kv_deltas, float(theta), t_theta)
