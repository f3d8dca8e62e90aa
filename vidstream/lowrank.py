"""Public low-rank (latent) KV cache ops (SPEC §4). Reference backend only, until the kernels
of the low-rank issue land."""

from __future__ import annotations

import torch

from . import _validate, backend, reference


def lowrank_decompress(c_pool: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, kv_ranges,
                       k_r_pool: torch.Tensor | None = None):
    """K [B, N, H, d_nope + d_r] and V [B, N, H, d_v] of the tokens in ``kv_ranges`` (in range
    order) from the latent pool ``c_pool`` [B, P, d_c] and the shared positional keys
    ``k_r_pool`` [B, P, d_r]."""
    host = _validate.lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    return backend.resolve("lowrank_decompress", c_pool)(c_pool, w_uk, w_uv, host, k_r_pool)


def lowrank_cached_attention(q: torch.Tensor, c_pool: torch.Tensor, w_uk: torch.Tensor,
                             w_uv: torch.Tensor, kv_ranges, *, k_r_pool: torch.Tensor | None = None,
                             scale: float | None = None, return_lse: bool = False):
    """``cached_attention`` of ``q`` [B, Lq, H, d_nope + d_r] over the decompressed latent cache;
    returns ``out`` [B, Lq, H, d_v]."""
    host = _validate.lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    _validate.lowrank_query(q, c_pool, w_uk, w_uv, k_r_pool)
    scale = _validate.scale_value(scale, q.shape[3])
    return backend.resolve("lowrank_cached_attention", q)(
        q, c_pool, w_uk, w_uv, host, k_r_pool, scale, return_lse)


backend.register("lowrank_decompress", "reference", reference._lowrank_decompress)
backend.register("lowrank_cached_attention", "reference", reference._lowrank_cached_attention)
