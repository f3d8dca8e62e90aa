"""Triton kernels of rope3d and rope3d_shift_ (docs/spec.md §3), registered with
``torch.library.triton_op`` as ``vidstream::rope3d_triton`` and ``vidstream::rope3d_shift_triton_``.
Angles come from float64 tables (``vidstream.ops.rope_math``); the kernels rotate in float32."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vidstream.ops.rope_math import band_omega, cos_sin, rope_bands, temporal_angles


@triton.jit
def _rotate_rows(x, cos, sin, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rotates the adjacent pairs of contiguous rows x [BLOCK_T, 2*BLOCK_C] (loaded with wide,
    coalesced accesses) by cos, sin [BLOCK_T or 1, BLOCK_C]; float32 result of the same shape."""
    a, b = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_T, BLOCK_C, 2)))
    out = tl.join(a * cos - b * sin, a * sin + b * cos)
    return tl.reshape(out, (BLOCK_T, 2 * BLOCK_C))


@triton.jit
def rope3d_cos_sin(tab_t, tab_h, tab_w, f, y, xc, h, tok_ok,
                   C_T: tl.constexpr, C_H: tl.constexpr, C_W: tl.constexpr,
                   T_HEADS: tl.constexpr, BLOCK_C: tl.constexpr):
    """(cos, sin) [BLOCK_T, BLOCK_C] of every rotation pair of tokens at frame f, row y, column
    xc, head h: the temporal, height and width tables each serve their own band."""
    p = tl.arange(0, BLOCK_C)
    is_t = p < C_T
    is_h = (p >= C_T) & (p < C_T + C_H)
    is_w = (p >= C_T + C_H) & (p < C_T + C_H + C_W)
    th = h if T_HEADS > 1 else 0
    t_idx = ((f[:, None] * T_HEADS + th) * C_T + p[None, :]) * 2
    h_idx = (y[:, None] * C_H + (p[None, :] - C_T)) * 2
    w_idx = (xc[:, None] * C_W + (p[None, :] - C_T - C_H)) * 2
    m = tok_ok[:, None]
    cos = tl.load(tab_t + t_idx, mask=m & is_t[None, :], other=0.0)
    sin = tl.load(tab_t + t_idx + 1, mask=m & is_t[None, :], other=0.0)
    cos += tl.load(tab_h + h_idx, mask=m & is_h[None, :], other=0.0)
    sin += tl.load(tab_h + h_idx + 1, mask=m & is_h[None, :], other=0.0)
    cos += tl.load(tab_w + w_idx, mask=m & is_w[None, :], other=0.0)
    sin += tl.load(tab_w + w_idx + 1, mask=m & is_w[None, :], other=0.0)
    return cos, sin


