"""Triton kernel of lowrank_decompress (docs/spec.md §4), registered with ``torch.library.triton_op`` as
``vidstream::lowrank_decompress_triton``.

One program: BLOCK_N tokens of the ranges for one head. The latent tile is gathered through the
token index (so ranges in any order cost nothing extra), multiplied by the head's K and V
up-projections with float32 accumulation, and K (with the shared positional key appended) and V
are written in the [B, N, H, D] layout the attention kernels read. Heads are the fastest grid
axis, so the H programs of one token block run together and read the latent tile from L2.

The fused latent attention (strategy "absorb") takes per-range temporal offsets of the RoPE key
k_r (issue #12, positions as metadata) as per-token float32 rotations and applies them to each
k_r tile as it is loaded (``_rotate_k_r``); the latents carry no position and are read as they
are. Strategy "decompress" needs no kernel change: it forms K anyway, from a copy of k_r_pool
moved by rope3d_shift_ (vidstream/ops/lowrank.py)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vidstream.ops.rope_math import cos_sin, rope_bands, temporal_angles

from ._ieee import finalize, running_max


@triton.jit
def _decompress_kernel(c_ptr, kr_ptr, wuk_ptr, wuv_ptr, idx_ptr, k_ptr, v_ptr,
                       N, H, D_C, D_NOPE, D_R, D_V,
                       scb, scl, scc, srb, srl, srd,
                       sukh, sukc, sukd, suvh, suvc, suvd,
                       HAS_R: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr,
                       BLOCK_DV: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    n = (pid // H) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1)
    n_ok = n < N
    tok = tl.load(idx_ptr + n, mask=n_ok, other=0).to(tl.int64)
    dn = tl.arange(0, BLOCK_DN)
    dv = tl.arange(0, BLOCK_DV)
    acc_k = tl.zeros([BLOCK_N, BLOCK_DN], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    c_row = c_ptr + b * scb + tok * scl
    for k0 in range(0, D_C, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D_C
        c = tl.load(c_row[:, None] + kk[None, :] * scc, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(wuk_ptr + h * sukh + kk[:, None] * sukc + dn[None, :] * sukd,
                     mask=k_ok[:, None] & (dn < D_NOPE)[None, :], other=0.0)
        wv = tl.load(wuv_ptr + h * suvh + kk[:, None] * suvc + dv[None, :] * suvd,
                     mask=k_ok[:, None] & (dv < D_V)[None, :], other=0.0)
        acc_k = tl.dot(c, wk, acc_k, input_precision=PREC)
        acc_v = tl.dot(c, wv, acc_v, input_precision=PREC)
    DK = D_NOPE + D_R
    out_row = (b * N + n).to(tl.int64) * H + h
    k_row = k_ptr + out_row * DK
    tl.store(k_row[:, None] + dn[None, :], acc_k.to(k_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (dn < D_NOPE)[None, :])
    if HAS_R:
        dr = tl.arange(0, BLOCK_DR)
        r_ok = n_ok[:, None] & (dr < D_R)[None, :]
        r = tl.load(kr_ptr + b * srb + tok[:, None] * srl + dr[None, :] * srd, mask=r_ok, other=0.0)
        tl.store(k_row[:, None] + D_NOPE + dr[None, :], r, mask=r_ok)
    tl.store(v_ptr + out_row[:, None] * D_V + dv[None, :], acc_v.to(v_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (dv < D_V)[None, :])


def _block(n: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(max(n, 1)))


@triton_op("vidstream::lowrank_decompress_triton", mutates_args=())
def lowrank_decompress_triton(c_pool: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                              token_idx: torch.Tensor,
                              k_r_pool: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, d_c = c_pool.shape
    H, _, d_nope = w_uk.shape
    d_v = w_uv.shape[2]
    d_r = 0 if k_r_pool is None else k_r_pool.shape[2]
    N = token_idx.shape[0]
    k = torch.empty((B, N, H, d_nope + d_r), dtype=c_pool.dtype, device=c_pool.device)
    v = torch.empty((B, N, H, d_v), dtype=c_pool.dtype, device=c_pool.device)
    if B * N * H == 0:
        return k, v
    kr = k_r_pool if k_r_pool is not None else c_pool
    block_n = 32  # two float32 accumulators of BLOCK_N x 128 fit 4 warps' registers
    grid = (triton.cdiv(N, block_n) * H, B)
    wrap_triton(_decompress_kernel)[grid](
        c_pool, kr, w_uk, w_uv, token_idx, k, v,
        N, H, d_c, d_nope, d_r, d_v,
        c_pool.stride(0), c_pool.stride(1), c_pool.stride(2),
        kr.stride(0), kr.stride(1), kr.stride(2),
        w_uk.stride(0), w_uk.stride(1), w_uk.stride(2),
        w_uv.stride(0), w_uv.stride(1), w_uv.stride(2),
        HAS_R=k_r_pool is not None and d_r > 0,
        PREC="ieee" if c_pool.dtype == torch.float32 else "tf32",
        BLOCK_N=block_n, BLOCK_K=32, BLOCK_DN=_block(d_nope), BLOCK_DR=_block(d_r),
        BLOCK_DV=_block(d_v))
    return k, v


@lowrank_decompress_triton.register_fake
def _(c_pool, w_uk, w_uv, token_idx, k_r_pool):
    B, H, N = c_pool.shape[0], w_uk.shape[0], token_idx.shape[0]
    d_r = 0 if k_r_pool is None else k_r_pool.shape[2]
    k = torch.empty((B, N, H, w_uk.shape[2] + d_r), dtype=c_pool.dtype, device=c_pool.device)
    return k, torch.empty((B, N, H, w_uv.shape[2]), dtype=c_pool.dtype, device=c_pool.device)


@triton.jit
def _rotate_k_r(r, row_ptr, srd, n, n_ok, rr, tab_ptr, C_T: tl.constexpr):
    """The k_r tile r [BLOCK_N, BLOCK_R] (rows ``row_ptr`` [BLOCK_N, 1] in the pool) with each
    token's temporal band (channels < 2 C_T of d_r; no per-head theta: k_r is shared by all
    heads) rotated by its range's offset, rounded once to r's dtype as rope3d_shift_ rounds
    the pool. Pair (2p, 2p+1) -> (a cos - b sin, a sin + b cos): channel d takes
    r[d] * cos + r[d ^ 1] * sin, sin negated on even d, the partner from a second load at d ^ 1
    (same cache lines; the tile keeps the layout the dot wants).

    The table is per gathered token, float32 (cos, sin) [N, C_T, 2] indexed like token_idx:
    its row is the tile's own index n, so it needs no token -> range map (an extra gather) and
    ranges in any order cost nothing; it is 8 C_T bytes a token, under a tenth of what the
    latents themselves take (d_c + d_r values a token)."""
    band = rr < 2 * C_T
    m = n_ok[:, None] & band[None, :]
    partner = tl.load(row_ptr + (rr ^ 1)[None, :] * srd, mask=m, other=0.0)
    tab = tab_ptr + n[:, None].to(tl.int64) * (2 * C_T) + (rr // 2)[None, :] * 2
    cos = tl.load(tab, mask=m, other=1.0)
    sin = tl.load(tab + 1, mask=m, other=0.0)
    sin = tl.where((rr % 2 == 0)[None, :], -sin, sin)
    rot = r.to(tl.float32) * cos + partner.to(tl.float32) * sin
    return tl.where(band[None, :], rot.to(r.dtype), r)


@triton.jit
def _latent_attention_kernel(qc_ptr, qlo_ptr, qr_ptr, c_ptr, kr_ptr, idx_ptr, o_ptr, lse_ptr,
                             R, N, D_C, D_R, scale_log2,
                             sqb, sqm, sqc, srqb, srqm, srqd,
                             scb, scl, scc, srb, srl, srd, tab_ptr,
                             HAS_R: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                             HAS_DELTAS: tl.constexpr, C_T: tl.constexpr):
    # One program: BLOCK_M query rows (a row is one (query, head) pair: every head attends the
    # same latent) of one batch entry, flash-style over the tokens of the ranges. Each latent
    # tile is loaded once and serves as the key (with k_r) and as the value.
    b = tl.program_id(1)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < R
    cc = tl.arange(0, BLOCK_C)
    c_ok = cc < D_C
    q_off = b * sqb + m[:, None] * sqm + cc[None, :] * sqc
    q_c = tl.load(qc_ptr + q_off, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
    if SPLIT:
        q_lo = tl.load(qlo_ptr + q_off, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < D_R
    if HAS_R:
        q_r = tl.load(qr_ptr + b * srqb + m[:, None] * srqm + rr[None, :] * srqd,
                      mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        tok = tl.load(idx_ptr + n, mask=n_ok, other=0).to(tl.int64)
        c = tl.load(c_ptr + b * scb + tok[:, None] * scl + cc[None, :] * scc,
                    mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        s = tl.dot(q_c, tl.trans(c), input_precision=PREC)
        if SPLIT:
            s = tl.dot(q_lo, tl.trans(c), s, input_precision=PREC)
        if HAS_R:
            r = tl.load(kr_ptr + b * srb + tok[:, None] * srl + rr[None, :] * srd,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            if HAS_DELTAS:
                r = _rotate_k_r(r, kr_ptr + b * srb + tok[:, None] * srl, srd, n, n_ok, rr,
                                tab_ptr, C_T)
            s = tl.dot(q_r, tl.trans(r), s, input_precision=PREC)
        s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
        # NaN-propagating max, and exponentials relative to 0 while a row has seen only -inf
        # logits, so -inf - -inf never makes a NaN (docs/spec.md, "NaN and Inf").
        m_new, m_use = running_max(m_i, s)
        alpha = tl.exp2(m_i - m_use)  # 0 on the first tile
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PREC)
        m_i = m_new
    o, lse = finalize(acc, m_i, l_i, N > 0, True)
    tl.store(o_ptr + (b * R + m[:, None]).to(tl.int64) * D_C + cc[None, :], o,
             mask=m_ok[:, None] & c_ok[None, :])
    tl.store(lse_ptr + b * R + m, lse, mask=m_ok)


@triton_op("vidstream::lowrank_latent_attention_triton", mutates_args=())
def lowrank_latent_attention_triton(q_lat: torch.Tensor, q_lat_lo: Optional[torch.Tensor],
                                    q_r: Optional[torch.Tensor],
                                    c_pool: torch.Tensor, k_r_pool: Optional[torch.Tensor],
                                    token_idx: torch.Tensor,
                                    scale: float, token_deltas: Optional[torch.Tensor] = None,
                                    theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the latent queries q_lat [B, R, d_c] (and q_r [B, R, d_r]) over the tokens
    token_idx [N >= 1] of the latent pool: keys concat(c, k_r), values c. Returns the float32
    latent output [B, R, d_c] and the float32 natural-log lse [B, R].

    q_lat_lo (16-bit inputs): the rounding residual of q_lat, attended too. q_lat is a product
    formed here, not an input, and rounding it once to 16 bits shifts every score of a query
    the same way, which the log-sum-exp does not average out (measured: up to 2.5x the error of
    eager PyTorch); hi + lo restores float32 accuracy for one more d_c-wide product per tile."""
    B, R, d_c = q_lat.shape
    d_r = 0 if k_r_pool is None else k_r_pool.shape[2]
    o = torch.empty((B, R, d_c), dtype=torch.float32, device=q_lat.device)
    lse = torch.empty((B, R), dtype=torch.float32, device=q_lat.device)
    if B * R == 0:
        return o, lse
    has_r = d_r > 0 and q_r is not None and k_r_pool is not None
    qr = q_r if has_r else q_lat
    kr = k_r_pool if has_r else c_pool
    block_c = _block(d_c)
    block_m = 64 if block_c <= 256 else 32  # the float32 accumulator is BLOCK_M x BLOCK_C
    grid = (triton.cdiv(R, block_m), B)
    split = q_lat_lo is not None
    # Offsets (positions as metadata, docs/spec.md §4): token_deltas float64 [N] host values in
    # token_idx order move k_r as the kernel loads it; k_r_pool itself is not written.
    c_t = rope_bands(d_r)[0] if has_r else 0
    has_deltas = token_deltas is not None and c_t > 0
    tab = o  # any pointer when unused
    if has_deltas:
        tab = cos_sin(temporal_angles(token_deltas.to(q_lat.device, torch.float64), c_t, theta,
                                      None))  # [N, 1, C_T, 2]
    wrap_triton(_latent_attention_kernel)[grid](
        q_lat, q_lat_lo if split else q_lat, qr, c_pool, kr, token_idx, o, lse,
        R, token_idx.shape[0], d_c, d_r, scale * 1.4426950408889634,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
        c_pool.stride(0), c_pool.stride(1), c_pool.stride(2), kr.stride(0), kr.stride(1), kr.stride(2),
        tab, HAS_R=has_r, SPLIT=split, PREC="ieee" if c_pool.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_C=block_c, BLOCK_R=_block(d_r), num_warps=8,
        HAS_DELTAS=has_deltas, C_T=c_t if has_deltas else 0)
    return o, lse


@lowrank_latent_attention_triton.register_fake
def _(q_lat, q_lat_lo, q_r, c_pool, k_r_pool, token_idx, scale, token_deltas=None,
      theta=10000.0):
    B, R, d_c = q_lat.shape
    return (torch.empty((B, R, d_c), dtype=torch.float32, device=q_lat.device),
            torch.empty((B, R), dtype=torch.float32, device=q_lat.device))
