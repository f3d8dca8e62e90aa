"""The arithmetic of the Wan2.1 3D RoPE (docs/spec.md §3) shared by the reference, the Triton
backend and the compressors: band sizes, float64 angles, and the pair rotation. The C++ bindings
build the same tables in csrc/rope3d_common.h."""

from __future__ import annotations

import torch


def rope_bands(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs of the temporal, height and width bands (D=128: 22, 21, 21)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def band_omega(n: int, theta, device=None) -> torch.Tensor:
    """theta ** (-2 p / (2 n)) for p < n in float64: [n], or [H, n] for a per-head theta tensor."""
    # n == 0 (a band with no pairs, D = 2 or 4) is an empty table, not a division by zero.
    expo = torch.arange(n, dtype=torch.float64, device=device) * (-2.0 / (2 * n) if n else 0.0)
    if isinstance(theta, torch.Tensor):
        return theta.to(device, torch.float64)[:, None] ** expo[None, :]
    return float(theta) ** expo


def temporal_angles(pos: torch.Tensor, c_t: int, theta, t_theta) -> torch.Tensor:
    """Angles [N, Ht, c_t] of the temporal band at float64 positions ``pos`` [N]
    (Ht = H with a per-head ``t_theta``, else 1)."""
    om = band_omega(c_t, theta if t_theta is None else t_theta, pos.device)
    return pos[:, None, None] * (om[None, None, :] if om.dim() == 1 else om[None])


def cos_sin(angle: torch.Tensor) -> torch.Tensor:
    """(cos, sin) interleaved in a new last dim, float32 (rounded once from float64)."""
    return torch.stack([angle.cos(), angle.sin()], dim=-1).float().contiguous()


def rotate_pairs(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotates the adjacent pairs of ``x`` [..., 2n] by ``angle`` (float64, broadcastable to
    [..., n]) in float32 (float64 for float64 input); returns x's dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = x.to(cdt).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(angle).to(cdt), torch.sin(angle).to(cdt)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def rope_angles(grid, head_dim, frame_offset=0.0, theta=10000.0, t_theta=None, device=None) -> torch.Tensor:
    """Float64 rotation angles [L, Ht, D/2] of every token of the frame-major ``grid`` (F, h, w)
    (Ht = H with ``t_theta``, else 1)."""
    F, h, w = grid
    c_t, c_h, c_w = rope_bands(head_dim)
    i = torch.arange(F * h * w, device=device)
    t = (i // (h * w)).double() + float(frame_offset)
    y = ((i % (h * w)) // w).double()
    x = (i % w).double()
    ang_t = temporal_angles(t, c_t, theta, t_theta)
    ang_hw = torch.cat([y[:, None] * band_omega(c_h, theta, device)[None],
                        x[:, None] * band_omega(c_w, theta, device)[None]], dim=-1)
    ang_hw = ang_hw[:, None, :].expand(-1, ang_t.shape[1], -1)
    return torch.cat([ang_t, ang_hw], dim=-1)
