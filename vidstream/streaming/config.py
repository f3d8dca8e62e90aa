"""``CacheConfig``: partition sizes and policies of the bounded streaming cache (docs/spec.md §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..ops import checks

POSITIONS = ("relative", "absolute")


@dataclass(frozen=True)
class CacheConfig:
    """Partition sizes and policies of the streaming cache (frames are latent frames).

    ``sink_frames`` and ``recent_frames`` are frame counts of any size (not only multiples of
    ``chunk_frames``): the window evicts frame by frame, as Self-Forcing's rolling cache does.
    ``CacheConfig.from_self_forcing`` maps Self-Forcing / LongLive's ``num_frame_per_block``,
    ``local_attn_size`` and ``sink_size``."""

    chunk_frames: int = 3
    sink_frames: int = 3            # first frames kept forever (any count >= 0)
    recent_frames: int = 6          # previous frames kept at full resolution (any count >= 0)
    mid_blocks: int = 0             # compressed blocks kept; 0: no mid memory (sink + window only)
    top_k: Optional[int] = None     # mid blocks attended per chunk; None: all of them
    mid_evict: str = "oldest"       # "oldest" or "lowest" (lowest selection score) when mid is full
    select_stride: int = 8          # select_blocks query_stride
    select_score: str = "mean"      # select_blocks score
    max_frames_rope: int = 1024     # every temporal position stays below this (Wan: 1024)
    theta: float = 10000.0
    # "relative": positions re-indexed to stay bounded (sink, then mid, then recent, contiguous);
    # the default: every query-key distance stays inside what a model trained on short clips saw.
    # "absolute": each frame keeps the index it was generated at (Self-Forcing / LongLive),
    # rebased by one common shift before the newest position reaches max_frames_rope.
    positions: str = "relative"

    def __post_init__(self):
        checks.positive_int(self.chunk_frames, "chunk_frames")
        for name in ("sink_frames", "recent_frames", "mid_blocks"):
            checks.positive_int(getattr(self, name), name, minimum=0)
        if self.top_k is not None:
            checks.positive_int(self.top_k, "top_k (None or an int)", minimum=0)
        if self.mid_evict not in ("oldest", "lowest"):
            raise ValueError(f"mid_evict must be 'oldest' or 'lowest', got {self.mid_evict!r}")
        checks.positive_int(self.select_stride, "select_stride")
        if self.select_score not in ("mean", "max"):
            raise ValueError(f"select_score must be 'mean' or 'max', got {self.select_score!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be 'relative' or 'absolute', got {self.positions!r}")
        checks.positive_int(self.max_frames_rope, "max_frames_rope")
        checks.rope_params(self.theta)
        if self.positions == "relative" and self.max_position >= self.max_frames_rope:
            raise ValueError(
                f"the largest temporal position sink_frames + active_mid*chunk_frames + recent_frames "
                f"+ chunk_frames - 1 = {self.max_position} must be < max_frames_rope = "
                f"{self.max_frames_rope}")
        if self.positions == "absolute" and self.window_frames > self.max_frames_rope:
            raise ValueError(
                f"positions='absolute' rebases the window to start right after the sink: "
                f"sink_frames + recent_frames + chunk_frames = {self.window_frames} must be <= "
                f"max_frames_rope = {self.max_frames_rope}")

    @classmethod
    def from_self_forcing(cls, num_frame_per_block: int, local_attn_size: int, sink_size: int,
                          **overrides) -> "CacheConfig":
        """The cache Self-Forcing / LongLive run (``CausalWanSelfAttention`` with a ``kv_cache``),
        in frames: ``chunk_frames = num_frame_per_block``, ``sink_frames = sink_size``,
        ``recent_frames = local_attn_size - sink_size - num_frame_per_block`` (their cache holds
        ``local_attn_size`` frames *including* the sink and the chunk being denoised, and evicts
        the oldest frames after the sink, frame by frame), ``positions="absolute"``, no mid
        memory. ``overrides``: any other field (``max_frames_rope=...``, ``mid_blocks=...``).

        ``local_attn_size = -1`` (global attention) is refused with a ``ValueError``: Self-Forcing
        then sizes its cache for 32760 tokens (21 frames at 1560 tokens a frame) and cannot go
        past it, which is no bounded window; pass the frame count to attend instead (e.g. 21, or
        the length of the video)."""
        for v, name in ((num_frame_per_block, "num_frame_per_block"), (sink_size, "sink_size")):
            checks.positive_int(v, name, minimum=1 if name == "num_frame_per_block" else 0)
        if isinstance(local_attn_size, bool) or not isinstance(local_attn_size, int):
            checks.fail_type(f"local_attn_size must be an int, got {local_attn_size!r}")
        if local_attn_size == -1:
            raise ValueError(
                "local_attn_size=-1 is Self-Forcing's global attention (its cache is sized for "
                "32760 tokens, 21 frames at 1560 tokens a frame, and cannot go past them): a bounded "
                "cache needs a window, so pass local_attn_size = the frames to attend (21 "
                "reproduces Self-Forcing's own limit; the video's length attends all of it)")
        recent = local_attn_size - sink_size - num_frame_per_block
        if local_attn_size < 1 or recent < 0:
            raise ValueError(
                f"local_attn_size ({local_attn_size}) must be -1 or hold sink_size ({sink_size}) + "
                f"num_frame_per_block ({num_frame_per_block}) frames")
        fields = dict(chunk_frames=num_frame_per_block, sink_frames=sink_size,
                      recent_frames=recent, mid_blocks=0, top_k=None, positions="absolute")
        fields.update(overrides)
        return cls(**fields)

    @property
    def active_blocks(self) -> int:
        """Mid blocks attended per chunk (at most)."""
        return self.mid_blocks if self.top_k is None else min(self.top_k, self.mid_blocks)

    @property
    def window_frames(self) -> int:
        """Full-resolution frames a chunk attends once the cache is full (Self-Forcing's
        ``local_attn_size``): sink + recent + the chunk itself."""
        return self.sink_frames + self.recent_frames + self.chunk_frames

    @property
    def max_position(self) -> int:
        """The largest temporal position the cache gives a key or query: with ``"relative"``
        ``sink + active_mid*chunk + recent + chunk - 1``; with ``"absolute"`` positions grow up
        to the table's last row before each rebase, ``max_frames_rope - 1``."""
        if self.positions == "absolute":
            return self.max_frames_rope - 1
        return (self.sink_frames + self.active_blocks * self.chunk_frames + self.recent_frames
                + self.chunk_frames - 1)


def check_layer(layer, num_layers: int) -> None:
    """A cache's ``attend(layer, ...)``: a layer the cache was built for."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, num_layers = {num_layers}), got {layer!r}")
