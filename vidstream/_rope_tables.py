"""Float64 rotation angles of the Wan2.1 3D RoPE (SPEC §3), shared by the reference and the
Triton backend (the C++ bindings build the same tables in csrc/rope3d_common.h)."""

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
