"""The eager PyTorch definition of every op: the oracle all kernels are tested against.

Each function checks its inputs like the public op and computes in the dtype of its inputs
(float64 in, float64 out is the oracle; a float16 input gives what eager PyTorch gives in
float16), except RoPE, whose angles are always formed in float64 and whose products are taken in
float32 (float64 for float64 input), the way Wan2.1 does it. They materialise scores and masks:
small shapes only. The implementations live beside each op in ``vidstream/ops/``; this module
gathers them under the op names.
"""

from __future__ import annotations

from .ops.attention import cached_attention_reference as cached_attention
from .ops.attention import chunk_attention_reference as chunk_attention
from .ops.attention import chunk_mask
from .ops.lowrank import lowrank_cached_attention_reference as lowrank_cached_attention
from .ops.lowrank import lowrank_decompress_reference as lowrank_decompress
from .ops.rope3d import rope3d_reference as rope3d
from .ops.rope3d import rope3d_shift_reference_ as rope3d_shift_
from .ops.rope3d import rope3d_store_reference_ as rope3d_store_
from .ops.rope_math import rope_angles, rope_bands
from .ops.select_blocks import block_scores_reference as block_scores
from .ops.select_blocks import select_blocks_reference as select_blocks
from .ops.select_blocks import topk_ascending

__all__ = [
    "block_scores",
    "cached_attention",
    "chunk_attention",
    "chunk_mask",
    "lowrank_cached_attention",
    "lowrank_decompress",
    "rope3d",
    "rope3d_shift_",
    "rope3d_store_",
    "rope_angles",
    "rope_bands",
    "select_blocks",
    "topk_ascending",
]
