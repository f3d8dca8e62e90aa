"""Triton kernel of rope3d_store_ (docs/spec.md §6), registered with ``torch.library.triton_op`` as
``vidstream::rope3d_store_triton_``: rotate a chunk's keys by the 3D RoPE at per-frame temporal
positions and write keys and values into their pool slots. Angles come from float64 tables
(``vidstream.ops.rope_math``); the kernel rotates in float32."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from vidstream.ops.rope_math import band_omega, cos_sin, rope_bands, temporal_angles

from .rope3d import rope3d_cos_sin


@triton.jit
def _rope3d_store_kernel(k_ptr, v_ptr, kp_ptr, vp_ptr, slots_ptr, tab_t, tab_h, tab_w,
                         n_tokens, L, hw, width, DV,
                         skb, skl, skh, svb, svl, svh, sKb, sKl, sKh, sVb, sVl, sVh,
                         C_T: tl.constexpr, C_H: tl.constexpr, C_W: tl.constexpr,
                         T_HEADS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_DV: tl.constexpr):
    # One program: BLOCK_T tokens of one head; every rotation pair of k and every channel of v.
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    tok_ok = n < n_tokens
    b = n // L
    i = n % L
    f = i // hw
    j = i % hw
    y = j // width
    xc = j % width
    dst = tl.load(slots_ptr + f, mask=tok_ok, other=0) + j
    cos, sin = rope3d_cos_sin(tab_t, tab_h, tab_w, f, y, xc, h, tok_ok, C_T, C_H, C_W, T_HEADS,
                              BLOCK_C)
    p = tl.arange(0, BLOCK_C)
    m = tok_ok[:, None]
    pair_ok = m & (p[None, :] < C_T + C_H + C_W)
    k_off = (b * skb + i * skl + h * skh)[:, None] + 2 * p[None, :]
    o_off = (b * sKb + dst * sKl + h * sKh)[:, None] + 2 * p[None, :]
    a = tl.load(k_ptr + k_off, mask=pair_ok, other=0.0).to(tl.float32)
    bb = tl.load(k_ptr + k_off + 1, mask=pair_ok, other=0.0).to(tl.float32)
    tl.store(kp_ptr + o_off, (a * cos - bb * sin).to(kp_ptr.dtype.element_ty), mask=pair_ok)
    tl.store(kp_ptr + o_off + 1, (a * sin + bb * cos).to(kp_ptr.dtype.element_ty), mask=pair_ok)
    d = tl.arange(0, BLOCK_DV)
    v_ok = m & (d[None, :] < DV)
    vals = tl.load(v_ptr + (b * svb + i * svl + h * svh)[:, None] + d[None, :], mask=v_ok)
    tl.store(vp_ptr + (b * sVb + dst * sVl + h * sVh)[:, None] + d[None, :], vals, mask=v_ok)


def _pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(n))


@triton_op("vidstream::rope3d_store_triton_", mutates_args=("k_pool", "v_pool"))
def rope3d_store_triton_(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, frame_slots: torch.Tensor, frame_pos: torch.Tensor,
                         height: int, width: int, theta: float,
                         t_theta: Optional[torch.Tensor]) -> None:
    B, L, H, D = k.shape
    if k.numel() == 0:
        return
    if k.stride(3) != 1:
        k = k.contiguous()
    if v.stride(3) != 1:
        v = v.contiguous()
    c_t, c_h, c_w = rope_bands(D)
    dev = k.device
    tab_t = cos_sin(temporal_angles(frame_pos.to(dev, torch.float64), c_t, theta, t_theta))
    tab_h = cos_sin(torch.arange(height, dtype=torch.float64, device=dev)[:, None]
                    * band_omega(c_h, theta, dev)[None])
    tab_w = cos_sin(torch.arange(width, dtype=torch.float64, device=dev)[:, None]
                    * band_omega(c_w, theta, dev)[None])
    block_t = 16
    grid = (triton.cdiv(B * L, block_t), H)
    wrap_triton(_rope3d_store_kernel)[grid](
        k, v, k_pool, v_pool, frame_slots.to(dev, torch.int32), tab_t, tab_h, tab_w,
        B * L, L, height * width, width, v.shape[3],
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        C_T=c_t, C_H=c_h, C_W=c_w, T_HEADS=tab_t.shape[1], BLOCK_T=block_t,
        BLOCK_C=_pow2(c_t + c_h + c_w), BLOCK_DV=_pow2(v.shape[3]))


@rope3d_store_triton_.register_fake
def _(k_pool, v_pool, k, v, frame_slots, frame_pos, height, width, theta, t_theta):
    return None
