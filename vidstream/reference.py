"""Eager PyTorch definitions of every SPEC op: the oracle all kernels are tested against.

They compute in the dtype of their inputs (float64 in, float64 out is the oracle; a float16 input
gives what eager PyTorch gives in float16), except RoPE, whose angles are always formed in
float64 and whose products are taken in float32 (float64 for float64 input), the way Wan2.1 does
it. They materialise scores and masks: small shapes only.

Each public function checks its inputs (``ValueError``) and calls an unchecked ``_impl`` that the
backend registry uses once the public op has checked them.
"""

from __future__ import annotations

import torch

from . import _validate
from ._rope_tables import band_omega, rope_bands, temporal_angles

__all__ = [
    "chunk_attention",
    "chunk_mask",
    "cached_attention",
    "rope3d",
    "rope3d_shift_",
    "rope_bands",
    "lowrank_decompress",
    "lowrank_cached_attention",
    "select_blocks",
    "rope3d_store_",
]


# ----------------------------------------------------------------------------- attention


def chunk_mask(L: int, frame_tokens: int, chunk_frames: int, sink_frames: int = 0,
               window_frames: int | None = None, device=None) -> torch.Tensor:
    """Boolean [L, L] mask, True where query i may attend key j (SPEC §1)."""
    idx = torch.arange(L, device=device)
    frame = idx // frame_tokens
    chunk = frame // chunk_frames
    end = (chunk + 1) * chunk_frames
    allowed = chunk[None, :] <= chunk[:, None]
    if window_frames is not None:
        in_window = frame[None, :] >= (end[:, None] - window_frames)
        allowed &= (frame[None, :] < sink_frames) | in_window
    return allowed


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[2], dim=2) if t.shape[2] != heads else t


def _masked_attention(q, k, v, mask, scale, return_lse):
    """q [B, Lq, H, D], k [B, Lk, H_kv, D], v [B, Lk, H_kv, Dv], mask bool [Lq, Lk] or None."""
    H = q.shape[2]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)  # [B, H, Lq]
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # a query with nothing to attend: all -inf row
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    if return_lse:
        return out, lse.float()
    return out


def _chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                     return_lse):
    mask = chunk_mask(q.shape[1], frame_tokens, chunk_frames, sink_frames, window_frames, q.device)
    return _masked_attention(q, k, v, mask, scale, return_lse)


def chunk_attention(q, k, v, *, frame_tokens, chunk_frames, sink_frames=0, window_frames=None,
                    scale=None, return_lse=False):
    """SPEC §1: full-sequence chunk-causal sink + window attention."""
    _validate.chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames)
    scale = _validate.scale_value(scale, q.shape[3])
    return _chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                            return_lse)


