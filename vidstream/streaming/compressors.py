"""Mid-block compressors: what the streaming cache calls when a block leaves the recent window,
and the helpers the caches call them through.

A compressor takes the K and V of one full-resolution block, ``k`` [B, F*h*w, H_kv, D] and
``v`` [B, F*h*w, H_kv, Dv] on the frame-major token grid ``(F, h, w)`` (docs/spec.md conventions), and
returns ``mid_tokens(grid)`` tokens of K and V on the pooled grid ``out_grid(grid)``, also
frame-major. The default factors (2, 4, 4) halve time and quarter each spatial side with floor:
PackForcing's 4-frame block at 30 x 52 tokens per frame goes from 6,240 tokens to
2 x 7 x 13 = 182. Tokens past the last whole cell (an odd frame, rows or columns beyond a
multiple of 4) are dropped, as floor implies.

RoPE. Cached keys carry the 3D rotary embedding (docs/spec.md §3) at their own positions. Averaging
rotated keys would average vectors turned by different angles: the fastest pair of each band
turns by one radian per frame, row or column, so its content largely cancels and the average
has no well-defined position. So a compressor (with ``rotated=True``, the default):

1. un-rotates each key at its own position (the rotation is orthogonal: exact up to rounding),
2. compresses the position-free content,
3. rotates each output key at its *cell centre*: the mean position of the tokens it pooled,
   ``t = frame_offset + ft*t' + (ft-1)/2``, ``y = fh*y' + (fh-1)/2``, ``x = fw*x' + (fw-1)/2``
   (fractional; RoPE angles are linear in position, so any real position is valid).

With that choice a query at position p sees a mid key whose relative offset to it is the offset
to the centroid of the pooled tokens, in the same coordinates as the full-resolution sink and
recent tokens; and the cache's temporal re-rotation ``rope3d_shift_`` moves mid keys exactly as
it moves full-resolution ones (tested). Pooling pre-RoPE keys would need the cache to keep a
second, unrotated copy of K; un-rotating costs one extra rotation per compressed token instead.
``frame_offset`` is the temporal RoPE position at which the block's first frame was rotated (a
float after shifts). Values carry no RoPE and are compressed as they are.

``PoolCompressor`` is training-free (mean over each cell). ``ConvCompressor`` is a small 3D-conv
stack (PackForcing's high-resolution branch) users can train; it starts out equal to the pooling
compressor (its last convolution is zero-initialised and added to the pooled result).
``AvgPoolCompressor`` averages the rotated keys as they are (cheaper, approximate RoPE).

The caches call any callable ``compressor(k, v, grid=...) -> (k_c, v_c)`` through
``call_compressor``: it passes the keywords ``frame_offset``, ``theta`` and ``t_theta`` only to
a callable that accepts them (``compressor_keywords``), and ``compressed_tokens`` finds the token
count of a block (``mid_tokens(grid)`` if defined, else by one call). The compressor must return
the same number of tokens for every block, keys rotated so that a temporal shift of ``delta``
moves the whole block by ``delta`` frames.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn

from ..ops import checks
from ..ops.rope3d import rope3d
from ..ops.rope_math import band_omega, rope_bands, rotate_pairs, temporal_angles

__all__ = ["AvgPoolCompressor", "Compressor", "ConvCompressor", "MidCompressor", "PoolCompressor",
           "call_compressor", "compress_block", "compressed_tokens", "compressor_keywords",
           "default_compressor", "pooled_grid", "pooled_positions", "rope_at"]

Compressor = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]

DEFAULT_FACTORS = (2, 4, 4)


def _check_factors(factors) -> tuple[int, int, int]:
    if not (isinstance(factors, (tuple, list)) and len(factors) == 3 and all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factors)):
        raise ValueError(f"factors must be three ints >= 1 (time, height, width), got {factors!r}")
    return tuple(factors)


def pooled_grid(grid, factors=DEFAULT_FACTORS) -> tuple[int, int, int]:
    """The compressed grid ``(F // ft, h // fh, w // fw)``; ``ValueError`` if any side is 0."""
    ft, fh, fw = _check_factors(factors)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 3 and all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be three ints >= 1 (F, h, w), got {grid!r}")
    out = (grid[0] // ft, grid[1] // fh, grid[2] // fw)
    if min(out) == 0:
        raise ValueError(f"grid (F, h, w) = {tuple(grid)} is smaller than one compression cell "
                         f"{(ft, fh, fw)} in some dimension: it would compress to {out}")
    return out


def pooled_positions(grid, factors=DEFAULT_FACTORS, frame_offset: float = 0.0,
                     device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (t, y, x) [N'] of the compressed tokens, frame-major: the centre of each cell."""
    ft, fh, fw = _check_factors(factors)
    Fp, hp, wp = pooled_grid(grid, factors)
    i = torch.arange(Fp * hp * wp, device=device)
    t = (i // (hp * wp)).double() * ft + (ft - 1) / 2 + float(frame_offset)
    y = ((i % (hp * wp)) // wp).double() * fh + (fh - 1) / 2
    x = (i % wp).double() * fw + (fw - 1) / 2
    return t, y, x


def rope_at(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, *,
            theta: float = 10000.0, t_theta: torch.Tensor | None = None) -> torch.Tensor:
    """The docs/spec.md §3 rotation of ``x`` [B, N, H, D] with token n at the (real) position
    ``(t[n], y[n], w[n])``; negated positions undo it."""
    c_t, c_h, c_w = rope_bands(x.shape[3])
    ang_t = temporal_angles(t, c_t, theta, t_theta)  # [N, Ht, c_t]
    ang_hw = torch.cat([y[:, None] * band_omega(c_h, theta, x.device)[None],
                        w[:, None] * band_omega(c_w, theta, x.device)[None]], dim=-1)
    ang = torch.cat([ang_t, ang_hw[:, None, :].expand(-1, ang_t.shape[1], -1)], dim=-1)
    return rotate_pairs(x, ang[None])


def _unrotate(k, grid, frame_offset, theta, t_theta):
    """Undoes ``rope3d(., grid, frame_offset)``. Rotating by -a is conj(rotate(conj(x), a)) with
    conj negating the odd channel of each pair, so the fast ``rope3d`` kernels do the work."""
    sign = torch.ones(k.shape[3], dtype=k.dtype, device=k.device)
    sign[1::2] = -1
    return rope3d(k * sign, grid=tuple(grid), frame_offset=frame_offset, theta=theta,
                  t_theta=t_theta) * sign


class MidCompressor:
    """The interface: ``compressor(k, v, grid=..., frame_offset=..., theta=..., t_theta=...)``
    returns ``(k_mid, v_mid)`` with ``mid_tokens(grid)`` tokens. Subclasses implement
    ``_compress_content(k, v)``: un-rotated inputs cropped to whole cells, [B, F, h, w, H, C]
    in, [B, F', h', w', H, C] out."""

    factors: tuple[int, int, int] = DEFAULT_FACTORS

    def out_grid(self, grid) -> tuple[int, int, int]:
        return pooled_grid(grid, self.factors)

    def mid_tokens(self, grid) -> int:
        Fp, hp, wp = self.out_grid(grid)
        return Fp * hp * wp

    def _compress_content(self, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    def __call__(self, k: torch.Tensor, v: torch.Tensor, *, grid, frame_offset: float = 0.0,
                 theta: float = 10000.0, t_theta: torch.Tensor | None = None,
                 rotated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(k, v, grid, t_theta, rotated)
        grid = tuple(grid)
        Fp, hp, wp = self.out_grid(grid)
        ft, fh, fw = self.factors
        if rotated:
            k = _unrotate(k, grid, frame_offset, theta, t_theta)
        B, _, H, _ = k.shape
        F, h, w = grid

        def cells(z):  # [B, L, H, C] -> [B, F, h, w, H, C] cropped to whole cells (a view)
            return z.reshape(B, F, h, w, H, z.shape[3])[:, : Fp * ft, : hp * fh, : wp * fw]

        kc, vc = self._compress_content(cells(k), cells(v))  # [B, F', h', w', H, C]
        k_mid = kc.reshape(B, Fp * hp * wp, H, kc.shape[-1])
        v_mid = vc.reshape(B, Fp * hp * wp, H, vc.shape[-1])
        if rotated:
            t, y, x = pooled_positions(grid, self.factors, frame_offset, k.device)
            k_mid = rope_at(k_mid, t, y, x, theta=theta, t_theta=t_theta)
        return k_mid, v_mid


def _check_inputs(k, v, grid, t_theta, rotated):
    checks.tensor(k, "k", 4, "[B, F*h*w, H_kv, D]")
    checks.tensor(v, "v", 4, "[B, F*h*w, H_kv, Dv]")
    checks.floating(k, "k")
    checks.same("k", k, "v", v)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have the batch, tokens and heads of k {tuple(k.shape[:3])}, "
                         f"got {tuple(v.shape[:3])}")
    checks.grid3(grid, k.shape[1])
    if rotated:
        checks.rope_input(k, "k")
        checks.t_theta(t_theta, k.shape[2])


def _avg_cells(z: torch.Tensor, factors) -> torch.Tensor:
    """Mean over each (ft, fh, fw) cell of z [B, F, h, w, H, C] (whole cells only), in float32
    (float64 for float64). Splitting dims keeps a view; the sums run along contiguous H*C."""
    B, F, h, w, H, C = z.shape
    ft, fh, fw = factors
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.reshape(B, F // ft, ft, h // fh, fh, w // fw, fw, H, C)
    return z.sum(dim=(2, 4, 6), dtype=acc) / (ft * fh * fw)


class PoolCompressor(MidCompressor):
    """Training-free: each output token is the mean of its cell (RoPE handled as the module
    docstring says). Accumulates in float32 (float64 for float64), returns the input dtype."""

    def __init__(self, factors=DEFAULT_FACTORS):
        self.factors = _check_factors(factors)

    def _compress_content(self, k, v):
        return _avg_cells(k, self.factors).to(k.dtype), _avg_cells(v, self.factors).to(v.dtype)


class _ConvStack(nn.Module):
    """Cell mean plus a learnt correction: conv (1, 2, 2)/2 -> GELU -> conv (ft, fh/2, fw/2),
    both strided like their kernels, so the output lands on the pooled grid exactly."""

    def __init__(self, channels: int, hidden: int, factors):
        super().__init__()
        ft, fh, fw = factors
        self.factors = factors
        self.down = nn.Conv3d(channels, hidden, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.act = nn.GELU(approximate="tanh")
        self.out = nn.Conv3d(hidden, channels, kernel_size=(ft, fh // 2, fw // 2),
                             stride=(ft, fh // 2, fw // 2))
        nn.init.zeros_(self.out.weight)  # starts as the training-free pooling compressor
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [N, C, F, h, w] (whole cells)
        pooled = nn.functional.avg_pool3d(z, self.factors, self.factors)
        return pooled + self.out(self.act(self.down(z)))


class ConvCompressor(nn.Module, MidCompressor):
    """Learnable compressor: one small 3D-conv stack for K and one for V, shared by all heads
    (each head is a batch element, its head dim the channels), so one module serves any head
    count. ``head_dim`` of K, ``v_head_dim`` of V (default ``head_dim``), ``hidden`` channels
    (default ``2 * head_dim``). Spatial factors must be even. Computes in the module's dtype and
    returns the input dtype; move it with ``.to(device)`` like any ``nn.Module``."""

    def __init__(self, head_dim: int, v_head_dim: int | None = None, hidden: int | None = None,
                 factors=DEFAULT_FACTORS):
        nn.Module.__init__(self)
        self.factors = _check_factors(factors)
        if self.factors[1] % 2 or self.factors[2] % 2:
            raise ValueError(f"ConvCompressor needs even spatial factors, got {self.factors}")
        checks.positive_int(head_dim, "head_dim")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        checks.positive_int(v_head_dim, "v_head_dim")
        hidden = 2 * head_dim if hidden is None else hidden
        checks.positive_int(hidden, "hidden")
        self.k_net = _ConvStack(head_dim, hidden, self.factors)
        self.v_net = _ConvStack(v_head_dim, hidden, self.factors)

    def _run(self, net: _ConvStack, z: torch.Tensor) -> torch.Tensor:
        B, F, h, w, H, C = z.shape
        x = z.permute(0, 4, 5, 1, 2, 3).reshape(B * H, C, F, h, w).to(net.out.weight.dtype)
        y = net(x)  # [B*H, C, F', h', w']
        return y.reshape(B, H, C, *y.shape[2:]).permute(0, 3, 4, 5, 1, 2).to(z.dtype)

    def _compress_content(self, k, v):
        if k.shape[-1] != self.k_net.down.in_channels or v.shape[-1] != self.v_net.down.in_channels:
            raise ValueError(f"ConvCompressor was built for head dims (k {self.k_net.down.in_channels}"
                             f", v {self.v_net.down.in_channels}), got (k {k.shape[-1]}, v {v.shape[-1]})")
        return self._run(self.k_net, k), self._run(self.v_net, v)

    def forward(self, k, v, *, grid, frame_offset=0.0, theta=10000.0, t_theta=None,
                rotated=True) -> tuple[torch.Tensor, torch.Tensor]:
        return MidCompressor.__call__(self, k, v, grid=grid, frame_offset=frame_offset, theta=theta,
                                      t_theta=t_theta, rotated=rotated)

    __call__ = nn.Module.__call__


def compress_block(k: torch.Tensor, v: torch.Tensor, *, grid, frame_offset: float = 0.0,
                   compressor: MidCompressor | None = None, theta: float = 10000.0,
                   t_theta: torch.Tensor | None = None,
                   rotated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Compresses one block's ``k`` [B, F*h*w, H_kv, D] and ``v`` [B, F*h*w, H_kv, Dv] on the
    token ``grid`` (F, h, w) with ``compressor`` (default ``PoolCompressor()``: 2x in time, 4x in
    each spatial side, floor). ``rotated``: the keys carry 3D RoPE with the block's first frame at
    temporal position ``frame_offset`` (``theta``/``t_theta`` as in ``rope3d``); compressed keys
    are rotated at their cell centres (module docstring). Returns ``(k_mid, v_mid)``."""
    compressor = PoolCompressor() if compressor is None else compressor
    return compressor(k, v, grid=grid, frame_offset=frame_offset, theta=theta, t_theta=t_theta,
                      rotated=rotated)


class AvgPoolCompressor:
    """Average pooling of a block's K and V over windows of ``time`` frames x ``space`` x
    ``space`` tokens (floor; a factor larger than the grid is clamped to it), of the rotated keys
    as they are. Pooling is linear, so a temporal ``rope3d_shift_`` of the pooled keys equals
    pooling the shifted keys: the block keeps the temporal base position of its first frame. The
    spatial rotation of the pooled keys is the mean of their window's (a training-free
    approximation; ``PoolCompressor`` un-rotates first)."""

    def __init__(self, time: int = 2, space: int = 2):
        if time < 1 or space < 1:
            raise ValueError(f"time and space pooling factors must be >= 1, got {time}, {space}")
        self.time, self.space = time, space

    def _factors(self, grid):
        F, h, w = grid
        return min(self.time, F), min(self.space, h), min(self.space, w)

    def mid_tokens(self, grid) -> int:
        F, h, w = grid
        tf, sh, sw = self._factors(grid)
        return (F // tf) * (h // sh) * (w // sw)

    def __call__(self, k: torch.Tensor, v: torch.Tensor, *, grid) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pool(k, grid), self._pool(v, grid)

    def _pool(self, x, grid):
        F, h, w = grid
        B, L, H, D = x.shape
        cube = x.float().reshape(B, F, h, w, H * D).permute(0, 4, 1, 2, 3)
        pooled = torch.nn.functional.avg_pool3d(cube, self._factors(grid))
        return pooled.permute(0, 2, 3, 4, 1).reshape(B, -1, H, D).to(x.dtype)


def default_compressor() -> MidCompressor:
    """The caches' compressor when none is given: ``PoolCompressor()`` (RoPE-aware pooling)."""
    return PoolCompressor()


_OPTIONAL_KEYWORDS = frozenset({"frame_offset", "theta", "t_theta"})


def compressor_keywords(compressor) -> frozenset:
    """The optional keywords (frame_offset, theta, t_theta) ``compressor`` accepts."""
    try:
        params = inspect.signature(compressor).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return _OPTIONAL_KEYWORDS
    return _OPTIONAL_KEYWORDS & frozenset(params)


def call_compressor(compressor, keywords, k, v, grid, frame_offset, theta,
                    t_theta) -> tuple[torch.Tensor, torch.Tensor]:
    """``compressor(k, v, grid=...)`` with those of frame_offset / theta / t_theta that it takes
    (``keywords``, from ``compressor_keywords``: inspected once per cache, not per block)."""
    extra = {"frame_offset": float(frame_offset), "theta": theta, "t_theta": t_theta}
    return compressor(k, v, grid=tuple(grid), **{n: extra[n] for n in keywords})


def checked_compressor(compressor, config, frame_shape) -> Compressor:
    """``compressor`` (default ``default_compressor()``), refused at construction where it cannot
    compress one chunk: what would otherwise fail the first time a chunk leaves the window."""
    compressor = default_compressor() if compressor is None else compressor
    if config.mid_blocks:
        grid = (config.chunk_frames, *frame_shape)
        try:
            compressed_tokens(compressor, grid)
        except ValueError as e:
            raise ValueError(f"mid_blocks = {config.mid_blocks} needs a compressor that compresses "
                             f"one chunk of chunk_frames = {config.chunk_frames} frames on the "
                             f"{frame_shape[0]} x {frame_shape[1]} token grid, and "
                             f"{type(compressor).__name__} cannot: {e}") from None
    return compressor


def compressed_tokens(compressor, grid) -> int:
    """Tokens ``compressor`` makes of one block on ``grid``: ``mid_tokens(grid)`` where it says,
    else found by one call on zeros."""
    if hasattr(compressor, "mid_tokens"):
        return int(compressor.mid_tokens(grid))
    dummy = torch.zeros(1, math.prod(grid), 1, 2)
    out = call_compressor(compressor, compressor_keywords(compressor), dummy, dummy, grid, 0.0,
                          10000.0, None)
    return int(out[0].shape[1])
