"""The bounded three-partition KV cache of a streaming video DiT (docs/spec.md §6).

Per layer one pool, allocated once::

    [ sink: sink_frames frames | mid: mid_blocks x mid_tokens | ring: recent_frames + chunk_frames ]

The sink keeps the first frames at full resolution. The ring holds the last ``recent_frames``
frames plus the slot the current chunk writes (its denoising steps overwrite the slot, the t = 0
pass leaves the clean keys there), so the current chunk lands where it will stay: committing a
chunk moves nothing. When a chunk leaves the ring the compressor turns it into one mid block;
when mid is full the oldest (or lowest-scoring) block is dropped. The kernels see the cache as
token ranges into the pool (``cached_attention``), so a wrapped ring is two ranges and the
active mid blocks are one range each.

Keys are stored rotated. Temporal positions are kept contiguous and bounded: sink ``[0, S)``,
then the active mid blocks (``chunk_frames`` positions each, in time order), then the recent
chunks, then the current chunk. What moves between chunks is re-rotated in place with
``rope3d_shift_``; the largest position is ``S + top_k*C + recent_frames + C - 1`` whatever the
video length.

The index metadata the ops read (frame slots, per-layer token ranges) is built once per chunk as
trusted ``FrameSlots`` / ``TokenRanges`` on the pool's device: ``begin_chunk`` and each layer's
first pass do all host work (block selection, re-rotation, layout), and every later denoising
pass only launches kernels, with no host copy of range metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..ops.attention import cached_attention
from ..ops.metadata import FrameSlots, TokenRanges
from ..ops.rope3d import rope3d, rope3d_shift_, rope3d_store_
from ..ops.select_blocks import select_blocks
from .compressors import (
    Compressor,
    call_compressor,
    checked_compressor,
    compressed_tokens,
    compressor_keywords,
)
from .config import CacheConfig, check_layer


@dataclass
class ChunkState:
    """The chunk being generated, from ``begin_chunk`` to ``end_chunk``."""

    frames: int
    sink: bool                      # lands in the sink (else in ring slot ``slot``)
    qpos: float                     # temporal position of its first frame
    frame_slots: FrameSlots         # where rope3d_store_ writes each frame, at which position
    slot: Optional[int] = None      # ring slot (None for a sink chunk)
    n_active: int = 0               # mid blocks this chunk attends
    ranges: list = field(default_factory=list)  # per layer: TokenRanges, None until its first pass

    def prepared(self, layer: int) -> bool:
        return self.ranges[layer] is not None


def _runs(slots: list[int], sizes: list[int], base: int, stride: int) -> list[list[int]]:
    """Token ranges of ring slots (in order) merged where they touch: a wrapped ring gives two."""
    out: list[list[int]] = []
    for s, n in zip(slots, sizes):
        a, b = base + s * stride, base + s * stride + n
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return out


class StreamingKVCache:
    """Sink + mid + recent ring + current-chunk slot per layer, in one pool allocated at
    construction (``nbytes`` never changes). Use: ``begin_chunk(F)``, then any number of forward
    passes that call ``attend`` once per layer (the first at each chunk selects the mid blocks and
    re-rotates what moved), then ``end_chunk()`` after the pass whose keys must stay (t = 0)."""

    def __init__(self, *, num_layers: int, batch: int, kv_heads: int, head_dim: int, frame_shape,
                 config: CacheConfig, compressor: Compressor | None = None,
                 v_head_dim: int | None = None, dtype=torch.float32, device="cpu",
                 t_theta: torch.Tensor | None = None):
        self.cfg = config
        self.num_layers, self.batch = num_layers, batch
        self.h, self.w = (int(s) for s in frame_shape)
        self.hw = self.h * self.w
        self.compressor = checked_compressor(compressor, config, (self.h, self.w))
        self._keywords = compressor_keywords(self.compressor)
        C, hw = config.chunk_frames, self.hw
        self.mid_tokens = (compressed_tokens(self.compressor, (C, self.h, self.w))
                           if config.mid_blocks else 0)
        self.ring_chunks = config.recent_frames // C + 1
        self.sink_off = 0
        self.mid_off = config.sink_frames * hw
        self.ring_off = self.mid_off + config.mid_blocks * self.mid_tokens
        self.pool_tokens = self.ring_off + self.ring_chunks * C * hw
        dv = head_dim if v_head_dim is None else v_head_dim
        self.k_pool = torch.zeros(num_layers, batch, self.pool_tokens, kv_heads, head_dim,
                                  dtype=dtype, device=device)
        self.v_pool = torch.zeros(num_layers, batch, self.pool_tokens, kv_heads, dv, dtype=dtype,
                                  device=device)
        self.t_theta = t_theta
        self.reset()

    # -- bookkeeping shared by every layer

    def reset(self) -> None:
        L, M = self.num_layers, self.cfg.mid_blocks
        self.frames_done = 0
        self.sink_filled = 0
        self.ring_start = 0
        self.ring_len = 0             # committed recent chunks in the ring
        self.ring_frames = [0] * self.ring_chunks
        self.recent_pos = [[0.0] * self.ring_chunks for _ in range(L)]
        self.mid_order = [[] for _ in range(L)]   # mid slots, oldest first
        self.mid_pos = [[0.0] * M for _ in range(L)]
        self.mid_score = [[0.0] * M for _ in range(L)]
        self.active = [[] for _ in range(L)]
        self.max_position = -1
        self._chunk: Optional[ChunkState] = None

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V pools: fixed at construction."""
        return self.k_pool.nbytes + self.v_pool.nbytes

    @property
    def num_mid(self) -> int:
        return len(self.mid_order[0]) if self.num_layers else 0

    def begin_chunk(self, frames: int) -> None:
        cfg, C, hw = self.cfg, self.cfg.chunk_frames, self.hw
        if self._chunk is not None:
            raise RuntimeError("begin_chunk: the previous chunk was not ended (end_chunk)")
        if not 1 <= frames <= C:
            raise ValueError(f"frames must be in [1, chunk_frames = {C}], got {frames}")
        if self.frames_done % C:
            raise RuntimeError("begin_chunk: only the last chunk of a video may be partial")
        if self.frames_done < cfg.sink_frames:
            first = self.frames_done
            ch = ChunkState(frames=frames, sink=True, qpos=float(first),
                            frame_slots=self._frame_slots(first * hw, float(first), frames),
                            ranges=[None] * self.num_layers)
        else:
            while self.ring_len > cfg.recent_frames // C:
                self._evict_oldest()
            n_active = min(cfg.active_blocks, self.num_mid)
            qpos = float(cfg.sink_frames + (n_active + self.ring_len) * C)
            slot = (self.ring_start + self.ring_len) % self.ring_chunks
            base = self.ring_off + slot * C * hw
            ch = ChunkState(frames=frames, sink=False, qpos=qpos, slot=slot, n_active=n_active,
                            frame_slots=self._frame_slots(base, qpos, frames),
                            ranges=[None] * self.num_layers)
        self._chunk = ch

    def _frame_slots(self, first_token: int, qpos: float, frames: int) -> FrameSlots:
        return FrameSlots.trusted([first_token + f * self.hw for f in range(frames)],
                                  [qpos + f for f in range(frames)], self.k_pool.device)

    def _ring_order(self) -> list[int]:
        return [(self.ring_start + j) % self.ring_chunks for j in range(self.ring_len)]

    def _evict_oldest(self):
        """The oldest recent chunk goes through the compressor into mid (every layer)."""
        slot = self.ring_start
        C = self.cfg.chunk_frames
        a = self.ring_off + slot * C * self.hw
        b = a + self.ring_frames[slot] * self.hw
        grid = (self.ring_frames[slot], self.h, self.w)
        for layer in range(self.num_layers):
            if self.cfg.mid_blocks:
                kc, vc = call_compressor(self.compressor, self._keywords, self.k_pool[layer, :, a:b],
                                         self.v_pool[layer, :, a:b], grid, self.recent_pos[layer][slot],
                                         self.cfg.theta, self.t_theta)
                m = self._mid_slot(layer)
                s = self.mid_off + m * self.mid_tokens
                self.k_pool[layer, :, s:s + self.mid_tokens] = kc
                self.v_pool[layer, :, s:s + self.mid_tokens] = vc
                self.mid_pos[layer][m] = self.recent_pos[layer][slot]
                self.mid_score[layer][m] = 1.0
                self.mid_order[layer].append(m)
        self.ring_start = (self.ring_start + 1) % self.ring_chunks
        self.ring_len -= 1

    def _mid_slot(self, layer: int) -> int:
        order = self.mid_order[layer]
        if len(order) < self.cfg.mid_blocks:
            used = set(order)
            return next(m for m in range(self.cfg.mid_blocks) if m not in used)
        if self.cfg.mid_evict == "oldest":
            victim = order[0]
        else:  # lowest score; the oldest among equals
            victim = min(order, key=lambda m: self.mid_score[layer][m])
        order.remove(victim)
        return victim

    # -- per layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid) -> torch.Tensor:
        """Self-attention of the current chunk's ``q``, ``k``, ``v`` [B, F*h*w, H, D] (before
        RoPE) against the cache; writes the chunk's rotated keys and values into its slot."""
        ch = self._chunk
        if ch is None:
            raise RuntimeError("attend: call begin_chunk first")
        check_layer(layer, self.num_layers)
        F = grid[0]
        if F != ch.frames or tuple(grid[1:]) != (self.h, self.w):
            raise ValueError(f"grid must be ({ch.frames}, {self.h}, {self.w}), got {tuple(grid)}")
        theta = self.cfg.theta
        q_rot = rope3d(q, grid=tuple(grid), frame_offset=ch.qpos, theta=theta, t_theta=self.t_theta)
        if not ch.prepared(layer):
            ch.ranges[layer] = self._prepare_layer(layer, q_rot)
        kp, vp = self.k_pool[layer], self.v_pool[layer]
        rope3d_store_(kp, vp, k, v, ch.frame_slots, None, grid=tuple(grid), theta=theta,
                      t_theta=self.t_theta)
        self.max_position = max(self.max_position, int(ch.qpos) + F - 1)
        return cached_attention(q_rot, kp, vp, ch.ranges[layer])

    def _prepare_layer(self, layer: int, q_rot: torch.Tensor) -> TokenRanges:
        """First pass of a chunk in this layer: pick the active mid blocks (``select_blocks``),
        re-rotate the blocks and recent chunks whose position changed; returns the ranges the
        chunk attends in this layer."""
        ch, cfg, C = self._chunk, self.cfg, self.cfg.chunk_frames
        device = self.k_pool.device
        if ch.sink:
            return TokenRanges.trusted([(0, (self.frames_done + ch.frames) * self.hw)], device)
        order = self.mid_order[layer]
        mt = self.mid_tokens
        if ch.n_active < len(order):
            blocks = TokenRanges.trusted(
                [(self.mid_off + m * mt, self.mid_off + (m + 1) * mt) for m in order], device)
            idx = select_blocks(q_rot, self.k_pool[layer], blocks, ch.n_active,
                                query_stride=cfg.select_stride, score=cfg.select_score)
            active = [order[i] for i in idx.tolist()]
        else:
            active = list(order)
        chosen = set(active)
        for m in order:
            self.mid_score[layer][m] = 0.5 * self.mid_score[layer][m] + (0.5 if m in chosen else 0.0)
        self.active[layer] = active
        shift_ranges, deltas = [], []
        for a, m in enumerate(active):
            target = float(cfg.sink_frames + a * C)
            if target != self.mid_pos[layer][m]:
                s = self.mid_off + m * mt
                shift_ranges.append((s, s + mt))
                deltas.append(target - self.mid_pos[layer][m])
                self.mid_pos[layer][m] = target
            self.max_position = max(self.max_position, int(target) + C - 1)
        ring = self._ring_order()
        for j, slot in enumerate(ring):
            target = float(cfg.sink_frames + (ch.n_active + j) * C)
            if target != self.recent_pos[layer][slot]:
                s = self.ring_off + slot * C * self.hw
                shift_ranges.append((s, s + self.ring_frames[slot] * self.hw))
                deltas.append(target - self.recent_pos[layer][slot])
                self.recent_pos[layer][slot] = target
            self.max_position = max(self.max_position, int(target) + C - 1)
        if shift_ranges:
            rope3d_shift_(self.k_pool[layer], TokenRanges.trusted(shift_ranges, device),
                          torch.tensor(deltas, dtype=torch.float64), theta=cfg.theta,
                          t_theta=self.t_theta)
        ranges = [[0, self.sink_filled * self.hw]] if self.sink_filled else []
        ranges += [[self.mid_off + m * mt, self.mid_off + (m + 1) * mt] for m in active]
        sizes = [self.ring_frames[s] * self.hw for s in ring] + [ch.frames * self.hw]
        ranges += _runs(ring + [ch.slot], sizes, self.ring_off, C * self.hw)
        return TokenRanges.trusted(ranges, device)

    def end_chunk(self) -> None:
        """The last pass's keys stay: the chunk becomes part of the sink or the recent window."""
        ch = self._chunk
        if ch is None:
            raise RuntimeError("end_chunk: no chunk was begun")
        if not all(ch.prepared(layer) for layer in range(self.num_layers)):
            raise RuntimeError("end_chunk: some layer never wrote this chunk (attend)")
        if ch.sink:
            self.sink_filled += ch.frames
        else:
            self.ring_frames[ch.slot] = ch.frames
            for layer in range(self.num_layers):
                self.recent_pos[layer][ch.slot] = ch.qpos
            self.ring_len += 1
        self.frames_done += ch.frames
        self._chunk = None

    def token_ranges(self, layer: int) -> torch.Tensor:
        """The [R, 2] int32 ranges (on the pool's device) the current chunk of ``layer`` attends
        (after its first pass)."""
        return self._chunk.ranges[layer].tensor
