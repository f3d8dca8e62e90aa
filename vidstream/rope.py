"""Public 3D RoPE ops (SPEC §3): ``rope3d`` and the in-place temporal re-rotation
``rope3d_shift_`` that keeps cached positions bounded without recomputing keys."""

from __future__ import annotations

import torch

from . import _extension, _validate, backend, reference


def rope3d(x: torch.Tensor, *, grid, frame_offset=0, theta: float = 10000.0,
           t_theta: torch.Tensor | None = None) -> torch.Tensor:
    """Wan2.1 3D rotary embedding of ``x`` [B, L, H, D] whose tokens lie on the frame-major
    ``grid`` = (F, h, w); token frames are ``frame_offset + t``. ``t_theta`` [H] gives each head
    its own temporal theta. Returns a new tensor."""
    _validate.rope3d(x, grid, t_theta, theta, frame_offset)
    return backend.resolve("rope3d", x)(x, tuple(grid), frame_offset, theta, t_theta)


def rope3d_shift_(k_pool: torch.Tensor, ranges, delta_frames, *, theta: float = 10000.0,
                  t_theta: torch.Tensor | None = None) -> torch.Tensor:
    """In place: multiply the temporal pairs of every token of ``ranges[r]`` by
    ``exp(i * delta_frames[r] * omega_t)``, moving those keys by ``delta_frames[r]`` frames.
    Height/width channels and tokens outside the ranges are left untouched. Returns ``k_pool``."""
    host_ranges, delta = _validate.rope3d_shift(k_pool, ranges, delta_frames, t_theta, theta)
    backend.resolve("rope3d_shift_", k_pool)(k_pool, host_ranges, delta, theta, t_theta)
    return k_pool


def _rope3d_native(x, grid, frame_offset, theta, t_theta):
    return torch.ops.vidstream.rope3d(x, *grid, float(frame_offset), float(theta), t_theta)


def _rope3d_shift_native(k_pool, ranges, delta, theta, t_theta):
    torch.ops.vidstream.rope3d_shift_(k_pool, ranges, delta, float(theta), t_theta)


def _rope3d_triton(x, grid, frame_offset, theta, t_theta):
    from .triton_kernels import rope3d as kernels

    return kernels.rope3d_triton(x, *grid, float(frame_offset), float(theta), t_theta)


def _rope3d_shift_triton(k_pool, ranges, delta, theta, t_theta):
    from .triton_kernels import rope3d as kernels

    max_len = int((ranges[:, 1] - ranges[:, 0]).max()) if ranges.shape[0] else 0
    kernels.rope3d_shift_triton_(k_pool, ranges.to(k_pool.device), delta, float(theta), t_theta,
                                 max_len)


@_extension.register_fake("rope3d")
def _rope3d_fake(x, frames, height, width, frame_offset=0.0, theta=10000.0, t_theta=None):
    return torch.empty_like(x)


@_extension.register_fake("rope3d_shift_")
def _rope3d_shift_fake(k_pool, ranges, delta_frames, theta=10000.0, t_theta=None):
    return None


backend.register("rope3d", "reference", reference._rope3d)
backend.register("rope3d", "cpu", _rope3d_native)
backend.register("rope3d", "cuda", _rope3d_native)
backend.register("rope3d", "triton", _rope3d_triton)
backend.register("rope3d_shift_", "reference", reference._rope3d_shift_)
backend.register("rope3d_shift_", "cpu", _rope3d_shift_native)
backend.register("rope3d_shift_", "cuda", _rope3d_shift_native)
backend.register("rope3d_shift_", "triton", _rope3d_shift_triton)
