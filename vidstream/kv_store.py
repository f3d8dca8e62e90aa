"""The streaming cache's write (SPEC §6): ``rope3d_store_`` rotates a chunk's keys by the 3D RoPE
at given temporal positions and writes keys and values into their pool slots in one pass, instead
of ``rope3d`` followed by two index copies."""

from __future__ import annotations

import torch

from . import _extension, _validate, backend, reference


def rope3d_store_(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  frame_slots, frame_pos, *, grid, theta: float = 10000.0,
                  t_theta: torch.Tensor | None = None):
    """In place: ``k`` [B, L, H_kv, D] on the token ``grid`` (F, h, w), frame ``f`` at temporal
    position ``frame_pos[f]`` (float, any value), is rotated by the Wan2.1 3D RoPE and written with
    ``v`` [B, L, H_kv, Dv] to pool tokens ``[frame_slots[f], frame_slots[f] + h*w)`` of ``k_pool``
    [B, P, H_kv, D] and ``v_pool`` [B, P, H_kv, Dv]. Slots must lie in the pool and not overlap.
    Equals ``rope3d(k, grid=grid, frame_offset=a)`` written frame by frame when
    ``frame_pos = a + arange(F)``. Returns ``(k_pool, v_pool)``."""
    slots, pos = _validate.rope3d_store(k_pool, v_pool, k, v, frame_slots, frame_pos, grid, t_theta,
                                     theta)
    backend.resolve("rope3d_store_", k_pool)(k_pool, v_pool, k, v, slots, pos, tuple(grid),
                                             theta, t_theta)
    return k_pool, v_pool


def _rope3d_store_native(k_pool, v_pool, k, v, slots, pos, grid, theta, t_theta):
    torch.ops.vidstream.rope3d_store_(k_pool, v_pool, k, v, slots, pos, grid[1], grid[2],
                                      float(theta), t_theta)


def _rope3d_store_triton(k_pool, v_pool, k, v, slots, pos, grid, theta, t_theta):
    from .triton_kernels import kv_store as kernels

    kernels.rope3d_store_triton_(k_pool, v_pool, k, v, slots.to(k_pool.device), pos, grid[1],
                                 grid[2], float(theta), t_theta)


@_extension.register_fake("rope3d_store_")
def _rope3d_store_fake(k_pool, v_pool, k, v, frame_slots, frame_pos, height, width, theta=10000.0,
                       t_theta=None):
    return None


backend.register("rope3d_store_", "reference", reference._rope3d_store_)
backend.register("rope3d_store_", "cpu", _rope3d_store_native)
backend.register("rope3d_store_", "cuda", _rope3d_store_native)
backend.register("rope3d_store_", "triton", _rope3d_store_triton)
