"""``FullSequenceAttention``: the self-attention of a whole video in one pass, the oracle the
streaming caches are checked against (docs/spec.md §1, §3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ops.attention import chunk_attention
from ..ops.rope3d import rope3d

if TYPE_CHECKING:
    import torch


class FullSequenceAttention:
    """3D RoPE at absolute positions and ``chunk_attention`` over every frame; a drop-in for a
    cache as ``StreamingDiT``'s ``attention`` argument."""

    def __init__(self, *, chunk_frames: int, sink_frames: int = 0, window_frames=None,
                 theta: float = 10000.0):
        self.chunk_frames, self.sink_frames = chunk_frames, sink_frames
        self.window_frames, self.theta = window_frames, theta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               grid) -> torch.Tensor:
        """The attention of layer ``layer`` (unused: no state) for ``q``, ``k`` [B, L, H, D] (RoPE
        not yet applied) and ``v`` on the token ``grid`` (F, h, w): ``[B, L, H, Dv]``."""
        g = tuple(grid)
        q = rope3d(q, grid=g, theta=self.theta)
        k = rope3d(k, grid=g, theta=self.theta)
        return chunk_attention(q, k, v, frame_tokens=g[1] * g[2], chunk_frames=self.chunk_frames,
                               sink_frames=self.sink_frames, window_frames=self.window_frames)
