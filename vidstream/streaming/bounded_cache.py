"""The bounded three-partition KV cache of a streaming video DiT (docs/spec.md §6).

Per layer one pool, allocated once::

    [ sink: sink_frames frames | mid: mid_blocks x mid_tokens | ring: recent_frames + chunk_frames frames ]

The sink keeps the first frames at full resolution. The ring is a ring of *frame* slots holding
the last ``recent_frames`` frames plus the frames of the current chunk (its denoising steps
overwrite them, the t = 0 pass leaves the clean keys there), so the current chunk lands where it
will stay: committing a chunk moves nothing. Eviction is frame by frame, as Self-Forcing's
rolling cache: before a chunk, the oldest frames after the sink leave until ``recent_frames``
remain, whatever the chunk size (sink and window need not be multiples of ``chunk_frames``). A
run of ``chunk_frames`` evicted frames goes through the compressor into one mid block (a shorter
run, possible only at the first eviction when the sink or the window is not a multiple of the
chunk, is dropped); when mid is full the oldest (or lowest-scoring) block is dropped. The
kernels see the cache as token ranges into the pool (``cached_attention``).

Positions as metadata (issue #12). Every key is stored exactly once, rotated at the temporal
position it was written with, and never re-rotated. Each range (the sink, each active mid block,
each run of ring frames) has a *stored* position and, this chunk, a *target* position; the ops
read every key of range ``r`` as if shifted by ``kv_deltas[r] = target - stored`` frames
(``cached_attention(kv_deltas=...)``, ``select_blocks(block_deltas=...)``), so compaction,
eviction, promotion to mid and the position policy are all changes of offsets. Policies
(``CacheConfig.positions``):

* ``"relative"``: sink ``[0, S)``, then the active mid blocks (``chunk_frames`` positions each,
  in time order), then the recent frames, then the current chunk; the largest position is
  ``S + top_k*C + recent_frames + C - 1`` whatever the video length.
* ``"absolute"``: a frame's target is the index it was generated at, minus one common ``base``
  that is raised (a *rebase*) when the chunk's newest position would reach ``max_frames_rope``:
  then ``base`` becomes the index of the oldest recent frame minus ``S``. RoPE scores depend on
  position differences only, so a rebase changes no score; with offsets it is only a change of
  deltas and of the query position.

``rerotate=True`` is the legacy behaviour kept for comparison (tests and ``bench/bench_offsets.py``):
the same targets, but whatever moved is re-rotated in place with ``rope3d_shift_`` on each
chunk's first pass and attended without offsets, so a long-lived key accumulates one rounding
per move.

The index metadata the ops read (frame slots, per-layer token ranges and their float64 offsets)
is built once per chunk: ``begin_chunk`` and each layer's first pass do all host work (eviction,
block selection, layout), and every later denoising pass only launches kernels.

With autograd on (``torch.is_grad_enabled()`` and ``q``, ``k`` or ``v`` requiring grad),
``attend`` is differentiable with respect to the current chunk's ``q``, ``k``, ``v``: the cached
keys and values are constants (detached, as in Self-Forcing's training), the chunk's keys are
rotated out of place and attended with them; their detached copies are still written into the
pool for later chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import backend as _backend
from ..ops.attention import cached_attention
from ..ops.metadata import FrameSlots, RangeDeltas, TokenRanges
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
class LayerLayout:
    """What one layer attends this chunk, built on its first pass: the ranges (``ranges``) and
    their offsets (``deltas``, prepared ``RangeDeltas``, or None when all are 0), and the same for
    the cached part alone (``past``/``past_deltas``: every range but the current chunk's)."""

    ranges: TokenRanges
    deltas: Optional[RangeDeltas]
    past: TokenRanges
    past_deltas: list


@dataclass
class ChunkState:
    """The chunk being generated, from ``begin_chunk`` to ``end_chunk``."""

    frames: int
    first: int                      # absolute index of its first frame
    n_sink: int                     # its first n_sink frames land in the sink
    qpos: float                     # target position of its first frame (the others follow)
    frame_slots: FrameSlots         # where rope3d_store_ writes each frame, at which position
    ring_slots: list                # ring frame slots of its frames after the sink
    n_active: int = 0               # mid blocks this chunk attends
    layouts: list = field(default_factory=list)  # per layer: LayerLayout, None until its first pass

    def prepared(self, layer: int) -> bool:
        return self.layouts[layer] is not None

    @property
    def ranges(self) -> list:
        return [None if lay is None else lay.ranges for lay in self.layouts]


def _merge(pieces) -> list:
    """(start, end, delta) pieces, in order, merged where one ends where the next starts with the
    same delta; empty pieces dropped."""
    out: list = []
    for s, e, d in pieces:
        if e <= s:
            continue
        if out and out[-1][1] == s and out[-1][2] == d:
            out[-1][1] = e
        else:
            out.append([s, e, d])
    return out


class StreamingKVCache:
    """Sink + mid + recent ring + current-chunk slots per layer, in one pool allocated at
    construction (``nbytes`` never changes). Use: ``begin_chunk(F)``, then any number of forward
    passes that call ``attend`` once per layer (the first at each chunk selects the mid blocks and
    lays out the ranges and their offsets), then ``end_chunk()`` after the pass whose keys must
    stay (t = 0). ``rerotate=True``: the legacy in-place re-rotation (module docstring)."""

    def __init__(self, *, num_layers: int, batch: int, kv_heads: int, head_dim: int, frame_shape,
                 config: CacheConfig, compressor: Compressor | None = None,
                 v_head_dim: int | None = None, dtype=torch.float32, device="cpu",
                 t_theta: torch.Tensor | None = None, rerotate: bool = False):
        if not isinstance(rerotate, bool):
            raise TypeError(f"rerotate must be True or False, got {rerotate!r}")
        self.cfg = config
        self.rerotate = rerotate
        self.num_layers, self.batch = num_layers, batch
        self.h, self.w = (int(s) for s in frame_shape)
        self.hw = self.h * self.w
        self.compressor = checked_compressor(compressor, config, (self.h, self.w))
        self._keywords = compressor_keywords(self.compressor)
        C, hw = config.chunk_frames, self.hw
        self.mid_tokens = (compressed_tokens(self.compressor, (C, self.h, self.w))
                           if config.mid_blocks else 0)
        self.ring_capacity = config.recent_frames + C        # frame slots
        self.sink_off = 0
        self.mid_off = config.sink_frames * hw
        self.ring_off = self.mid_off + config.mid_blocks * self.mid_tokens
        self.pool_tokens = self.ring_off + self.ring_capacity * hw
        dv = head_dim if v_head_dim is None else v_head_dim
        self.k_pool = torch.zeros(num_layers, batch, self.pool_tokens, kv_heads, head_dim,
                                  dtype=dtype, device=device)
        self.v_pool = torch.zeros(num_layers, batch, self.pool_tokens, kv_heads, dv, dtype=dtype,
                                  device=device)
        self.t_theta = t_theta
        self.reset()

    # -- bookkeeping shared by every layer

    def reset(self) -> None:
        L, M, cap = self.num_layers, self.cfg.mid_blocks, self.ring_capacity
        self.frames_done = 0
        self.sink_filled = 0
        self.base = 0                 # "absolute": target = frame index - base
        self.ring_start = 0           # slot of the oldest committed recent frame
        self.ring_count = 0           # committed recent frames in the ring
        self.slot_frame = [0] * cap   # absolute frame index held by each ring slot
        # Per layer (legacy re-rotation moves them layer by layer): stored position of sink
        # frame 0 (frame i at + i), of each ring slot and mid block; and the position each was
        # last attended at (``*_cur``: what selection scores a block at in "relative").
        self.sink_pos = [0.0] * L
        self.slot_pos = [[0.0] * cap for _ in range(L)]
        self.slot_cur = [[0.0] * cap for _ in range(L)]
        self.mid_order = [[] for _ in range(L)]   # mid slots, oldest first
        self.mid_pos = [[0.0] * M for _ in range(L)]
        self.mid_cur = [[0.0] * M for _ in range(L)]
        self.mid_frame = [[0] * M for _ in range(L)]
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

    @property
    def absolute(self) -> bool:
        return self.cfg.positions == "absolute"

    def begin_chunk(self, frames: int) -> None:
        cfg, C, S = self.cfg, self.cfg.chunk_frames, self.cfg.sink_frames
        if self._chunk is not None:
            raise RuntimeError("begin_chunk: the previous chunk was not ended (end_chunk)")
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= C:
            raise ValueError(f"frames must be in [1, chunk_frames = {C}], got {frames}")
        if self.frames_done % C:
            raise RuntimeError("begin_chunk: only the last chunk of a video may be partial")
        first = self.frames_done
        n_sink = max(0, min(frames, S - first))
        if n_sink < frames and self.ring_count > cfg.recent_frames:
            self._evict(self.ring_count - cfg.recent_frames)
        n_active = min(cfg.active_blocks, self.num_mid) if n_sink < frames else 0
        if self.absolute:
            if first + frames - 1 - self.base >= cfg.max_frames_rope:
                oldest = self.slot_frame[self.ring_start] if self.ring_count else first
                self.base = oldest - S
            qpos = float(first - self.base)
        elif first < S:
            qpos = float(first)  # the sink is filling: absolute indices (nothing moved yet)
        else:
            qpos = float(S + n_active * C + self.ring_count)
        ring_slots = [(self.ring_start + self.ring_count + j) % self.ring_capacity
                      for j in range(frames - n_sink)]
        tokens = [(first + f) * self.hw for f in range(n_sink)]
        tokens += [self.ring_off + s * self.hw for s in ring_slots]
        slots = FrameSlots.trusted(tokens, [qpos + f for f in range(frames)], self.k_pool.device)
        self._chunk = ChunkState(frames=frames, first=first, n_sink=n_sink, qpos=qpos,
                                 frame_slots=slots, ring_slots=ring_slots, n_active=n_active,
                                 layouts=[None] * self.num_layers)
        self.max_position = max(self.max_position, int(qpos) + frames - 1)

    def _ring_order(self) -> list[int]:
        return [(self.ring_start + j) % self.ring_capacity for j in range(self.ring_count)]

    def _evict(self, n: int) -> None:
        """The ``n`` oldest recent frames leave the ring; ``chunk_frames`` of them make one mid
        block (every layer)."""
        cfg = self.cfg
        slots = [(self.ring_start + i) % self.ring_capacity for i in range(n)]
        if cfg.mid_blocks and n == cfg.chunk_frames:
            for layer in range(self.num_layers):
                self._compress(layer, slots)
        self.ring_start = (self.ring_start + n) % self.ring_capacity
        self.ring_count -= n

    def _compress(self, layer: int, slots: list) -> None:
        """The frames of ring ``slots`` (consecutive in time) through the compressor into a mid
        block. The compressor wants keys at consecutive positions from ``frame_offset``: frames
        stored at other positions (written by different chunks) are shifted on a temporary copy;
        the pool is never re-rotated."""
        hw, n = self.hw, len(slots)
        kp, vp = self.k_pool[layer], self.v_pool[layer]
        stored = [self.slot_pos[layer][s] for s in slots]
        base = stored[0]
        shifts = [base + i - p for i, p in enumerate(stored)]
        if slots == list(range(slots[0], slots[0] + n)) and not any(shifts):
            a = self.ring_off + slots[0] * hw
            k, v = kp[:, a:a + n * hw], vp[:, a:a + n * hw]
        else:
            idx = torch.cat([torch.arange(self.ring_off + s * hw, self.ring_off + (s + 1) * hw)
                             for s in slots]).to(kp.device)
            k, v = kp.index_select(1, idx), vp.index_select(1, idx)
            if any(shifts):
                rope3d_shift_(k, TokenRanges.trusted([(i * hw, (i + 1) * hw) for i in range(n)],
                                                     k.device),
                              torch.tensor(shifts, dtype=torch.float64), theta=self.cfg.theta,
                              t_theta=self.t_theta)
        kc, vc = call_compressor(self.compressor, self._keywords, k, v, (n, self.h, self.w), base,
                                 self.cfg.theta, self.t_theta)
        m = self._mid_slot(layer)
        s = self.mid_off + m * self.mid_tokens
        kp[:, s:s + self.mid_tokens] = kc
        vp[:, s:s + self.mid_tokens] = vc
        self.mid_pos[layer][m] = base
        self.mid_cur[layer][m] = self.slot_cur[layer][slots[0]]
        self.mid_frame[layer][m] = self.slot_frame[slots[0]]
        self.mid_score[layer][m] = 1.0
        self.mid_order[layer].append(m)

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
        RoPE) against the cache; writes the chunk's rotated keys and values into its slots.
        Differentiable in ``q``, ``k``, ``v`` when autograd asks (module docstring)."""
        ch = self._chunk
        if ch is None:
            raise RuntimeError("attend: call begin_chunk first")
        check_layer(layer, self.num_layers)
        F = grid[0]
        if F != ch.frames or tuple(grid[1:]) != (self.h, self.w):
            raise ValueError(f"grid must be ({ch.frames}, {self.h}, {self.w}), got {tuple(grid)}")
        theta, grid = self.cfg.theta, tuple(grid)
        q_rot = rope3d(q, grid=grid, frame_offset=ch.qpos, theta=theta, t_theta=self.t_theta)
        if not ch.prepared(layer):
            ch.layouts[layer] = self._prepare_layer(layer, q_rot)
        lay = ch.layouts[layer]
        kp, vp = self.k_pool[layer], self.v_pool[layer]
        if _backend.needs_grad(q, k, v):
            return self._attend_grad(q_rot, k, v, grid, kp, vp, lay)
        rope3d_store_(kp, vp, k, v, ch.frame_slots, None, grid=grid, theta=theta,
                      t_theta=self.t_theta)
        if lay.deltas is None:
            return cached_attention(q_rot, kp, vp, lay.ranges)
        return cached_attention(q_rot, kp, vp, lay.ranges, kv_deltas=lay.deltas, theta=theta,
                                t_theta=self.t_theta)

    def _attend_grad(self, q_rot, k, v, grid, kp, vp, lay: LayerLayout) -> torch.Tensor:
        """Grad mode: the cached keys (offsets applied) and values gathered as constants, the
        chunk's keys rotated out of place, one attention over their concatenation."""
        ch, hw = self._chunk, self.hw
        k_rot = rope3d(k, grid=grid, frame_offset=ch.qpos, theta=self.cfg.theta,
                       t_theta=self.t_theta)
        idx = torch.cat([torch.arange(t, t + hw) for t in ch.frame_slots.slots]).to(kp.device)
        kp.index_copy_(1, idx, k_rot.detach().to(kp.dtype))
        vp.index_copy_(1, idx, v.detach().to(vp.dtype))
        k_past = kp.index_select(1, lay.past.token_index(kp.device))
        v_past = vp.index_select(1, lay.past.token_index(vp.device))
        if any(lay.past_deltas):
            local, at = [], 0
            for s, e in lay.past.pairs:
                local.append((at, at + e - s))
                at += e - s
            rope3d_shift_(k_past, TokenRanges.trusted(local, k_past.device),
                          torch.tensor(lay.past_deltas, dtype=torch.float64),
                          theta=self.cfg.theta, t_theta=self.t_theta)
        k_all = torch.cat([k_past, k_rot.to(kp.dtype)], dim=1)
        v_all = torch.cat([v_past, v.to(vp.dtype)], dim=1)
        return cached_attention(q_rot, k_all, v_all, [[0, k_all.shape[1]]])

    def _targets(self, layer: int, active: list) -> tuple:
        """This chunk's target positions: of sink frame 0, of each active mid block, of each
        committed ring frame (oldest first)."""
        ch, C, S = self._chunk, self.cfg.chunk_frames, self.cfg.sink_frames
        if self.absolute:
            mids = [float(self.mid_frame[layer][m] - self.base) for m in active]
            ring = [float(self.slot_frame[s] - self.base) for s in self._ring_order()]
            return float(-self.base), mids, ring
        first_recent = S + ch.n_active * C
        return 0.0, [float(S + a * C) for a in range(len(active))], [
            float(first_recent + j) for j in range(self.ring_count)]

    def _select(self, layer: int, q_rot: torch.Tensor) -> list:
        """The active mid blocks of this chunk in this layer (in time order), scores updated.
        Each stored block is scored where it stands now: in "relative" at the position it was
        last attended at (its compression position before that), in "absolute" at its index."""
        ch, cfg = self._chunk, self.cfg
        order, mt = self.mid_order[layer], self.mid_tokens
        if ch.n_active < len(order):
            blocks = TokenRanges.trusted(
                [(self.mid_off + m * mt, self.mid_off + (m + 1) * mt) for m in order],
                self.k_pool.device)
            if self.absolute:
                now = [float(self.mid_frame[layer][m] - self.base) for m in order]
            else:
                now = [self.mid_cur[layer][m] for m in order]
            bd = [p - self.mid_pos[layer][m] for p, m in zip(now, order)]
            kw = dict(query_stride=cfg.select_stride, score=cfg.select_score)
            if any(bd):
                kw.update(block_deltas=RangeDeltas.trusted(bd), theta=cfg.theta,
                          t_theta=self.t_theta)
            idx = select_blocks(q_rot, self.k_pool[layer], blocks, ch.n_active, **kw)
            active = [order[i] for i in idx.tolist()]
        else:
            active = list(order) if ch.n_active else []
        chosen = set(active)
        for m in order:
            self.mid_score[layer][m] = 0.5 * self.mid_score[layer][m] + (0.5 if m in chosen else 0.0)
        return active

    def _prepare_layer(self, layer: int, q_rot: torch.Tensor) -> LayerLayout:
        """First pass of a chunk in this layer: pick the active mid blocks (``select_blocks``),
        work out every range's offset (target - stored; with ``rerotate`` re-rotate what moved
        instead) and return the layout the chunk attends in this layer."""
        ch, hw, C = self._chunk, self.hw, self.cfg.chunk_frames
        active = self._select(layer, q_rot) if self.num_mid else []
        self.active[layer] = active
        sink_t, mid_t, ring_t = self._targets(layer, active)
        mt, ring = self.mid_tokens, self._ring_order()
        past = [(0, self.sink_filled * hw, sink_t - self.sink_pos[layer])]
        for m, t in zip(active, mid_t):
            s = self.mid_off + m * mt
            past.append((s, s + mt, t - self.mid_pos[layer][m]))
            self.mid_cur[layer][m] = t
            self.max_position = max(self.max_position, int(t) + C - 1)
        for s, t in zip(ring, ring_t):
            a = self.ring_off + s * hw
            past.append((a, a + hw, t - self.slot_pos[layer][s]))
            self.slot_cur[layer][s] = t
            self.max_position = max(self.max_position, int(t))
        if self.sink_filled:
            self.max_position = max(self.max_position, int(sink_t) + self.sink_filled - 1)
        if self.rerotate:
            self._rerotate(layer, past, active, ring, sink_t, mid_t, ring_t)
            past = [(s, e, 0.0) for s, e, _ in past]
        past = _merge(past)
        current = [(t, t + hw, 0.0) for t in ch.frame_slots.slots]
        pieces = _merge([tuple(p) for p in past] + current)
        device = self.k_pool.device
        deltas = [d for _, _, d in pieces]
        return LayerLayout(
            ranges=TokenRanges.trusted([(s, e) for s, e, _ in pieces], device),
            deltas=RangeDeltas.trusted(deltas) if any(deltas) else None,
            past=TokenRanges.trusted([(s, e) for s, e, _ in past], device),
            past_deltas=[d for _, _, d in past])

    def _rerotate(self, layer, pieces, active, ring, sink_t, mid_t, ring_t) -> None:
        """Legacy: moves every key whose position changed in the pool (``rope3d_shift_``)."""
        moved = [(s, e, d) for s, e, d in _merge(pieces) if d]
        if moved:
            rope3d_shift_(self.k_pool[layer], TokenRanges.trusted([(s, e) for s, e, _ in moved],
                                                                  self.k_pool.device),
                          torch.tensor([d for _, _, d in moved], dtype=torch.float64),
                          theta=self.cfg.theta, t_theta=self.t_theta)
        self.sink_pos[layer] = sink_t
        for m, t in zip(active, mid_t):
            self.mid_pos[layer][m] = t
        for s, t in zip(ring, ring_t):
            self.slot_pos[layer][s] = t

    def end_chunk(self) -> None:
        """The last pass's keys stay: the chunk's frames join the sink or the recent window."""
        ch = self._chunk
        if ch is None:
            raise RuntimeError("end_chunk: no chunk was begun")
        if not all(ch.prepared(layer) for layer in range(self.num_layers)):
            raise RuntimeError("end_chunk: some layer never wrote this chunk (attend)")
        self.sink_filled += ch.n_sink
        for j, s in enumerate(ch.ring_slots):
            pos = ch.qpos + ch.n_sink + j
            self.slot_frame[s] = ch.first + ch.n_sink + j
            for layer in range(self.num_layers):
                self.slot_pos[layer][s] = self.slot_cur[layer][s] = pos
        self.ring_count += len(ch.ring_slots)
        self.frames_done += ch.frames
        self._chunk = None

    def token_ranges(self, layer: int) -> torch.Tensor:
        """The [R, 2] int32 ranges (on the pool's device) the current chunk of ``layer`` attends
        (after its first pass)."""
        return self._chunk.layouts[layer].ranges.tensor

    def range_deltas(self, layer: int) -> torch.Tensor:
        """The float64 [R] temporal offsets (frames, on the CPU) of those ranges: every key of
        range r is attended as if shifted by ``range_deltas(layer)[r]`` (zeros with
        ``rerotate=True``, which moved the keys instead)."""
        lay = self._chunk.layouts[layer]
        return lay.deltas.tensor if lay.deltas is not None else torch.zeros(len(lay.ranges),
                                                                            dtype=torch.float64)