def _gather_tokens(pool: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """The tokens of ``pool`` [B, P, ...] in the union of ``ranges``, in range order."""
    idx = [torch.arange(int(s), int(e)) for s, e in ranges.tolist()]
    idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    return pool[:, idx.to(pool.device)]


def _cached_attention(q, k_pool, v_pool, kv_ranges, scale, return_lse):
    k = _gather_tokens(k_pool, kv_ranges)
    v = _gather_tokens(v_pool, kv_ranges)
    if k.shape[1] == 0:
        B, Lq, H, _ = q.shape
        out = q.new_zeros(B, Lq, H, v_pool.shape[3])
        lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    return _masked_attention(q, k, v, None, scale, return_lse)


def cached_attention(q, k_pool, v_pool, kv_ranges, *, scale=None, return_lse=False):
    """SPEC §2: every query attends every token in the union of ``kv_ranges`` of the pool."""
    host = _validate.cached_attention(q, k_pool, v_pool, kv_ranges)
    scale = _validate.scale_value(scale, q.shape[3])
    return _cached_attention(q, k_pool, v_pool, host, scale, return_lse)


# ----------------------------------------------------------------------------- 3D RoPE


def rope_angles(grid, head_dim, frame_offset=0.0, theta=10000.0, t_theta=None, device=None):
    """Float64 rotation angles [L, Ht, D/2] of every token (Ht = H with ``t_theta``, else 1)."""
    F, h, w = grid
    c_t, c_h, c_w = rope_bands(head_dim)
    i = torch.arange(F * h * w, device=device)
    t = (i // (h * w)).double() + float(frame_offset)
    y = ((i % (h * w)) // w).double()
    x = (i % w).double()
    ang_t = temporal_angles(t, c_t, theta, t_theta)
    ang_hw = torch.cat([y[:, None] * band_omega(c_h, theta, device)[None],
                        x[:, None] * band_omega(c_w, theta, device)[None]], dim=-1)
    ang_hw = ang_hw[:, None, :].expand(-1, ang_t.shape[1], -1)
    return torch.cat([ang_t, ang_hw], dim=-1)


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs of x [..., 2n] by angle (float64, broadcastable to [..., n])."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = x.to(cdt).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(angle).to(cdt), torch.sin(angle).to(cdt)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def _rope3d(x, grid, frame_offset, theta, t_theta):
    ang = rope_angles(grid, x.shape[3], frame_offset, theta, t_theta, x.device)  # [L, Ht, c]
    return _rotate(x, ang[None])


def rope3d(x, *, grid, frame_offset=0, theta=10000.0, t_theta=None):
    """SPEC §3: Wan2.1 3D RoPE of x [B, L, H, D] on a (F, h, w) token grid."""
    _validate.rope3d(x, grid, t_theta, theta, frame_offset)
    return _rope3d(x, tuple(grid), frame_offset, theta, t_theta)


def _rope3d_shift_(k_pool, ranges, delta_frames, theta, t_theta):
    c_t = rope_bands(k_pool.shape[3])[0]
    angles = temporal_angles(delta_frames.to(k_pool.device, torch.float64), c_t, theta, t_theta)
    for r, (s, e) in enumerate(ranges.tolist()):
        if s < e:
            band = k_pool[:, s:e, :, : 2 * c_t]
            band.copy_(_rotate(band, angles[r]))
    return k_pool


def rope3d_shift_(k_pool, ranges, delta_frames, *, theta=10000.0, t_theta=None):
    """SPEC §3: in place, re-rotate the temporal band of every token of range r by
    ``delta_frames[r]`` frames."""
    host, delta = _validate.rope3d_shift(k_pool, ranges, delta_frames, t_theta, theta)
    return _rope3d_shift_(k_pool, host, delta, theta, t_theta)


# ----------------------------------------------------------------------------- low-rank KV


def _lowrank_decompress(c_pool, w_uk, w_uv, kv_ranges, k_r_pool):
    c = _gather_tokens(c_pool, kv_ranges)  # [B, N, d_c]
    k = torch.einsum("bnc,hcd->bnhd", c, w_uk)
    v = torch.einsum("bnc,hcd->bnhd", c, w_uv)
    if k_r_pool is not None:
        k_r = _gather_tokens(k_r_pool, kv_ranges)
        k = torch.cat([k, k_r[:, :, None, :].expand(-1, -1, w_uk.shape[0], -1)], dim=-1)
    return k, v


def lowrank_decompress(c_pool, w_uk, w_uv, kv_ranges, k_r_pool=None):
    """SPEC §4: K [B, N, H, d_nope + d_r] and V [B, N, H, d_v] of the tokens in ``kv_ranges``."""
    host = _validate.lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    return _lowrank_decompress(c_pool, w_uk, w_uv, host, k_r_pool)


def _lowrank_cached_attention(q, c_pool, w_uk, w_uv, kv_ranges, k_r_pool, scale, return_lse):
    k, v = _lowrank_decompress(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    whole = torch.tensor([[0, k.shape[1]]], dtype=torch.int32)
    return _cached_attention(q, k, v, whole, scale, return_lse)


def lowrank_cached_attention(q, c_pool, w_uk, w_uv, kv_ranges, *, k_r_pool=None, scale=None,
                             return_lse=False):
    """SPEC §4: ``cached_attention`` over the decompressed latent cache."""
    host = _validate.lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    _validate.lowrank_query(q, c_pool, w_uk, w_uv, k_r_pool)
    scale = _validate.scale_value(scale, q.shape[3])
    return _lowrank_cached_attention(q, c_pool, w_uk, w_uv, host, k_r_pool, scale, return_lse)


# ----------------------------------------------------------------------------- top-k selection


def _block_scores(q, k_pool, blocks, query_stride, heads, score, scale, key_sums=None):
    """Scores s_m [M] in q's dtype. ``key_sums`` [B, M, H_kv, D] stands in for the keys of each
    block under ``score="mean"`` (s_m is linear in the block's key sum); ``"max"`` ignores it."""
    H, H_kv = q.shape[2], k_pool.shape[2]
    heads_t = torch.tensor(heads, device=q.device)
    kv_t = heads_t // (H // H_kv)
    qs = q[:, ::query_stride][:, :, heads_t]  # [B, S, Hs, D]
    ks = k_pool[:, :, kv_t]  # [B, P, Hs, D]
    scores = []
    for m, (s, e) in enumerate(blocks.tolist()):
        kb = ks[:, s:e]
        if score == "mean" and key_sums is not None:
            ksum = key_sums[:, m][:, kv_t].to(q.dtype)  # [B, Hs, D]
            scores.append((torch.einsum("bihd,bhd->bhi", qs, ksum) * scale).mean())
        elif score == "mean":
            dots = torch.einsum("bihd,bjhd->bhij", qs, kb) * scale
            scores.append(dots.sum(-1).mean())
        elif e == s:
            scores.append(torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
        else:
            qbar = qs.mean(1)  # [B, Hs, D]
            dots = torch.einsum("bhd,bjhd->bhj", qbar, kb) * scale
            scores.append(dots.amax(-1).mean())
    return torch.stack(scores) if scores else q.new_zeros(0)


def topk_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending, on the CPU) of the ``k`` largest ``scores``; equal scores go to
    the smaller index."""
    # A stable descending sort puts the smaller index first among equal scores.
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _select_blocks(q, k_pool, blocks, k, query_stride, heads, score, scale, key_sums=None):
    s = _block_scores(q, k_pool, blocks, query_stride, heads, score, scale, key_sums)
    return topk_ascending(s, k).to(q.device)


def select_blocks(q, k_pool, block_ranges, k, *, query_stride=8, heads=None, score="mean",
                  scale=None, block_key_sums=None):
    """SPEC §5: indices (ascending, int64) of the ``k`` mid blocks with the highest affinity.
    ``block_key_sums`` [M, H_kv, D] (batch 1) or [B, M, H_kv, D]: the sum of each block's keys,
    used instead of the keys by ``score="mean"``."""
    blocks, heads, sums = _validate.select_blocks(q, k_pool, block_ranges, k, query_stride, heads,
                                                  score, block_key_sums)
    scale = _validate.scale_value(scale, q.shape[3])
    return _select_blocks(q, k_pool, blocks, k, query_stride, heads, score, scale, sums)


# ----------------------------------------------------------------------------- streaming cache


def _rope3d_store_(k_pool, v_pool, k, v, frame_slots, frame_pos, grid, theta, t_theta):
    F, h, w = grid
    hw = h * w
    # Positions (frame_pos[f], row, column) via the rope3d angles at offset 0 plus a per-frame
    # temporal term, so integer positions give exactly rope3d's angles.
    ang = rope_angles((F, h, w), k.shape[3], 0.0, theta, t_theta, k.device)  # [L, Ht, c]
    c_t = rope_bands(k.shape[3])[0]
    pos = frame_pos.to(k.device, torch.float64).repeat_interleave(hw)
    t_ang = temporal_angles(pos, c_t, theta, t_theta)  # [L, Ht, c_t]
    ang = torch.cat([t_ang.expand(-1, ang.shape[1], -1), ang[:, :, c_t:]], dim=-1)
    k_rot = _rotate(k, ang[None])
    for f, s in enumerate(frame_slots.tolist()):
        k_pool[:, s:s + hw] = k_rot[:, f * hw:(f + 1) * hw]
        v_pool[:, s:s + hw] = v[:, f * hw:(f + 1) * hw]
    return k_pool, v_pool


def rope3d_store_(k_pool, v_pool, k, v, frame_slots, frame_pos, *, grid, theta=10000.0, t_theta=None):
    """SPEC §6: rotate ``k`` by the 3D RoPE with frame ``f`` at temporal position
    ``frame_pos[f]`` and write it and ``v`` into the pools at tokens ``frame_slots[f] + j``."""
    slots, pos = _validate.rope3d_store(k_pool, v_pool, k, v, frame_slots, frame_pos, grid, t_theta,
                                     theta)
    return _rope3d_store_(k_pool, v_pool, k, v, slots, pos, tuple(grid), theta, t_theta)
