"""The bounded three-partition KV cache of a streaming video DiT (SPEC §6).

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

``NaiveKVCache`` computes the same thing the way most public code does it (keep every frame,
``torch.cat`` per chunk, clone and re-rotate the window every forward pass): the baseline the
fused cache is validated and timed against.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import attention as _attention
from . import kv_store as _kv_store
from . import reference as _reference
from . import rope as _rope
from . import selection as _selection

Compressor = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class CacheConfig:
    """Partition sizes and policies of the streaming cache (frames are latent frames)."""

    chunk_frames: int = 3
    sink_frames: int = 3            # multiple of chunk_frames
    recent_frames: int = 6          # previous frames kept at full resolution; multiple of chunk_frames
    mid_blocks: int = 0             # compressed blocks kept; 0: no mid memory (sink + window only)
    top_k: Optional[int] = None     # mid blocks attended per chunk; None: all of them
    mid_evict: str = "oldest"       # "oldest" or "lowest" (lowest selection score) when mid is full
    select_stride: int = 8          # select_blocks query_stride
    select_score: str = "mean"      # select_blocks score
    max_frames_rope: int = 1024     # every temporal position stays below this (Wan: 1024)
    theta: float = 10000.0

    def __post_init__(self):
        for name in ("chunk_frames",):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("sink_frames", "recent_frames", "mid_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        C = self.chunk_frames
        if self.sink_frames % C or self.recent_frames % C:
            raise ValueError(f"sink_frames ({self.sink_frames}) and recent_frames ({self.recent_frames}) "
                             f"must be multiples of chunk_frames ({C})")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0, got {self.top_k!r}")
        if self.mid_evict not in ("oldest", "lowest"):
            raise ValueError(f"mid_evict must be 'oldest' or 'lowest', got {self.mid_evict!r}")
        if self.max_position >= self.max_frames_rope:
            raise ValueError(
                f"the largest temporal position sink_frames + active_mid*chunk_frames + recent_frames "
                f"+ chunk_frames - 1 = {self.max_position} must be < max_frames_rope = "
                f"{self.max_frames_rope}")

    @property
    def active_blocks(self) -> int:
        """Mid blocks attended per chunk (at most)."""
        return self.mid_blocks if self.top_k is None else min(self.top_k, self.mid_blocks)

    @property
    def max_position(self) -> int:
        return (self.sink_frames + self.active_blocks * self.chunk_frames + self.recent_frames
                + self.chunk_frames - 1)


# ----------------------------------------------------------------------------- compressor


class AvgPoolCompressor:
    """Built-in fallback mid-block compressor: average pooling of a block's K and V over windows of
    ``time`` frames x ``space`` x ``space`` tokens (floor; a factor larger than the grid is
    clamped to it). Pooling is linear, so a temporal ``rope3d_shift_`` of the pooled keys equals
    pooling the shifted keys: the block keeps the temporal base position of its first frame. The
    spatial rotation of the pooled keys is the mean of their window's (a training-free
    approximation).

    The cache calls any callable ``compressor(k, v, grid=...) -> (k_c, v_c)``: ``k``, ``v``
    [B, F*h*w, H_kv, D] of one block on ``grid`` (F, h, w), keys rotated by the 3D RoPE with
    frame ``t`` at temporal position ``frame_offset + t``; it returns the same number of tokens
    for every block (``mid_tokens(grid)`` if defined, else found by one call), keys rotated so
    that a temporal shift of ``delta`` moves the whole block by ``delta`` frames. Keywords
    ``frame_offset``, ``theta`` and ``t_theta`` are passed to a callable that accepts them (e.g.
    to un-rotate before pooling, as ``vidstream.compress.PoolCompressor`` does; that one is the
    default when present, see ``default_compressor``)."""

    def __init__(self, time: int = 2, space: int = 2):
        if time < 1 or space < 1:
            raise ValueError(f"time and space pooling factors must be >= 1, got {time}, {space}")
        self.time, self.space = time, space

    def _factors(self, grid):
        F, h, w = grid
        return min(self.time, F), min(self.space, h), min(self.space, w)

    def mid_tokens(self, grid) -> int:
        F, h, w = grid
        tf, sh, sw = self._factors(grid)
        return (F // tf) * (h // sh) * (w // sw)

    def __call__(self, k: torch.Tensor, v: torch.Tensor, *, grid):
        return self._pool(k, grid), self._pool(v, grid)

    def _pool(self, x, grid):
        F, h, w = grid
        B, L, H, D = x.shape
        cube = x.float().reshape(B, F, h, w, H * D).permute(0, 4, 1, 2, 3)
        pooled = torch.nn.functional.avg_pool3d(cube, self._factors(grid))
        return pooled.permute(0, 2, 3, 4, 1).reshape(B, -1, H, D).to(x.dtype)


def default_compressor():
    """``vidstream.compress.PoolCompressor()`` (the compression issue's RoPE-aware pooling) when
    this build has it, else ``AvgPoolCompressor()``."""
    try:
        from .compress import PoolCompressor
    except ImportError:
        return AvgPoolCompressor()
    return PoolCompressor()


def _keywords(compressor) -> set:
    """The optional keywords (frame_offset, theta, t_theta) the compressor accepts."""
    try:
        params = inspect.signature(compressor).parameters
    except (TypeError, ValueError):
        return set()
    names = {"frame_offset", "theta", "t_theta"}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return names
    return names & set(params)


def _compress(compressor, keywords, k, v, grid, frame_offset, theta, t_theta):
    extra = {"frame_offset": float(frame_offset), "theta": theta, "t_theta": t_theta}
    return compressor(k, v, grid=tuple(grid), **{n: extra[n] for n in keywords})


def _mid_tokens(compressor, grid) -> int:
    if hasattr(compressor, "mid_tokens"):
        return int(compressor.mid_tokens(grid))
    dummy = torch.zeros(1, math.prod(grid), 1, 2)
    out = _compress(compressor, _keywords(compressor), dummy, dummy, grid, 0.0, 10000.0, None)
    return int(out[0].shape[1])


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


# ----------------------------------------------------------------------------- the fused cache


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
        self.compressor = compressor if compressor is not None else default_compressor()
        self._keywords = _keywords(self.compressor)
        C, hw = config.chunk_frames, self.hw
        self.mid_tokens = _mid_tokens(self.compressor, (C, self.h, self.w)) if config.mid_blocks else 0
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

    def reset(self):
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
        self._chunk = None

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V pools: fixed at construction."""
        return self.k_pool.nbytes + self.v_pool.nbytes

    @property
    def num_mid(self) -> int:
        return len(self.mid_order[0]) if self.num_layers else 0

    def begin_chunk(self, frames: int):
        cfg, C = self.cfg, self.cfg.chunk_frames
        if self._chunk is not None:
            raise RuntimeError("begin_chunk: the previous chunk was not ended (end_chunk)")
        if not 1 <= frames <= C:
            raise ValueError(f"frames must be in [1, chunk_frames = {C}], got {frames}")
        if self.frames_done % C:
            raise RuntimeError("begin_chunk: only the last chunk of a video may be partial")
        if self.frames_done < cfg.sink_frames:
            first = self.frames_done
            self._chunk = dict(frames=frames, sink=True, qpos=float(first),
                               slots=[(first + f) * self.hw for f in range(frames)],
                               ranges=[[0, (first + frames) * self.hw]])
            self._selected = [False] * self.num_layers
            return
        while self.ring_len > self.cfg.recent_frames // C:
            self._evict_oldest()
        n_active = self._n_active()
        qpos = float(cfg.sink_frames + (n_active + self.ring_len) * C)
        slot = (self.ring_start + self.ring_len) % self.ring_chunks
        base = self.ring_off + slot * C * self.hw
        self._chunk = dict(frames=frames, sink=False, qpos=qpos, slot=slot, n_active=n_active,
                           slots=[base + f * self.hw for f in range(frames)])
        self._selected = [False] * self.num_layers

    def _n_active(self) -> int:
        return min(self.cfg.active_blocks, self.num_mid)

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
                kc, vc = _compress(self.compressor, self._keywords, self.k_pool[layer, :, a:b],
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
        F = grid[0]
        if F != ch["frames"] or tuple(grid[1:]) != (self.h, self.w):
            raise ValueError(f"grid must be ({ch['frames']}, {self.h}, {self.w}), got {tuple(grid)}")
        theta = self.cfg.theta
        q_rot = _rope.rope3d(q, grid=tuple(grid), frame_offset=ch["qpos"], theta=theta, t_theta=self.t_theta)
        if not self._selected[layer]:
            self._prepare_layer(layer, q_rot)
            self._selected[layer] = True
        kp, vp = self.k_pool[layer], self.v_pool[layer]
        if "slots_t" not in ch:  # host metadata, built once per chunk
            ch["slots_t"] = torch.tensor(ch["slots"], dtype=torch.int32)
            ch["pos_t"] = torch.arange(F, dtype=torch.float64) + ch["qpos"]
        _kv_store.rope3d_store_(kp, vp, k, v, ch["slots_t"], ch["pos_t"], grid=tuple(grid), theta=theta,
                                t_theta=self.t_theta)
        self.max_position = max(self.max_position, int(ch["qpos"]) + F - 1)
        return _attention.cached_attention(q_rot, kp, vp, ch["ranges_t"][layer])

    def _prepare_layer(self, layer: int, q_rot: torch.Tensor):
        """First pass of a chunk in this layer: pick the active mid blocks (``select_blocks``),
        re-rotate the blocks and recent chunks whose position changed, build the ranges."""
        ch, cfg, C = self._chunk, self.cfg, self.cfg.chunk_frames
        ch.setdefault("ranges_t", [None] * self.num_layers)
        if ch["sink"]:
            ch["ranges_t"][layer] = torch.tensor(ch["ranges"], dtype=torch.int32)
            return
        order = self.mid_order[layer]
        n_active = ch["n_active"]
        mt = self.mid_tokens
        if n_active < len(order):
            blocks = torch.tensor([[self.mid_off + m * mt, self.mid_off + (m + 1) * mt] for m in order],
                                  dtype=torch.int32)
            idx = _selection.select_blocks(q_rot, self.k_pool[layer], blocks, n_active,
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
                shift_ranges.append([s, s + mt])
                deltas.append(target - self.mid_pos[layer][m])
                self.mid_pos[layer][m] = target
            self.max_position = max(self.max_position, int(target) + C - 1)
        ring = self._ring_order()
        for j, slot in enumerate(ring):
            target = float(cfg.sink_frames + (n_active + j) * C)
            if target != self.recent_pos[layer][slot]:
                s = self.ring_off + slot * C * self.hw
                shift_ranges.append([s, s + self.ring_frames[slot] * self.hw])
                deltas.append(target - self.recent_pos[layer][slot])
                self.recent_pos[layer][slot] = target
            self.max_position = max(self.max_position, int(target) + C - 1)
        if shift_ranges:
            _rope.rope3d_shift_(self.k_pool[layer], torch.tensor(shift_ranges, dtype=torch.int32),
                                torch.tensor(deltas, dtype=torch.float64), theta=cfg.theta,
                                t_theta=self.t_theta)
        ranges = [[0, self.sink_filled * self.hw]] if self.sink_filled else []
        ranges += [[self.mid_off + m * mt, self.mid_off + (m + 1) * mt] for m in active]
        sizes = [self.ring_frames[s] * self.hw for s in ring] + [ch["frames"] * self.hw]
        ranges += _runs(ring + [ch["slot"]], sizes, self.ring_off, C * self.hw)
        ch["ranges_t"][layer] = torch.tensor(ranges, dtype=torch.int32)

    def end_chunk(self):
        """The last pass's keys stay: the chunk becomes part of the sink or the recent window."""
        ch = self._chunk
        if ch is None:
            raise RuntimeError("end_chunk: no chunk was begun")
        if not all(self._selected):
            raise RuntimeError("end_chunk: some layer never wrote this chunk (attend)")
        if ch["sink"]:
            self.sink_filled += ch["frames"]
        else:
            slot = ch["slot"]
            self.ring_frames[slot] = ch["frames"]
            for layer in range(self.num_layers):
                self.recent_pos[layer][slot] = ch["qpos"]
            self.ring_len += 1
        self.frames_done += ch["frames"]
        self._chunk = None

    def token_ranges(self, layer: int) -> torch.Tensor:
        """The [R, 2] int32 ranges the current chunk of ``layer`` attends (after its first pass)."""
        return self._chunk["ranges_t"][layer]


# ----------------------------------------------------------------------------- the naive baseline


class NaiveKVCache:
    """The same policy as ``StreamingKVCache`` computed the way most public streaming code does:
    every committed frame's keys and values are kept in one growing tensor per layer
    (``torch.cat`` each chunk), and each forward pass clones the window, re-rotates it to its
    current positions and concatenates sink, active mid blocks, window and the current chunk.
    Memory and time per chunk grow with the video; run it under ``use_backend("reference")``."""

    def __init__(self, *, num_layers: int, config: CacheConfig, frame_shape,
                 compressor: Compressor | None = None, t_theta: torch.Tensor | None = None, **_):
        self.cfg = config
        self.num_layers = num_layers
        self.h, self.w = (int(s) for s in frame_shape)
        self.hw = self.h * self.w
        self.compressor = compressor if compressor is not None else default_compressor()
        self._keywords = _keywords(self.compressor)
        self.t_theta = t_theta
        self.reset()

    def reset(self):
        L = self.num_layers
        self.hist_k: list[Optional[torch.Tensor]] = [None] * L
        self.hist_v: list[Optional[torch.Tensor]] = [None] * L
        self.chunks: list[dict] = []      # committed chunks: start frame, frames, write / current pos
        self.recent: list[int] = []       # indices into chunks, oldest first
        self.mid: list[list[dict]] = [[] for _ in range(L)]
        self.frames_done = 0
        self.max_position = -1
        self._chunk = None

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds now: grows with the video."""
        n = sum(t.nbytes for t in self.hist_k + self.hist_v if t is not None)
        return n + sum(b["k"].nbytes + b["v"].nbytes for blocks in self.mid for b in blocks)

    def _tokens(self, t, c):
        a = c["start"] * self.hw
        return t[:, a:a + c["frames"] * self.hw]

    def _shifted(self, k, delta):
        k = k.clone()
        if delta:
            _reference.rope3d_shift_(k, [[0, k.shape[1]]], [delta], theta=self.cfg.theta,
                                     t_theta=self.t_theta)
        return k

    def begin_chunk(self, frames: int):
        cfg, C = self.cfg, self.cfg.chunk_frames
        sink = self.frames_done < cfg.sink_frames
        while not sink and len(self.recent) > cfg.recent_frames // C:
            c = self.chunks[self.recent.pop(0)]
            for layer in range(self.num_layers):
                if not cfg.mid_blocks:
                    continue
                k = self._shifted(self._tokens(self.hist_k[layer], c), c["pos"] - c["write_pos"])
                kc, vc = _compress(self.compressor, self._keywords, k,
                                   self._tokens(self.hist_v[layer], c).clone(),
                                   (c["frames"], self.h, self.w), c["pos"], cfg.theta, self.t_theta)
                blocks = self.mid[layer]
                if len(blocks) == cfg.mid_blocks:
                    if cfg.mid_evict == "oldest":
                        blocks.pop(0)
                    else:
                        low = min(range(len(blocks)), key=lambda i: blocks[i]["score"])
                        blocks.pop(low)
                blocks.append(dict(k=kc, v=vc, pos=c["pos"], score=1.0))
        n_active = 0 if sink else min(cfg.active_blocks, len(self.mid[0]) if self.num_layers else 0)
        qpos = self.frames_done if sink else cfg.sink_frames + (n_active + len(self.recent)) * C
        self._chunk = dict(frames=frames, sink=sink, qpos=float(qpos), n_active=n_active,
                           active=[None] * self.num_layers, cur=[None] * self.num_layers)

    def attend(self, layer, q, k, v, grid):
        ch, cfg, C = self._chunk, self.cfg, self.cfg.chunk_frames
        theta = cfg.theta
        q_rot = _reference.rope3d(q, grid=tuple(grid), frame_offset=ch["qpos"], theta=theta,
                                  t_theta=self.t_theta)
        if ch["active"][layer] is None:
            blocks = self.mid[layer]
            if ch["n_active"] < len(blocks):
                kcat = torch.cat([b["k"] for b in blocks], dim=1)
                mt = blocks[0]["k"].shape[1]
                br = [[i * mt, (i + 1) * mt] for i in range(len(blocks))]
                idx = _reference.select_blocks(q_rot, kcat, br, ch["n_active"],
                                               query_stride=cfg.select_stride, score=cfg.select_score)
                active = [blocks[i] for i in idx.tolist()]
            else:
                active = [] if ch["sink"] else list(blocks)
            for b in blocks:
                b["score"] = 0.5 * b["score"] + (0.5 if any(b is a for a in active) else 0.0)
            for a, b in enumerate(active):
                target = float(cfg.sink_frames + a * C)
                b["k"] = self._shifted(b["k"], target - b["pos"])
                b["pos"] = target
                self.max_position = max(self.max_position, int(target) + C - 1)
            ch["active"][layer] = active
            if layer == 0:
                for j, i in enumerate(self.recent):
                    self.chunks[i]["pos"] = float(cfg.sink_frames + (ch["n_active"] + j) * C)
        k_rot = _reference.rope3d(k, grid=tuple(grid), frame_offset=ch["qpos"], theta=theta,
                                  t_theta=self.t_theta)
        ch["cur"][layer] = (k_rot, v)
        self.max_position = max(self.max_position, int(ch["qpos"]) + grid[0] - 1)
        ks, vs = [], []
        hk, hv = self.hist_k[layer], self.hist_v[layer]
        sink_frames = min(self.frames_done, cfg.sink_frames)
        if sink_frames:
            ks.append(hk[:, :sink_frames * self.hw].clone())
            vs.append(hv[:, :sink_frames * self.hw].clone())
        for b in ch["active"][layer]:
            ks.append(b["k"])
            vs.append(b["v"])
        for i in self.recent:
            c = self.chunks[i]
            ks.append(self._shifted(self._tokens(hk, c), c["pos"] - c["write_pos"]))
            vs.append(self._tokens(hv, c).clone())
        ks.append(k_rot)
        vs.append(v)
        k_all, v_all = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        return _reference.cached_attention(q_rot, k_all, v_all, [[0, k_all.shape[1]]])

    def end_chunk(self):
        ch = self._chunk
        for layer in range(self.num_layers):
            k_rot, v = ch["cur"][layer]
            hk, hv = self.hist_k[layer], self.hist_v[layer]
            self.hist_k[layer] = k_rot.clone() if hk is None else torch.cat([hk, k_rot], dim=1)
            self.hist_v[layer] = v.clone() if hv is None else torch.cat([hv, v], dim=1)
        self.chunks.append(dict(start=self.frames_done, frames=ch["frames"], write_pos=ch["qpos"],
                                pos=ch["qpos"]))
        if not ch["sink"]:
            self.recent.append(len(self.chunks) - 1)
        self.frames_done += ch["frames"]
        self._chunk = None
