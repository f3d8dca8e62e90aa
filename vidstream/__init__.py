"""vidstream: fused kernels and a bounded KV cache for streaming video diffusion transformers.

The ops follow the contract in SPEC.md. Each has a ``reference`` (eager PyTorch) backend and,
where written, ``cpu`` (C++), ``triton`` and ``cuda`` kernels; see ``vidstream.backends()`` and
``vidstream.use_backend``."""

from . import _extension, compress, reference, selection
from .attention import cached_attention, chunk_attention
from .backend import backend_for, backends, use_backend
from .cache import AvgPoolCompressor, CacheConfig, NaiveKVCache, StreamingKVCache
from .kv_store import rope3d_store_
from .lowrank import lowrank_cached_attention, lowrank_decompress
from .lowrank_kv import LowRankKV
from .model import DiTConfig, FullSequenceAttention, StreamingDiT
from .pipeline import StreamingGenerator
from .rope import rope3d, rope3d_shift_
from .selection import select_blocks

__version__ = "0.1.0"

_extension.load()

__all__ = [
    "AvgPoolCompressor",
    "CacheConfig",
    "DiTConfig",
    "FullSequenceAttention",
    "NaiveKVCache",
    "StreamingDiT",
    "StreamingGenerator",
    "StreamingKVCache",
    "LowRankKV",
    "backend_for",
    "backends",
    "cached_attention",
    "chunk_attention",
    "compress",
    "lowrank_cached_attention",
    "lowrank_decompress",
    "reference",
    "rope3d",
    "rope3d_shift_",
    "rope3d_store_",
    "select_blocks",
    "selection",
    "use_backend",
]
