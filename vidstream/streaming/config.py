"""``CacheConfig``: partition sizes and policies of the bounded streaming cache (docs/spec.md §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..ops import checks


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
    # "relative": positions re-indexed to stay bounded (sink, then mid, then recent, contiguous);
    # "absolute": each frame keeps the index it was generated at (Self-Forcing / LongLive).
    positions: str = "relative"

    def __post_init__(self):
        checks.positive_int(self.chunk_frames, "chunk_frames")
        for name in ("sink_frames", "recent_frames", "mid_blocks"):
            checks.positive_int(getattr(self, name), name, minimum=0)
        C = self.chunk_frames
        if self.sink_frames % C or self.recent_frames % C:
            raise ValueError(f"sink_frames ({self.sink_frames}) and recent_frames ({self.recent_frames}) "
                             f"must be multiples of chunk_frames ({C})")
        if self.top_k is not None:
            checks.positive_int(self.top_k, "top_k (None or an int)", minimum=0)
        if self.mid_evict not in ("oldest", "lowest"):
            raise ValueError(f"mid_evict must be 'oldest' or 'lowest', got {self.mid_evict!r}")
        checks.positive_int(self.select_stride, "select_stride")
        if self.select_score not in ("mean", "max"):
            raise ValueError(f"select_score must be 'mean' or 'max', got {self.select_score!r}")
        if self.positions not in ("relative", "absolute"):
            raise ValueError(f"positions must be 'relative' or 'absolute', got {self.positions!r}")
        checks.positive_int(self.max_frames_rope, "max_frames_rope")
        checks.rope_params(self.theta)
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


def check_layer(layer, num_layers: int) -> None:
    """A cache's ``attend(layer, ...)``: a layer the cache was built for."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, num_layers = {num_layers}), got {layer!r}")