@triton.jit
def _rope3d_kernel(x_ptr, o_ptr, tab_t, tab_h, tab_w,
                   n_tokens, L, hw, width,
                   sxb, sxl, sxh, sob, sol, soh,
                   C_T: tl.constexpr, C_H: tl.constexpr, C_W: tl.constexpr, T_HEADS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program: BLOCK_T tokens of one head, every rotation pair.
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    tok_ok = n < n_tokens
    b = n // L
    i = n % L
    f = i // hw
    y = (i % hw) // width
    xc = i % width
    cos, sin = rope3d_cos_sin(tab_t, tab_h, tab_w, f, y, xc, h, tok_ok, C_T, C_H, C_W, T_HEADS,
                              BLOCK_C)
    m = tok_ok[:, None]
    d = tl.arange(0, 2 * BLOCK_C)
    mask = m & (d[None, :] < 2 * (C_T + C_H + C_W))
    x = tl.load(x_ptr + (b * sxb + i * sxl + h * sxh)[:, None] + d[None, :], mask=mask, other=0.0)
    out = _rotate_rows(x, cos, sin, BLOCK_T, BLOCK_C)
    tl.store(o_ptr + (b * sob + i * sol + h * soh)[:, None] + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope3d_shift_kernel(pool_ptr, ranges_ptr, tab_ptr, heads, sb, sl, sh,
                         C_T: tl.constexpr, T_HEADS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program: BLOCK_T tokens of range r, one (batch, head); the temporal band only.
    r = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // heads
    h = bh % heads
    start = tl.load(ranges_ptr + 2 * r)
    end = tl.load(ranges_ptr + 2 * r + 1)
    tok = start + tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    p = tl.arange(0, BLOCK_C)
    th = h if T_HEADS > 1 else 0
    tab = tab_ptr + ((r * T_HEADS + th) * C_T + p) * 2
    cos = tl.load(tab, mask=p < C_T, other=1.0)[None, :]
    sin = tl.load(tab + 1, mask=p < C_T, other=0.0)[None, :]
    d = tl.arange(0, 2 * BLOCK_C)
    offs = (b * sb + tok * sl + h * sh)[:, None] + d[None, :]
    mask = (tok < end)[:, None] & (d[None, :] < 2 * C_T)
    x = tl.load(pool_ptr + offs, mask=mask, other=0.0)
    out = _rotate_rows(x, cos, sin, BLOCK_T, BLOCK_C)
    tl.store(pool_ptr + offs, out.to(pool_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(n))


@triton_op("vidstream::rope3d_triton", mutates_args=())
def rope3d_triton(x: torch.Tensor, frames: int, height: int, width: int, frame_offset: float,
                  theta: float, t_theta: Optional[torch.Tensor], inverse: bool = False) -> torch.Tensor:
    """``inverse``: rotate by the negated angles (the inverse rotation: rope3d's backward)."""
    B, L, H, D = x.shape
    if x.stride(3) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    c_t, c_h, c_w = rope_bands(D)
    dev = x.device
    pos_t = torch.arange(frames, dtype=torch.float64, device=dev) + frame_offset
    sign = -1.0 if inverse else 1.0  # negated float64 angles: the same cos, exactly -sin
    tab_t = cos_sin(sign * temporal_angles(pos_t, c_t, theta, t_theta))
    tab_h = cos_sin(sign * torch.arange(height, dtype=torch.float64, device=dev)[:, None]
                    * band_omega(c_h, theta, dev)[None])
    tab_w = cos_sin(sign * torch.arange(width, dtype=torch.float64, device=dev)[:, None]
                    * band_omega(c_w, theta, dev)[None])
    block_t = 16
    grid = (triton.cdiv(B * L, block_t), H)
    wrap_triton(_rope3d_kernel)[grid](
        x, out, tab_t, tab_h, tab_w, B * L, L, height * width, width,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        C_T=c_t, C_H=c_h, C_W=c_w, T_HEADS=tab_t.shape[1], BLOCK_T=block_t,
        BLOCK_C=_pow2(c_t + c_h + c_w))
    return out


@rope3d_triton.register_fake
def _(x, frames, height, width, frame_offset, theta, t_theta, inverse=False):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@triton_op("vidstream::rope3d_shift_triton_", mutates_args=("k_pool",))
def rope3d_shift_triton_(k_pool: torch.Tensor, ranges: torch.Tensor, delta_frames: torch.Tensor,
                         theta: float, t_theta: Optional[torch.Tensor], max_range_len: int) -> None:
    B, P, H, D = k_pool.shape
    R = ranges.shape[0]
    if k_pool.numel() == 0 or R == 0 or max_range_len == 0:
        return
    c_t = rope_bands(D)[0]
    tab = cos_sin(temporal_angles(delta_frames.to(k_pool.device, torch.float64), c_t, theta, t_theta))
    block_t = 16
    grid = (triton.cdiv(max_range_len, block_t), R, B * H)
    wrap_triton(_rope3d_shift_kernel)[grid](
        k_pool, ranges, tab, H, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        C_T=c_t, T_HEADS=tab.shape[1], BLOCK_T=block_t, BLOCK_C=_pow2(c_t))


@rope3d_shift_triton_.register_fake
def _(k_pool, ranges, delta_frames, theta, t_theta, max_range_len):
    return None
