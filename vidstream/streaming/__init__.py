"""The streaming layer (docs/spec.md §6), one job per module: ``config`` (``CacheConfig``),
``bounded_cache`` (``StreamingKVCache``), ``naive_cache`` (``NaiveKVCache``, the baseline),
``compressors`` (mid-block compressors), ``model`` (``StreamingDiT``), ``full_sequence``
(``FullSequenceAttention``, the whole-video oracle), ``lowrank_kv`` (``LowRankKV``),
``generator`` (``StreamingGenerator``), ``loading`` (checkpoints and diffusers models into
``StreamingDiT``), ``self_forcing`` (``from_self_forcing_config``) and ``runner`` (one timed
streaming run)."""

from .bounded_cache import ChunkState, StreamingKVCache
from .compressors import AvgPoolCompressor, ConvCompressor, MidCompressor, PoolCompressor, default_compressor
from .config import CacheConfig
from .full_sequence import FullSequenceAttention
from .generator import StreamingGenerator, warp_timesteps
from .lowrank_kv import LowRankKV
from .model import PRESETS, DiTConfig, StreamingDiT
from .naive_cache import NaiveKVCache
from .runner import ChunkRecord, StreamRun, run_stream
from .self_forcing import from_self_forcing_config

__all__ = [
    "PRESETS",
    "AvgPoolCompressor",
    "CacheConfig",
    "ChunkRecord",
    "ChunkState",
    "ConvCompressor",
    "DiTConfig",
    "FullSequenceAttention",
    "LowRankKV",
    "MidCompressor",
    "NaiveKVCache",
    "PoolCompressor",
    "StreamRun",
    "StreamingDiT",
    "StreamingGenerator",
    "StreamingKVCache",
    "default_compressor",
    "from_self_forcing_config",
    "run_stream",
    "warp_timesteps",
]
