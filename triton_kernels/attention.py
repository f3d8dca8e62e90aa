"""Triton kernels of chunk_attention (docs/spec.md §1) and cached_attention (docs/spec.md §2): a
FlashAttention-2-style forward, registered with ``torch.library.triton_op`` as
``vidstream::chunk_attention_triton`` and ``vidstream::cached_attention_triton``.

One program owns BLOCK_M queries of one (batch, head) and walks key ranges block by block with
an online softmax in float32 (exp2; 16-bit inputs fold log2 e into the score scale, float32
inputs keep scores in natural units and scale only the differences from the running max, so a
power-of-two softmax scale rounds nothing and float32 error stays that of eager PyTorch).
The chunk-causal mask is arithmetic on frame and chunk indices: for a query block spanning
chunks c_lo..c_hi the keys are at most two ranges (sink, window), blocks outside them are never
visited, blocks every row may see take the unmasked path, and only the boundary blocks evaluate
the mask. The cached form walks the given ranges; only each range's tail block is masked.

Per-range temporal offsets (``kv_deltas``, issue #12 "positions as metadata", docs/spec.md §2):
the cache keeps its keys rotated at the positions they were written at, and the kernel reads
range r as if rope3d_shift_ had moved it by kv_deltas[r] frames, without writing the pool. The
wrapper turns the float64 offsets into a float32 (cos, sin) table [R, H_kv or 1, c_t, 2] (the
angles formed in float64 and rounded once, exactly as rope3d_shift_ forms them), and each key
tile's temporal band is rotated in float32 as it is loaded, then rounded to the key dtype: the
same values the shifted pool would hold. The rotation sits behind the constexpr HAS_DELTAS, so
the kernel without offsets compiles to what it was (all-zero offsets never reach it: the Python
layer drops them, and the op is then the one without offsets, bit for bit).

NaN and Inf follow docs/spec.md (Conventions): keys past a range end are never loaded; masked
scores become -inf before the NaN-propagating running max; where one block's mask differs by
row (a query tile spanning chunks) and its values hold a NaN or Inf, P @ V is taken key by key
over each row's allowed keys, so 0 * NaN cannot reach a row that may not see the key.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vidstream.ops.rope_math import cos_sin, rope_bands, temporal_angles

from ._ieee import finalize, running_max

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


# (BLOCK_M, BLOCK_N, num_warps, num_stages). 16-bit inputs run tensor cores: 128 x 64-128 tiles,
# 8 warps for head dim 128, a 64-row option for short Lq.
_TILES_16BIT = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                (64, 128, 4, 2)]
# float32 runs IEEE FMA: twice the shared memory per tile, so at head dim 128 with the window
# only 32-key tiles fit sm_90's 227 KiB (tools/triton_aot_check.py measured 246-328 KB for the
# 16-bit set, whose float32 compiles also took 1-12 minutes each).
_TILES_FP32 = [(64, 32, 4, 2), (128, 32, 4, 3)]


def _configs(tiles, interpret_tile: int = 32):
    """Autotune configs of (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles; the backward
    (attention_backward.py) uses it too."""
    if _INTERPRET:  # every config would run under the interpreter: one small one
        return [triton.Config({"BLOCK_M": interpret_tile, "BLOCK_N": interpret_tile}, num_warps=4,
                              num_stages=1)]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in tiles]
    # VIDSTREAM_TRITON_AUTOTUNE=first: the first config alone, no autotuning (bench/gpu_check.sh,
    # where compiling and timing every config would not fit the device time). Read once, when
    # this module is imported.
    mode = os.environ.get("VIDSTREAM_TRITON_AUTOTUNE", "all")
    if mode not in ("all", "first"):
        raise ValueError(f"VIDSTREAM_TRITON_AUTOTUNE must be 'all' or 'first', got {mode!r}")
    return configs[:1] if mode == "first" else configs


@triton.jit
def _load_kv(k_ptr, v_ptr, sk_l, sv_l, offs_n, key_end, D: tl.constexpr, DV: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr):
    """The key and value rows offs_n (channels padded to BLOCK_D / BLOCK_DV with zeros); with
    MASKED, rows from key_end on are zeros and never read, so a NaN there cannot enter. The
    forward and the backward (attention_backward.py) load their tiles with it."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    if MASKED:
        in_range = offs_n < key_end
        k = tl.load(k_ptr + offs_n[:, None] * sk_l + offs_d[None, :],
                    mask=in_range[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * sv_l + offs_e[None, :],
                    mask=in_range[:, None] & (offs_e < DV)[None, :], other=0.0)
    else:
        k = tl.load(k_ptr + offs_n[:, None] * sk_l + offs_d[None, :],
                    mask=(offs_d < D)[None, :], other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * sv_l + offs_e[None, :],
                    mask=(offs_e < DV)[None, :], other=0.0)
    return k, v


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, sk_l, sv_l, n0, range_end, offs_m, qk_scale,
                  ft, cf, sink, window,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  MASKED: tl.constexpr, CHUNK_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  IEEE: tl.constexpr, k_cos=1.0, k_sin=0.0, HAS_DELTAS: tl.constexpr = False,
                  C_T: tl.constexpr = 0):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, v = _load_kv(k_ptr, v_ptr, sk_l, sv_l, offs_n, range_end, D, DV, BLOCK_D, BLOCK_DV, MASKED)
    if HAS_DELTAS:
        k = _rotate_band(k, k_ptr, offs_n, offs_d, sk_l, range_end, k_cos, k_sin, MASKED, C_T)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:
        ok = (offs_n < range_end)[None, :]
        if CHUNK_MASK:
            frame_i = offs_m // ft
            chunk_i = frame_i // cf
            frame_j = offs_n // ft
            ok = ok & ((frame_j // cf)[None, :] <= chunk_i[:, None])
            if HAS_WINDOW:
                end_i = (chunk_i + 1) * cf
                ok = ok & ((frame_j[None, :] < sink) | (frame_j[None, :] >= (end_i - window)[:, None]))
        s = tl.where(ok, s, float("-inf"))  # a masked key's NaN/Inf score is dropped here
    # NaN-propagating running max; m_use keeps exp2 away from -inf - -inf in a row that has
    # seen only -inf so far (masked keys, -inf logits), which would turn it into NaN.
    m_new, m_use = running_max(m_i, s)
    if IEEE:
        p = tl.math.exp2((s - m_use[:, None]) * 1.4426950408889634)
        alpha = tl.math.exp2((m_i - m_use) * 1.4426950408889634)
    else:
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED and CHUNK_MASK:
        # Rows of different chunks may see different keys of this block, and p = 0 does not stop
        # 0 * NaN (or 0 * Inf) in the product, so a NaN/Inf value would reach rows not allowed to
        # see it. Only then (rarely) is the product taken key by key, each row over its allowed
        # keys; v is not modified, so the product still reads it from its pipelined buffer.
        acc = acc * alpha[:, None]
        if tl.sum((~(tl.abs(v.to(tl.float32)) < float("inf"))).to(tl.int32)) > 0:
            acc += _allowed_dot(p, ok, v_ptr, sv_l, n0, range_end, BLOCK_N, DV, BLOCK_DV)
        elif IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    elif IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _rotate_band(k, k_ptr, offs_n, offs_d, sk_l, range_end, k_cos, k_sin, MASKED: tl.constexpr,
                 C_T: tl.constexpr):
    """The key tile k [BLOCK_N, BLOCK_D] with its temporal band (channels < 2 C_T) rotated by
    one range's offset, rounded once to k's dtype as rope3d_shift_ rounds the pool.

    Pair (2p, 2p+1) turns into (a cos - b sin, a sin + b cos): channel d takes
    k[d] * cos + k[d ^ 1] * sin_signed, with ``k_cos``/``k_sin`` [BLOCK_D] the range's table row
    spread over channels (sin negated on even channels). The partner comes from a second load at
    d ^ 1 rather than from a reshape/split/join of k: the tile keeps the register layout the
    dot operand wants (no shuffle through shared memory), the partner's bytes are in the lines
    the first load just brought (L1 hits), and only the band (a third of D) is loaded twice.
    The products are float32 whatever k's dtype, in the order rope3d_shift_ forms them, so
    without FMA contraction (the interpreter) the rotated key equals the shifted pool's bit for
    bit. Channels outside the band are taken as loaded (a where, not a multiply by 1 and 0,
    which would turn an Inf partner into NaN)."""
    band = offs_d < 2 * C_T
    if MASKED:
        pmask = (offs_n < range_end)[:, None] & band[None, :]
    else:
        pmask = band[None, :]
    kp = tl.load(k_ptr + offs_n[:, None] * sk_l + (offs_d ^ 1)[None, :], mask=pmask, other=0.0)
    rot = k.to(tl.float32) * k_cos[None, :] + kp.to(tl.float32) * k_sin[None, :]
    return tl.where(band[None, :], rot.to(k.dtype), k)


@triton.jit
def _range_rotation(tab_ptr, BLOCK_D: tl.constexpr, C_T: tl.constexpr):
    """(cos, signed sin) [BLOCK_D] of one range and kv head from its float32 table row
    [C_T, 2]: channel d reads pair d // 2, its sin negated on even d; 1 and 0 past the band."""
    offs_d = tl.arange(0, BLOCK_D)
    band = offs_d < 2 * C_T
    row = tab_ptr + (offs_d // 2) * 2
    cos = tl.load(row, mask=band, other=1.0)
    sin = tl.load(row + 1, mask=band, other=0.0)
    return cos, tl.where(offs_d % 2 == 0, -sin, sin)


@triton.jit
def _allowed_dot(w, ok, x_ptr, sx, i0, n_rows, BLOCK_K: tl.constexpr, E: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """sum over kk of w[:, kk] * x[i0 + kk, :] taken only where ok[:, kk] (w [R, BLOCK_K] float32,
    x rows of E channels at x_ptr + row * sx, rows from n_rows on read as 0): w @ x, each output
    row over the rows of x it may read only, IEEE there (NaN and Inf propagate, 0 * Inf is NaN),
    nothing from the others, which a dot would let in as 0 * NaN. P @ V in the forward; dS @ K,
    dS^T @ Q, P^T @ dO in the backward; used only on tiles whose mask differs by row."""
    offs_e = tl.arange(0, BLOCK_E)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([w.shape[0], BLOCK_E], dtype=tl.float32)
    for kk in range(0, BLOCK_K):
        row = i0 + kk + 0 * offs_e
        x_row = tl.load(x_ptr + row * sx + offs_e, mask=(offs_e < E) & (row < n_rows),
                        other=0.0).to(tl.float32)
        pick = (cols == kk)[None, :]
        w_k = tl.sum(tl.where(pick, w, 0.0), 1)
        ok_k = tl.sum((pick & ok).to(tl.int32), 1) > 0
        acc += tl.where(ok_k[:, None], w_k[:, None] * x_row[None, :], 0.0)
    return acc


@triton.jit
def _attend_range(acc, m_i, l_i, q, k_ptr, v_ptr, sk_l, sv_l, rs, re, fs, fe, offs_m, qk_scale,
                  ft, cf, sink, window,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  CHUNK_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                  k_cos=1.0, k_sin=0.0, HAS_DELTAS: tl.constexpr = False, C_T: tl.constexpr = 0):
    # Blocks start at rs + t * BLOCK_N. Those wholly inside [fs, fe) (keys every row may see)
    # skip the mask; the ones before and after it evaluate it.
    n_blocks = tl.cdiv(tl.maximum(re - rs, 0), BLOCK_N)
    t_lo = tl.minimum(tl.cdiv(tl.maximum(fs - rs, 0), BLOCK_N), n_blocks)
    t_hi = tl.minimum(tl.maximum(tl.maximum(fe - rs, 0) // BLOCK_N, t_lo), n_blocks)
    for t in range(0, t_lo):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, sk_l, sv_l, rs + t * BLOCK_N, re,
                                      offs_m, qk_scale, ft, cf, sink, window, BLOCK_N, D, DV,
                                      BLOCK_D, BLOCK_DV,
                                      True, CHUNK_MASK, HAS_WINDOW, IEEE, k_cos, k_sin,
                                      HAS_DELTAS, C_T)
    for t in range(t_lo, t_hi):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, sk_l, sv_l, rs + t * BLOCK_N, re,
                                      offs_m, qk_scale, ft, cf, sink, window, BLOCK_N, D, DV,
                                      BLOCK_D, BLOCK_DV,
                                      False, CHUNK_MASK, HAS_WINDOW, IEEE, k_cos, k_sin,
                                      HAS_DELTAS, C_T)
    for t in range(t_hi, n_blocks):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, sk_l, sv_l, rs + t * BLOCK_N, re,
                                      offs_m, qk_scale, ft, cf, sink, window, BLOCK_N, D, DV,
                                      BLOCK_D, BLOCK_DV,
                                      True, CHUNK_MASK, HAS_WINDOW, IEEE, k_cos, k_sin,
                                      HAS_DELTAS, C_T)
    return acc, m_i, l_i


@triton.jit
def _load_q(q_ptr, offs_m, sq_l, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(q_ptr + offs_m[:, None] * sq_l + offs_d[None, :],
                   mask=(offs_m < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _store(o_ptr, lse_ptr, acc, m_i, l_i, nonempty, offs_m, so_l, n_rows, DV: tl.constexpr,
           BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    offs_e = tl.arange(0, BLOCK_DV)
    out, lse = finalize(acc, m_i, l_i, nonempty, not IEEE)  # IEEE: m_i in natural units
    tl.store(o_ptr + offs_m[:, None] * so_l + offs_e[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m < n_rows)[:, None] & (offs_e < DV)[None, :])
    tl.store(lse_ptr + offs_m, lse, mask=offs_m < n_rows)


@triton.jit
def _chunk_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                            L, heads, group, qk_scale, ft, cf, sink, window,
                            sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                            so_b, so_l, so_h,
                            D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = bh % heads
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_q(q_ptr + b * sq_b + h * sq_h, offs_m, sq_l, L, D, BLOCK_D)
    kp = k_ptr + b * sk_b + hk * sk_h
    vp = v_ptr + b * sv_b + hk * sv_h
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # The rows of this block lie in chunks c_lo..c_hi; end = first frame after a chunk.
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
            acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, kp, vp, sk_l, sv_l, 0, keys_end, fs,
                                          all_end, offs_m, qk_scale, ft, cf, sink, window, BLOCK_N, D, DV,
                                          BLOCK_D, BLOCK_DV, True, True, IEEE)
        else:
            acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, kp, vp, sk_l, sv_l, 0, sink_end, 0,
                                          tl.minimum(tl.minimum(sink, end_lo) * ft, L), offs_m, qk_scale,
                                          ft, cf, sink, window, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, True,
                                          True, IEEE)
            acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, kp, vp, sk_l, sv_l, win_lo, keys_end,
                                          win_all, all_end, offs_m, qk_scale, ft, cf, sink, window,
                                          BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, True, True, IEEE)
    else:
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, kp, vp, sk_l, sv_l, 0, keys_end, 0, all_end,
                                      offs_m, qk_scale, ft, cf, sink, window, BLOCK_N, D, DV, BLOCK_D,
                                      BLOCK_DV, True, False, IEEE)
    # Every query sees at least its own chunk (docs/spec.md §1).
    _store(o_ptr + b * so_b + h * so_h, lse_ptr + bh * L, acc, m_i, l_i, True, offs_m, so_l, L,
           DV, BLOCK_DV, IEEE)


@triton.jit
def _cached_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, ranges_ptr, num_ranges,
                             Lq, heads, group, qk_scale,
                             sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                             so_b, so_l, so_h, tab_ptr, tab_sr, tab_sh,
                             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DV: tl.constexpr, IEEE: tl.constexpr,
                             HAS_DELTAS: tl.constexpr, C_T: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = bh % heads
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_q(q_ptr + b * sq_b + h * sq_h, offs_m, sq_l, Lq, D, BLOCK_D)
    kp = k_ptr + b * sk_b + hk * sk_h
    vp = v_ptr + b * sv_b + hk * sv_h
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_keys = 0
    for r in range(0, num_ranges):
        rs = tl.load(ranges_ptr + 2 * r)
        re = tl.load(ranges_ptr + 2 * r + 1)
        n_keys += re - rs
        if HAS_DELTAS:
            # Positions as metadata (docs/spec.md §2): the range's keys are read as if
            # rope3d_shift_-ed by its offset; one table row per (range, kv head), loaded once
            # per range, and the rotation happens on each key tile as it is loaded. The keys are
            # rotated, not the query tile by -delta (the cheaper rotation for long ranges): in
            # 16 bits the rotated query would be rounded once for every key of the range, an
            # error all its scores share, which the log-sum-exp does not average out (the
            # "absorb" lesson of triton_kernels/lowrank.py), while rounding each rotated key is
            # exactly what the shifted pool of the definition does.
            k_cos, k_sin = _range_rotation(tab_ptr + r * tab_sr + hk * tab_sh, BLOCK_D, C_T)
        else:
            k_cos = 1.0
            k_sin = 0.0
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, kp, vp, sk_l, sv_l, rs, re, rs, re, offs_m,
                                      qk_scale, 1, 1, 0, 0, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, False, False,
                                      IEEE, k_cos, k_sin, HAS_DELTAS, C_T)
    _store(o_ptr + b * so_b + h * so_h, lse_ptr + bh * Lq, acc, m_i, l_i, n_keys > 0, offs_m, so_l,
           Lq, DV, BLOCK_DV, IEEE)


# One autotuner per precision (keyed by whether the inputs are float32): each tries only the
# tiles that fit its precision.
def _tuned(kernel, key: list) -> dict:
    return {ieee: triton.autotune(configs=_configs(_TILES_FP32 if ieee else _TILES_16BIT),
                                  key=key)(kernel) for ieee in (False, True)}


_TUNED_CHUNK = _tuned(_chunk_attention_kernel, ["D", "DV", "HAS_WINDOW"])
_TUNED_CACHED = _tuned(_cached_attention_kernel, ["D", "DV", "HAS_DELTAS"])


def _inner(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(3) == 1 else t.contiguous()


def _outputs(q, v):
    B, L, H, _ = q.shape
    out = torch.empty(B, L, H, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    return out, lse


def _common_args(q, k, v, out):
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))


def _score_scale(q, scale):
    return scale if q.dtype == torch.float32 else scale * _LOG2E


def _dims(q, v):
    D, DV = q.shape[3], v.shape[3]
    return dict(D=D, DV=DV, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(DV)), IEEE=q.dtype == torch.float32)


@triton_op("vidstream::chunk_attention_triton", mutates_args=())
def chunk_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_tokens: int,
                           chunk_frames: int, sink_frames: int, window_frames: Optional[int],
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _inner(q), _inner(k), _inner(v)
    out, lse = _outputs(q, v)
    B, L, H, _ = q.shape
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    wrap_triton(_TUNED_CHUNK[q.dtype == torch.float32])[grid](
        q, k, v, out, lse, L, H, H // k.shape[2], _score_scale(q, scale), frame_tokens, chunk_frames,
        sink_frames, 0 if window_frames is None else window_frames, *_common_args(q, k, v, out),
        HAS_WINDOW=window_frames is not None, **_dims(q, v))
    return out, lse


@chunk_attention_triton.register_fake
def _(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale):
    return _outputs(q, v)


def _delta_table(kv_deltas, t_theta, theta, D, device):
    """(table, row stride per range, row stride per kv head, C_T) of the per-range rotations:
    float32 (cos, sin) [R, Ht, C_T, 2] on the kernel's device, rounded once from float64
    angles (vidstream.ops.rope_math, as rope3d_shift_ builds them); Ht = H_kv with a per-head
    ``t_theta`` (head stride C_T * 2), else 1 (head stride 0: every kv head reads row 0)."""
    c_t = rope_bands(D)[0]
    tab = cos_sin(temporal_angles(kv_deltas.to(device, torch.float64), c_t, theta, t_theta))
    return tab, tab.shape[1] * c_t * 2, (c_t * 2 if tab.shape[1] > 1 else 0), c_t


@triton_op("vidstream::cached_attention_triton", mutates_args=())
def cached_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            kv_ranges: torch.Tensor, scale: float,
                            kv_deltas: Optional[torch.Tensor] = None, theta: float = 10000.0,
                            t_theta: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_ranges``: int32 [R, 2] on q's device, already checked (in bounds, disjoint);
    ``kv_deltas``: float64 [R] host values or None (checked finite; ``t_theta`` [H_kv])."""
    q, k, v = _inner(q), _inner(k_pool), _inner(v_pool)
    out, lse = _outputs(q, v)
    B, Lq, H, D = q.shape
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    tab, tab_sr, tab_sh, c_t = lse, 0, 0, 0  # any pointer when there are no offsets
    has_deltas = kv_deltas is not None and kv_ranges.shape[0] > 0 and rope_bands(D)[0] > 0
    if has_deltas:
        tab, tab_sr, tab_sh, c_t = _delta_table(kv_deltas, t_theta, theta, D, q.device)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    wrap_triton(_TUNED_CACHED[q.dtype == torch.float32])[grid](
        q, k, v, out, lse, kv_ranges, kv_ranges.shape[0], Lq, H, H // k.shape[2], _score_scale(q, scale),
        *_common_args(q, k, v, out), tab, tab_sr, tab_sh, HAS_DELTAS=has_deltas, C_T=c_t,
        **_dims(q, v))
    return out, lse


@cached_attention_triton.register_fake
def _(q, k_pool, v_pool, kv_ranges, scale, kv_deltas=None, theta=10000.0, t_theta=None):
    return _outputs(q, v_pool)
