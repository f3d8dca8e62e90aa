"""``NaiveKVCache``: the bounded cache's policy computed the way most public streaming code does
it (docs/spec.md §6), the oracle the bounded cache is tested against and the second baseline it
is timed against (the first is ``RollingBufferCache``, the cache Self-Forcing and LongLive run).

Every committed frame's keys and values are kept in one growing tensor per layer (``torch.cat``
each chunk), and each forward pass clones the window, re-rotates it to its current positions and
concatenates sink, active mid blocks, window and the current chunk. Memory and time per chunk
grow with the video. It calls the eager ``vidstream.reference`` ops directly, so it is eager
whatever backend is in force (only a compressor it is given runs the ops it calls).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import reference
from .compressors import Compressor, call_compressor, checked_compressor, compressor_keywords
from .config import CacheConfig, check_layer


@dataclass
class CommittedChunk:
    start: int          # first frame in the history tensors
    frames: int
    write_pos: float    # temporal position its keys were rotated at
    pos: float          # temporal position it is attended at now


@dataclass
class MidBlock:
    k: torch.Tensor     # compressed keys, rotated at ``pos``
    v: torch.Tensor
    pos: float
    score: float = 1.0


@dataclass
class NaiveChunk:
    frames: int
    sink: bool
    qpos: float
    n_active: int
    active: list = field(default_factory=list)  # per layer: its active MidBlocks, None until selected
    current: list = field(default_factory=list)  # per layer: (rotated k, v) of the last pass


class NaiveKVCache:
    """The same policy as ``StreamingKVCache`` with a growing history (module docstring)."""

    def __init__(self, *, num_layers: int, config: CacheConfig, frame_shape,
                 compressor: Compressor | None = None, t_theta: torch.Tensor | None = None, **_):
        self.cfg = config
        self.num_layers = num_layers
        self.h, self.w = (int(s) for s in frame_shape)
        self.hw = self.h * self.w
        self.compressor = checked_compressor(compressor, config, (self.h, self.w))
        self._keywords = compressor_keywords(self.compressor)
        self.t_theta = t_theta
        self.reset()

    def reset(self) -> None:
        L = self.num_layers
        self.hist_k: list[Optional[torch.Tensor]] = [None] * L
        self.hist_v: list[Optional[torch.Tensor]] = [None] * L
        self.chunks: list[CommittedChunk] = []
        self.recent: list[int] = []       # indices into chunks, oldest first
        self.mid: list[list[MidBlock]] = [[] for _ in range(L)]
        self.frames_done = 0
        self.max_position = -1
        self._chunk: Optional[NaiveChunk] = None

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds now: grows with the video."""
        n = sum(t.nbytes for t in self.hist_k + self.hist_v if t is not None)
        return n + sum(b.k.nbytes + b.v.nbytes for blocks in self.mid for b in blocks)

    def _tokens(self, t, c: CommittedChunk):
        a = c.start * self.hw
        return t[:, a:a + c.frames * self.hw]

    def _shifted(self, k, delta):
        k = k.clone()
        if delta:
            reference.rope3d_shift_(k, [[0, k.shape[1]]], [delta], theta=self.cfg.theta,
                                    t_theta=self.t_theta)
        return k

    def begin_chunk(self, frames: int) -> None:
        cfg, C = self.cfg, self.cfg.chunk_frames
        sink = self.frames_done < cfg.sink_frames
        while not sink and len(self.recent) > cfg.recent_frames // C:
            self._evict(self.chunks[self.recent.pop(0)])
        n_active = 0 if sink else min(cfg.active_blocks, len(self.mid[0]) if self.num_layers else 0)
        qpos = self.frames_done if sink else cfg.sink_frames + (n_active + len(self.recent)) * C
        self._chunk = NaiveChunk(frames=frames, sink=sink, qpos=float(qpos), n_active=n_active,
                                 active=[None] * self.num_layers, current=[None] * self.num_layers)

    def _evict(self, c: CommittedChunk):
        """Compresses chunk ``c`` into a mid block of every layer."""
        cfg = self.cfg
        if not cfg.mid_blocks:
            return
        for layer in range(self.num_layers):
            k = self._shifted(self._tokens(self.hist_k[layer], c), c.pos - c.write_pos)
            kc, vc = call_compressor(self.compressor, self._keywords, k,
                                     self._tokens(self.hist_v[layer], c).clone(),
                                     (c.frames, self.h, self.w), c.pos, cfg.theta, self.t_theta)
            blocks = self.mid[layer]
            if len(blocks) == cfg.mid_blocks:
                if cfg.mid_evict == "oldest":
                    blocks.pop(0)
                else:
                    low = min(range(len(blocks)), key=lambda i: blocks[i].score)
                    blocks.pop(low)
            blocks.append(MidBlock(k=kc, v=vc, pos=c.pos))

    def _select(self, layer: int, q_rot: torch.Tensor):
        """First pass of a chunk in this layer: choose, score and re-rotate the mid blocks."""
        ch, cfg, C = self._chunk, self.cfg, self.cfg.chunk_frames
        blocks = self.mid[layer]
        if ch.n_active < len(blocks):
            kcat = torch.cat([b.k for b in blocks], dim=1)
            mt = blocks[0].k.shape[1]
            br = [[i * mt, (i + 1) * mt] for i in range(len(blocks))]
            idx = reference.select_blocks(q_rot, kcat, br, ch.n_active,
                                          query_stride=cfg.select_stride, score=cfg.select_score)
            active = [blocks[i] for i in idx.tolist()]
        else:
            active = [] if ch.sink else list(blocks)
        for b in blocks:
            b.score = 0.5 * b.score + (0.5 if any(b is a for a in active) else 0.0)
        for a, b in enumerate(active):
            target = float(cfg.sink_frames + a * C)
            b.k = self._shifted(b.k, target - b.pos)
            b.pos = target
            self.max_position = max(self.max_position, int(target) + C - 1)
        ch.active[layer] = active
        if layer == 0:
            for j, i in enumerate(self.recent):
                self.chunks[i].pos = float(cfg.sink_frames + (ch.n_active + j) * C)

    def attend(self, layer, q, k, v, grid) -> torch.Tensor:
        ch, cfg = self._chunk, self.cfg
        if ch is None:
            raise RuntimeError("attend: call begin_chunk first")
        check_layer(layer, self.num_layers)
        theta = cfg.theta
        q_rot = reference.rope3d(q, grid=tuple(grid), frame_offset=ch.qpos, theta=theta,
                                 t_theta=self.t_theta)
        if ch.active[layer] is None:
            self._select(layer, q_rot)
        k_rot = reference.rope3d(k, grid=tuple(grid), frame_offset=ch.qpos, theta=theta,
                                 t_theta=self.t_theta)
        ch.current[layer] = (k_rot, v)
        self.max_position = max(self.max_position, int(ch.qpos) + grid[0] - 1)
        ks, vs = [], []
        hk, hv = self.hist_k[layer], self.hist_v[layer]
        sink_frames = min(self.frames_done, cfg.sink_frames)
        if sink_frames:
            ks.append(hk[:, :sink_frames * self.hw].clone())
            vs.append(hv[:, :sink_frames * self.hw].clone())
        for b in ch.active[layer]:
            ks.append(b.k)
            vs.append(b.v)
        for i in self.recent:
            c = self.chunks[i]
            ks.append(self._shifted(self._tokens(hk, c), c.pos - c.write_pos))
            vs.append(self._tokens(hv, c).clone())
        ks.append(k_rot)
        vs.append(v)
        k_all, v_all = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        return reference.cached_attention(q_rot, k_all, v_all, [[0, k_all.shape[1]]])

    def end_chunk(self) -> None:
        ch = self._chunk
        for layer in range(self.num_layers):
            k_rot, v = ch.current[layer]
            hk, hv = self.hist_k[layer], self.hist_v[layer]
            self.hist_k[layer] = k_rot.clone() if hk is None else torch.cat([hk, k_rot], dim=1)
            self.hist_v[layer] = v.clone() if hv is None else torch.cat([hv, v], dim=1)
        self.chunks.append(CommittedChunk(start=self.frames_done, frames=ch.frames,
                                          write_pos=ch.qpos, pos=ch.qpos))
        if not ch.sink:
            self.recent.append(len(self.chunks) - 1)
        self.frames_done += ch.frames
        self._chunk = None
