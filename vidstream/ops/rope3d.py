"""The 3D RoPE ops (docs/spec.md §3, §6): ``rope3d``; the in-place temporal re-rotation
``rope3d_shift_``, which moves cached keys without recomputing them; and ``rope3d_store_``, the
streaming cache's write (rotate a chunk's keys at given frame positions and write keys and values
into their pool slots in one pass, instead of ``rope3d`` and two index copies).

Each op: its public function, its input checks, its eager reference, the fake of its C++ op and
its registrations. Kernels: ``csrc/{cpu,cuda}/rope3d*.cpp``, ``csrc/kernels/rope3d*``,
``triton_kernels/rope3d*.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _extension, backend
from . import checks
from .metadata import FrameSlots, TokenRanges
from .rope_math import rope_angles, rope_bands, rotate_pairs, temporal_angles

ROPE3D = backend.op("rope3d")
ROPE3D_SHIFT = backend.op("rope3d_shift_")
ROPE3D_STORE = backend.op("rope3d_store_")


# ----------------------------------------------------------------------------- public ops


def rope3d(x: torch.Tensor, *, grid, frame_offset=0, theta: float = 10000.0,
           t_theta: torch.Tensor | None = None) -> torch.Tensor:
    """Wan2.1's 3D rotary position embedding (RoPE) of ``x``; returns a new tensor like ``x``.

    Args:
        x: ``[B, L, H, D]`` queries or keys, ``D`` even (tokens before heads; from
            ``[B, H, L, D]`` pass ``x.transpose(1, 2)``).
        grid: ``(F, h, w)``, the frames and the latent grid of one frame, ``F * h * w == L``;
            tokens are frame-major (frame, then row, then column).
        frame_offset: the temporal position of the first frame (token ``i`` sits at frame
            ``frame_offset + i // (h * w)``); any finite number.
        theta: the RoPE base (10000 for Wan2.1).
        t_theta: None, or a float tensor ``[H]`` of per-head bases for the temporal channels
            (LoL's multi-head RoPE jitter).

    The ``D / 2`` adjacent channel pairs are split into a temporal, a height and a width band
    (for ``D = 128``: 22, 21, 21 pairs) and each pair is rotated by its position times the
    band's frequency; angles in float64, products in float32. Definition and band table:
    docs/spec.md §3."""
    _check_rope3d(x, grid, t_theta, theta, frame_offset)
    fn = ROPE3D.resolve(x, backend.needs_grad(x))
    return fn(checks.rows_contiguous(x), tuple(grid), frame_offset, theta, t_theta)


def rope3d_shift_(k_pool: torch.Tensor, ranges, delta_frames, *, theta: float = 10000.0,
                  t_theta: torch.Tensor | None = None) -> torch.Tensor:
    """In place: moves the cached keys of each token range by ``delta_frames[r]`` frames in time,
    without recomputing them (rotations compose: ``rope3d_shift_(rope3d(x, frame_offset=a), ...,
    [d])`` equals ``rope3d(x, frame_offset=a + d)`` up to rounding). Returns ``k_pool``.

    Args:
        k_pool: ``[B, P, H, D]`` keys already rotated by ``rope3d``; modified in place.
        ranges: ``[R, 2]`` token ranges (int tensor, ``(start, end)`` pairs or prepared
            ``TokenRanges``; in bounds, disjoint).
        delta_frames: a number for every range, or ``R`` numbers (any finite value, negative
            too).
        theta, t_theta: as given to ``rope3d``.

    Only the temporal channels of the tokens in the ranges are written; the height and width
    channels and every other token stay bit-identical. Definition: docs/spec.md §3."""
    rng, delta = _check_rope3d_shift(k_pool, ranges, delta_frames, t_theta, theta)
    fn = ROPE3D_SHIFT.resolve(k_pool, backend.needs_grad(k_pool))
    with checks.written_in_place(k_pool) as pool:
        fn(pool, rng, delta, theta, t_theta)
    return k_pool


def rope3d_store_(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  frame_slots, frame_pos=None, *, grid, theta: float = 10000.0,
                  t_theta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: a streaming cache's write. Rotates a chunk's keys by the Wan2.1 3D RoPE at the
    given frame positions and writes them, with the values, into their pool slots in one pass
    (instead of ``rope3d`` and two index copies). Returns ``(k_pool, v_pool)``.

    Args:
        k_pool, v_pool: the pools ``[B, P, H_kv, D]`` and ``[B, P, H_kv, Dv]``, written in place.
        k, v: the chunk ``[B, L, H_kv, D]`` and ``[B, L, H_kv, Dv]`` on the token ``grid``, keys
            not yet rotated.
        frame_slots: ``[F]`` pool token where each frame's ``h * w`` tokens go (int tensor or
            list; in the pool, not overlapping), or prepared ``FrameSlots`` that carry the
            positions too (then ``frame_pos`` is None).
        frame_pos: ``[F]`` temporal positions of the frames (floats, any finite value).
        grid: ``(F, h, w)`` with ``F * h * w == L``.
        theta, t_theta: as for ``rope3d``.

    Equals ``rope3d(k, grid=grid, frame_offset=a)`` written frame by frame when
    ``frame_pos = a + arange(F)``. Definition: docs/spec.md §6 (``rope3d_store_``)."""
    slots = _check_rope3d_store(k_pool, v_pool, k, v, frame_slots, frame_pos, grid, t_theta, theta)
    fn = ROPE3D_STORE.resolve(k_pool, backend.needs_grad(k_pool, v_pool, k, v))
    k, v = (checks.apart_from(checks.rows_contiguous(t), k_pool, v_pool) for t in (k, v))
    with checks.written_in_place(k_pool) as kp, checks.written_in_place(v_pool) as vp:
        fn(kp, vp, k, v, slots, tuple(grid), theta, t_theta)
    return k_pool, v_pool


# ----------------------------------------------------------------------------- input checks


@checks.layout_hint(x="[B, L, H, D]")
def _check_rope3d(x, grid, tt, theta, frame_offset):
    checks.rope_input(x, "x")
    checks.grid3(grid, x.shape[1])
    checks.t_theta(tt, x.shape[2])
    checks.rope_params(theta, frame_offset)


@checks.layout_hint(k_pool="[B, P, H, D]")
def _check_rope3d_shift(k_pool, rng, delta_frames, tt, theta) -> tuple[TokenRanges, torch.Tensor]:
    """(ranges on k_pool's device, delta_frames float64 [R] on the CPU)."""
    checks.rope_input(k_pool, "k_pool")
    checks.writable(k_pool, "k_pool")
    rng = checks.ranges(rng, k_pool.shape[1], "ranges", k_pool.device)
    delta = checks.positions(delta_frames, len(rng), "delta_frames", "R")
    checks.t_theta(tt, k_pool.shape[2])
    checks.rope_params(theta)
    return rng, delta


@checks.layout_hint(k_pool="[B, P, H_kv, D]", v_pool="[B, P, H_kv, Dv]", k="[B, L, H_kv, D]",
                    v="[B, L, H_kv, Dv]")
def _check_rope3d_store(k_pool, v_pool, k, v, frame_slots, frame_pos, grid, tt, theta) -> FrameSlots:
    checks.rope_input(k_pool, "k_pool")
    checks.rope_input(k, "k")
    checks.tensor(v_pool, "v_pool", 4, "[B, P, H_kv, Dv]")
    checks.tensor(v, "v", 4, "[B, L, H_kv, Dv]")
    for name, t in (("v_pool", v_pool), ("k", k), ("v", v)):
        checks.same("k_pool", k_pool, name, t)
    if k.shape[0] != k_pool.shape[0] or v.shape[0] != k_pool.shape[0] or v_pool.shape[0] != k_pool.shape[0]:
        checks.fail(f"batch sizes differ: k_pool {k_pool.shape[0]}, v_pool {v_pool.shape[0]}, "
                    f"k {k.shape[0]}, v {v.shape[0]}")
    if tuple(k.shape[2:]) != tuple(k_pool.shape[2:]):
        checks.fail(f"k must have the heads and head dim of k_pool {tuple(k_pool.shape[2:])}, "
                    f"got {tuple(k.shape[2:])}")
    if tuple(v_pool.shape[1:3]) != tuple(k_pool.shape[1:3]):
        checks.fail(f"v_pool must have the tokens and heads of k_pool {tuple(k_pool.shape[1:3])}, "
                    f"got {tuple(v_pool.shape[1:3])}")
    if v.shape[1] != k.shape[1] or tuple(v.shape[2:]) != tuple(v_pool.shape[2:]):
        checks.fail(f"v must have shape [B, L={k.shape[1]}, {v_pool.shape[2]}, {v_pool.shape[3]}], "
                    f"got {tuple(v.shape)}")
    checks.grid3(grid, k.shape[1])
    checks.t_theta(tt, k.shape[2])
    checks.rope_params(theta)
    checks.writable(k_pool, "k_pool")
    checks.writable(v_pool, "v_pool")
    checks.disjoint_outputs(k_pool, "k_pool", v_pool, "v_pool")
    F, h, w = grid
    if isinstance(frame_slots, FrameSlots):
        return _prepared_slots(frame_slots, frame_pos, F, h * w, k_pool)
    if isinstance(frame_slots, torch.Tensor):
        if (frame_slots.dim() != 1 or frame_slots.shape[0] != F or frame_slots.is_floating_point()
                or frame_slots.is_complex() or frame_slots.dtype == torch.bool):
            checks.fail(f"frame_slots must be an int tensor [F] = [{F}], got "
                        f"{tuple(frame_slots.shape)} {frame_slots.dtype}")
        if frame_slots.device.type == "meta":
            checks.fail("frame_slots must hold values (a CPU or CUDA tensor, or a list), got a meta "
                        "tensor")
        if torch.compiler.is_compiling():
            return _traced_slots(frame_slots, frame_pos, F, h * w, k_pool)
        host = frame_slots.detach().to("cpu", torch.int64).tolist()
    else:
        if not isinstance(frame_slots, Sequence) or isinstance(frame_slots, (str, bytes)):
            checks.fail_type(f"frame_slots must be an int tensor [F] = [{F}], a list of ints or "
                             f"FrameSlots, got {type(frame_slots).__name__}")
        host = list(frame_slots)
        if any(isinstance(s, bool) or not isinstance(s, int) for s in host):
            checks.fail_type(f"frame_slots must be ints, got {host!r}")
        if len(host) != F:
            checks.fail(f"frame_slots must be an int tensor [F] = [{F}], got {len(host)} slots")
    if frame_pos is None:
        checks.fail("frame_pos must be given (float [F]) unless frame_slots are prepared FrameSlots")
    pos = checks.positions(frame_pos, F, "frame_pos", "F")
    hw = h * w
    for i, s in enumerate(host):  # Python ints: checked before any cast can wrap them
        if not 0 <= s <= k_pool.shape[1] - hw:
            checks.fail(f"frame_slots[{i}] = {s} must satisfy 0 <= slot and slot + h*w ({hw}) "
                        f"<= {k_pool.shape[1]}")
    srt = sorted(host)
    if any(b - a < hw for a, b in zip(srt, srt[1:])):
        checks.fail(f"frame_slots must not overlap: two slots are closer than h*w = {hw}: {host}")
    return FrameSlots(torch.tensor(host, dtype=torch.int32).to(k_pool.device), tuple(host), pos)


def _traced_slots(frame_slots, frame_pos, frames: int, hw: int, k_pool) -> FrameSlots:
    """Under torch.compile: the slot checks as asserts in the graph (values unknown here)."""
    if frame_pos is None:
        checks.fail("frame_pos must be given (float [F]) unless frame_slots are prepared FrameSlots")
    pos = checks.positions(frame_pos, frames, "frame_pos", "F")
    s = frame_slots.to(k_pool.device, torch.int64)
    torch._assert_async(((s >= 0) & (s <= k_pool.shape[1] - hw)).all(),
                        f"frame_slots: every slot must satisfy 0 <= slot and slot + h*w ({hw}) <= "
                        f"{k_pool.shape[1]}")
    srt = torch.sort(s).values
    torch._assert_async((srt[1:] - srt[:-1] >= hw).all(),
                        f"frame_slots must not overlap: slots closer than h*w = {hw}")
    return FrameSlots(s.to(torch.int32).contiguous(), None, pos)


def _prepared_slots(s: FrameSlots, frame_pos, frames: int, hw: int, k_pool) -> FrameSlots:
    if frame_pos is not None:
        checks.fail("frame_pos must be None when frame_slots are prepared FrameSlots (they carry "
                    "the positions)")
    if len(s) != frames:
        checks.fail(f"frame_slots must have one slot per frame ([F] = [{frames}]), got {len(s)}")
    if s.tensor.device != k_pool.device:
        checks.fail(f"frame_slots (prepared FrameSlots) must be on {k_pool.device}, got "
                    f"{s.tensor.device}")
    if s.slots is not None and s.slots and max(s.slots) + hw > k_pool.shape[1]:
        checks.fail(f"frame_slots reach token {max(s.slots) + hw}, past the pool of "
                    f"{k_pool.shape[1]} tokens")
    return s


# ----------------------------------------------------------------------------- reference


def rope3d_eager(x, grid, frame_offset, theta, t_theta) -> torch.Tensor:
    ang = rope_angles(grid, x.shape[3], frame_offset, theta, t_theta, x.device)  # [L, Ht, c]
    return rotate_pairs(x, ang[None])


def rope3d_shift_eager_(k_pool, ranges: TokenRanges, delta_frames, theta, t_theta) -> torch.Tensor:
    c_t = rope_bands(k_pool.shape[3])[0]
    member = ranges.membership(k_pool.shape[1], k_pool.device)  # [R, P]
    # One delta per token (ranges are disjoint), rotated where a range holds it and kept bitwise
    # elsewhere: tensor ops only, so this traces under torch.compile.
    delta = delta_frames.to(k_pool.device, torch.float64)
    per_token = torch.where(member, delta[:, None], 0.0).sum(0)  # [P]
    band = k_pool[..., : 2 * c_t]
    rotated = rotate_pairs(band, temporal_angles(per_token, c_t, theta, t_theta)[None])
    band.copy_(torch.where(member.any(0)[None, :, None, None], rotated, band))
    return k_pool


def rope3d_store_eager_(k_pool, v_pool, k, v, slots: FrameSlots, grid, theta,
                        t_theta) -> tuple[torch.Tensor, torch.Tensor]:
    F, h, w = grid
    hw = h * w
    # Positions (frame_pos[f], row, column) via the rope3d angles at offset 0 plus a per-frame
    # temporal term, so integer positions give exactly rope3d's angles.
    ang = rope_angles((F, h, w), k.shape[3], 0.0, theta, t_theta, k.device)  # [L, Ht, c]
    c_t = rope_bands(k.shape[3])[0]
    pos = slots.positions.to(k.device, torch.float64).repeat_interleave(hw)
    t_ang = temporal_angles(pos, c_t, theta, t_theta)  # [L, Ht, c_t]
    ang = torch.cat([t_ang.expand(-1, ang.shape[1], -1), ang[:, :, c_t:]], dim=-1)
    k_rot = rotate_pairs(k, ang[None])
    token = (slots.tensor.to(k.device, torch.int64)[:, None] + torch.arange(hw, device=k.device))
    k_pool.index_copy_(1, token.reshape(-1), k_rot)
    v_pool.index_copy_(1, token.reshape(-1), v)
    return k_pool, v_pool


def rope3d_reference(x, *, grid, frame_offset=0, theta=10000.0, t_theta=None) -> torch.Tensor:
    """``rope3d`` computed eagerly (the oracle)."""
    _check_rope3d(x, grid, t_theta, theta, frame_offset)
    return rope3d_eager(x, tuple(grid), frame_offset, theta, t_theta)


def rope3d_shift_reference_(k_pool, ranges, delta_frames, *, theta=10000.0, t_theta=None) -> torch.Tensor:
    """``rope3d_shift_`` computed eagerly (the oracle)."""
    rng, delta = _check_rope3d_shift(k_pool, ranges, delta_frames, t_theta, theta)
    return rope3d_shift_eager_(k_pool, rng, delta, theta, t_theta)


def rope3d_store_reference_(k_pool, v_pool, k, v, frame_slots, frame_pos=None, *, grid,
                            theta=10000.0, t_theta=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope3d_store_`` computed eagerly (the oracle)."""
    slots = _check_rope3d_store(k_pool, v_pool, k, v, frame_slots, frame_pos, grid, t_theta, theta)
    return rope3d_store_eager_(k_pool, v_pool, k, v, slots, tuple(grid), theta, t_theta)


# ----------------------------------------------------------------------------- kernels


def _rope3d_native(x, grid, frame_offset, theta, t_theta):
    return torch.ops.vidstream.rope3d(x, *grid, float(frame_offset), float(theta), t_theta)


def _rope3d_shift_native(k_pool, ranges, delta, theta, t_theta):
    torch.ops.vidstream.rope3d_shift_(k_pool, ranges.tensor, delta, float(theta), t_theta)


def _rope3d_store_native(k_pool, v_pool, k, v, slots, grid, theta, t_theta):
    torch.ops.vidstream.rope3d_store_(k_pool, v_pool, k, v, slots.tensor, slots.positions, grid[1],
                                      grid[2], float(theta), t_theta)


def _rope3d_triton(x, grid, frame_offset, theta, t_theta):
    from ..triton_kernels import rope3d as kernels

    return kernels.rope3d_triton(x, *grid, float(frame_offset), float(theta), t_theta)


def _rope3d_shift_triton(k_pool, ranges, delta, theta, t_theta):
    from ..triton_kernels import rope3d as kernels

    # Traced values are unknown: the pool length bounds every range (a larger grid, same result).
    max_len = ranges.max_len if ranges.pairs is not None else k_pool.shape[1]
    kernels.rope3d_shift_triton_(k_pool, ranges.tensor, delta, float(theta), t_theta, max_len)


def _rope3d_store_triton(k_pool, v_pool, k, v, slots, grid, theta, t_theta):
    from ..triton_kernels import rope3d_store as kernels

    kernels.rope3d_store_triton_(k_pool, v_pool, k, v, slots.tensor, slots.positions, grid[1],
                                 grid[2], float(theta), t_theta)


@_extension.register_fake("rope3d")
def _rope3d_fake(x, frames, height, width, frame_offset=0.0, theta=10000.0, t_theta=None,
                 inverse=False):
    return torch.empty_like(x)


@_extension.register_fake("rope3d_shift_")
def _rope3d_shift_fake(k_pool, ranges, delta_frames, theta=10000.0, t_theta=None):
    return None


@_extension.register_fake("rope3d_store_")
def _rope3d_store_fake(k_pool, v_pool, k, v, frame_slots, frame_pos, height, width, theta=10000.0,
                       t_theta=None):
    return None


for _op, _eager, _native, _triton in (
        (ROPE3D, rope3d_eager, _rope3d_native, _rope3d_triton),
        (ROPE3D_SHIFT, rope3d_shift_eager_, _rope3d_shift_native, _rope3d_shift_triton),
        (ROPE3D_STORE, rope3d_store_eager_, _rope3d_store_native, _rope3d_store_triton)):
    _op.register("reference", _eager)
    _op.register("cpu", _native)
    _op.register("cuda", _native)
    _op.register("triton", _triton)


# ----------------------------------------------------------------------------- torch backend
# ---- torch backend: vectorised PyTorch. Angles in float64 (the rope_math tables), rounded once
# to float32 cos/sin (float64 for float64 input), pairs rotated in that dtype as rotate_pairs
# does. Each band is rotated on its own with its table broadcast over the tokens that share it
# (temporal per frame, height per row, width per column): nothing larger than the band being
# rotated is materialised.


def _cos_sin(angle: torch.Tensor, x_dtype: torch.dtype):
    cdt = torch.float64 if x_dtype == torch.float64 else torch.float32
    return torch.cos(angle).to(cdt), torch.sin(angle).to(cdt)


def _rotate_band(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Writes the adjacent pairs of ``src`` [..., 2n] rotated by ``cos``/``sin`` (broadcast to
    [..., n], their dtype is the arithmetic's) into ``dst`` (may be ``src``)."""
    pairs = src.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0].to(cos.dtype), pairs[..., 1].to(cos.dtype)
    re, im = a * cos - b * sin, a * sin + b * cos  # both formed before dst (maybe src) is written
    out = dst.unflatten(-1, (-1, 2))
    out[..., 0] = re
    out[..., 1] = im


def _rope_rotated(x: torch.Tensor, grid, frame_pos: torch.Tensor, theta, t_theta) -> torch.Tensor:
    """A new tensor: ``x`` [B, F*h*w, H, D] on ``grid`` with frame f at temporal position
    ``frame_pos[f]`` (float64 [F] on x's device), rotated by the docs/spec.md §3 RoPE."""
    from .rope_math import band_omega

    F, h, w = grid
    D = x.shape[3]
    out = x.new_empty(x.shape)
    if x.numel() == 0:
        return out
    c_t, c_h, c_w = rope_bands(D)
    dev = x.device
    src, dst = x.unflatten(1, (F, h, w)), out.unflatten(1, (F, h, w))  # [B, F, h, w, H, D]
    ang_t = temporal_angles(frame_pos, c_t, theta, t_theta)  # [F, Ht, c_t]
    cos, sin = _cos_sin(ang_t[:, None, None], x.dtype)
    _rotate_band(dst[..., : 2 * c_t], src[..., : 2 * c_t], cos, sin)
    lo = 2 * c_t
    for n, pos, view in ((c_h, h, (h, 1, 1, c_h)), (c_w, w, (w, 1, c_w))):
        if n:
            ang = torch.arange(pos, dtype=torch.float64, device=dev)[:, None] * band_omega(
                n, theta, dev)[None]
            cos, sin = _cos_sin(ang.view(view), x.dtype)
            _rotate_band(dst[..., lo:lo + 2 * n], src[..., lo:lo + 2 * n], cos, sin)
        lo += 2 * n
    return out


def _rope3d_torch(x, grid, frame_offset, theta, t_theta):
    pos = torch.arange(grid[0], dtype=torch.float64, device=x.device) + float(frame_offset)
    return _rope_rotated(x, grid, pos, theta, t_theta)


def _rope3d_shift_torch(k_pool, ranges: TokenRanges, delta, theta, t_theta):
    """Only the temporal band of the ranges' tokens is read and written: gathered through the
    ranges' token index, rotated by a per-range table, copied back."""
    if ranges.pairs is None:  # traced values: the membership form of the reference
        rope3d_shift_eager_(k_pool, ranges, delta, theta, t_theta)
        return
    n_tok = ranges.num_tokens
    if n_tok == 0:
        return
    dev = k_pool.device
    c_t = rope_bands(k_pool.shape[3])[0]
    ang = temporal_angles(delta.to(dev, torch.float64), c_t, theta, t_theta)  # [R, Ht, c_t]
    r = ranges.tensor.to(dev, torch.int64)
    # The range of every gathered token (token_index order; empty ranges hold none), built on
    # the device: output_size keeps repeat_interleave from reading the lengths back.
    rid = torch.repeat_interleave(torch.arange(len(ranges), device=dev), r[:, 1] - r[:, 0],
                                  output_size=n_tok)
    cos, sin = _cos_sin(ang.index_select(0, rid), k_pool.dtype)  # [N, Ht, c_t]
    idx = ranges.token_index(dev)
    band = k_pool[..., : 2 * c_t]
    tokens = band.index_select(1, idx)  # [B, N, H, 2 c_t]
    _rotate_band(tokens, tokens, cos, sin)
    band.index_copy_(1, idx, tokens)


def _rope3d_store_torch(k_pool, v_pool, k, v, slots: FrameSlots, grid, theta, t_theta):
    F, h, w = grid
    k_rot = _rope_rotated(k, grid, slots.positions.to(k.device, torch.float64), theta, t_theta)
    token = (slots.tensor.to(k.device, torch.int64)[:, None]
             + torch.arange(h * w, device=k.device)).reshape(-1)
    k_pool.index_copy_(1, token, k_rot)
    v_pool.index_copy_(1, token, v)


ROPE3D.register("torch", _rope3d_torch)
ROPE3D_SHIFT.register("torch", _rope3d_shift_torch)
ROPE3D_STORE.register("torch", _rope3d_store_torch)


# ----------------------------------------------------------------------------- autograd
# rope3d is a rotation of each channel pair: its backward is the inverse rotation of the
# gradient (rope3d(grad, ..., inverse=True)), registered on the C++ op vidstream::rope3d and the
# Triton op vidstream::rope3d_triton. x is not saved.
#
# rope3d_shift_ and rope3d_store_ write a cache in place; their kernels have no backward. A
# Self-Forcing-style step keeps its cache detached (gradients flow through the current chunk's
# q, k, v only), so they never need one. Inputs that require grad run them on the torch backend
# by default (autograd differentiates its in-place ops, as the reference's); a kernel backend
# forced for such inputs raises a ValueError naming the op and the backend.

from . import autograd_utils as _ag  # noqa: E402


def _rope3d_setup_context(ctx, inputs, output):
    ctx.args = inputs[1:7]  # frames, height, width, frame_offset, theta, t_theta
    ctx.inverse = bool(inputs[7]) if len(inputs) > 7 else False
    ctx.save_for_backward(inputs[6] if isinstance(inputs[6], torch.Tensor) else None)


def _rope3d_backward_with(fn):
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 8
        frames, height, width, frame_offset, theta, _ = ctx.args
        (t_theta,) = ctx.saved_tensors
        gx = fn(grad.contiguous(), frames, height, width, float(frame_offset), float(theta),
                t_theta, not ctx.inverse)
        return gx, None, None, None, None, None, None, None

    return backward


if _extension.load():
    torch.library.register_autograd("vidstream::rope3d",
                                    _rope3d_backward_with(torch.ops.vidstream.rope3d),
                                    setup_context=_rope3d_setup_context)


def _register_triton_rope3d_autograd():
    from ..triton_kernels import rope3d as kernels

    kernels.rope3d_triton.register_autograd(_rope3d_backward_with(kernels.rope3d_triton),
                                            setup_context=_rope3d_setup_context)


_ag.on_triton("light", _register_triton_rope3d_autograd)
ROPE3D.mark_differentiable("cpu")
ROPE3D.mark_differentiable("cuda")
ROPE3D.mark_differentiable("triton", _ag.triton_ready("light"))
