"""vidstream: fused kernels and a bounded KV cache for streaming video diffusion transformers.

The ops follow the contract in docs/spec.md. Each has a ``reference`` (eager PyTorch) backend
and, where written, ``cpu`` (C++), ``triton`` and ``cuda`` kernels; see ``vidstream.backends()``,
``vidstream.default_backends()`` and ``vidstream.use_backend``. The streaming layer (cache, model,
generator) is in ``vidstream.streaming``; its main classes are also importable from here."""

from __future__ import annotations

import importlib

from . import _compat, _extension, reference
from .backend import backend_for, backends, default_backends, use_backend
from .ops.attention import cached_attention, chunk_attention
from .ops.lowrank import lowrank_cached_attention, lowrank_decompress
from .ops.metadata import FrameSlots, RangeDeltas, TokenRanges
from .ops.rope3d import rope3d, rope3d_shift_, rope3d_store_
from .ops.select_blocks import select_blocks

# The one place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic]).
__version__ = "0.1.0"

# The streaming layer is imported on first use: the ops alone do not pay for the model code.
_STREAMING = {
    "AvgPoolCompressor": "compressors",
    "PoolCompressor": "compressors",
    "CacheConfig": "config",
    "DiTConfig": "model",
    "FullSequenceAttention": "full_sequence",
    "LowRankKV": "lowrank_kv",
    "NaiveKVCache": "naive_cache",
    "StreamingDiT": "model",
    "StreamingGenerator": "generator",
    "StreamingKVCache": "bounded_cache",
    "from_self_forcing_config": "self_forcing",
}


def __getattr__(name):
    if name == "streaming":
        return importlib.import_module(".streaming", __name__)
    if name in _STREAMING:
        return getattr(importlib.import_module(f".streaming.{_STREAMING[name]}", __name__), name)
    raise AttributeError(f"module 'vidstream' has no attribute {name!r}")


_compat.install()
_extension.load()

__all__ = [
    *sorted(_STREAMING),
    "FrameSlots",
    "RangeDeltas",
    "TokenRanges",
    "backend_for",
    "backends",
    "cached_attention",
    "chunk_attention",
    "default_backends",
    "lowrank_cached_attention",
    "lowrank_decompress",
    "reference",
    "rope3d",
    "rope3d_shift_",
    "rope3d_store_",
    "select_blocks",
    "use_backend",
]
