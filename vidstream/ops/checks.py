"""Input checks shared by the ops: the one place where user-facing ``ValueError``s are raised,
each naming the argument and the expected value. The public ops (and the checked reference
functions) call them once; kernels then trust their inputs, and the C++ ops keep only
memory-safety checks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .metadata import TokenRanges

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fail(msg: str):
    raise ValueError(msg)


def tensor(t, name: str, ndim: int, dims: str):
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        fail(f"{name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")


def floating(t: torch.Tensor, name: str):
    if t.dtype not in FLOAT_DTYPES:
        fail(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor):
    if a.dtype != b.dtype:
        fail(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        fail(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def positive_int(v, name: str, minimum: int = 1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        fail(f"{name} must be an int >= {minimum}, got {v!r}")


def gqa(heads: int, kv_heads: int, kv_name: str):
    if kv_heads < 1 or heads % kv_heads != 0:
        fail(f"{kv_name} has {kv_heads} heads; the query heads ({heads}) must be a multiple of it")


def scale_value(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        fail(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        fail(f"scale must be finite, got {scale}")
    return float(scale)


def ranges(r, pool_len: int, name: str = "ranges", device=None) -> TokenRanges:
    """Checks half-open token ranges [R, 2] (in bounds, start <= end, pairwise disjoint, empty
    ones allowed anywhere) and returns them as ``TokenRanges`` on ``device`` (default: where
    they are). Prepared ``TokenRanges`` are trusted: only their bounds are checked, on the host
    ints they carry."""
    if isinstance(r, TokenRanges):
        return _prepared_ranges(r, pool_len, name, device)
    if isinstance(r, torch.Tensor):
        if r.dtype not in (torch.int32, torch.int64):
            fail(f"{name} must be an int32 tensor of shape [R, 2], got dtype {r.dtype}")
        device = r.device if device is None else device
        # Checked in int64: an int64 value cast to int32 first could wrap into bounds.
        host = r.detach().to("cpu", torch.int64)
    elif isinstance(r, Sequence):
        rows = [list(p) if isinstance(p, Sequence) else p for p in r]
        if any(not isinstance(p, list) or len(p) != 2 for p in rows):
            fail(f"{name} must be a list of (start, end) pairs, got {r!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for p in rows for v in p):
            fail(f"{name} entries must be ints, got {r!r}")
        host = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
    else:
        fail(f"{name} must be an int32 tensor [R, 2] or a list of (start, end), got {type(r).__name__}")
    if host.dim() != 2 or host.shape[1] != 2:
        fail(f"{name} must have shape [R, 2], got {tuple(host.shape)}")
    tensor_on = host.to(device=device or "cpu", dtype=torch.int32).contiguous()
    if torch.compiler.is_compiling():
        # Under tracing the values are not known here; the C++ ops check their bounds when they
        # run, the Triton kernels do not (CONTRIBUTING.md).
        return TokenRanges(tensor_on, None)
    starts, ends = host[:, 0], host[:, 1]
    bad = (starts < 0) | (ends > pool_len) | (starts > ends)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        fail(f"{name}[{i}] = [{int(starts[i])}, {int(ends[i])}) must satisfy "
              f"0 <= start <= end <= {pool_len}")
    nonempty = host[starts < ends]
    if nonempty.shape[0] > 1:
        order = torch.argsort(nonempty[:, 0])
        srt = nonempty[order]
        clash = srt[1:, 0] < srt[:-1, 1]
        if bool(clash.any()):
            i = int(clash.nonzero()[0, 0])
            a, b = srt[i].tolist(), srt[i + 1].tolist()
            fail(f"{name} must not overlap: [{a[0]}, {a[1]}) and [{b[0]}, {b[1]})")
    return TokenRanges(tensor_on, tuple(tuple(p) for p in host.tolist()))


def _prepared_ranges(r: TokenRanges, pool_len: int, name: str, device) -> TokenRanges:
    if device is not None and r.device != torch.device(device):
        fail(f"{name} (prepared TokenRanges) must be on {torch.device(device)}, got {r.device}")
    if r.pairs is not None and r.end > pool_len:
        fail(f"{name} reaches token {r.end}, past the pool of {pool_len} tokens")
    return r


def positions(p, count: int, name: str, unit: str) -> torch.Tensor:
    """Finite float positions (a number for every entry, or [count]) as float64 [count] on the
    CPU: host values from which the kernels build their angle tables."""
    if isinstance(p, torch.Tensor):
        if p.dim() > 1:
            fail(f"{name} must be 1-D [{unit}], got shape {tuple(p.shape)}")
        out = p.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(p, (int, float)) and not isinstance(p, bool):
        out = torch.full((count,), float(p), dtype=torch.float64)
    else:
        out = torch.tensor(list(p), dtype=torch.float64)
        if out.dim() != 1:
            fail(f"{name} must be 1-D [{unit}], got shape {tuple(out.shape)}")
    if out.shape[0] != count:
        fail(f"{name} must have shape [{unit}] = [{count}] (one entry per "
              f"{'range' if unit == 'R' else 'frame'}), got {out.shape[0]} entries")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
        fail(f"{name} must be finite, got {out.tolist()}")
    return out


def grid3(grid, tokens: int):
    if not (isinstance(grid, Sequence) and len(grid) == 3 and all(
            isinstance(g, int) and not isinstance(g, bool) for g in grid)):
        fail(f"grid must be a tuple of three ints (F, h, w), got {grid!r}")
    f, h, w = grid
    if f < 0 or h < 1 or w < 1 or f * h * w != tokens:
        fail(f"grid (F, h, w) = {tuple(grid)} must have F*h*w == L = {tokens}")


def t_theta(tt, heads: int):
    if tt is None:
        return
    if not isinstance(tt, torch.Tensor) or tt.dim() != 1 or tt.shape[0] != heads:
        shape = tuple(tt.shape) if isinstance(tt, torch.Tensor) else type(tt).__name__
        fail(f"t_theta must be a float tensor of shape [H] = [{heads}], got {shape}")
    if not tt.is_floating_point():
        fail(f"t_theta must be floating point, got {tt.dtype}")
    if not torch.compiler.is_compiling() and not bool(((tt > 0) & torch.isfinite(tt)).all()):
        fail(f"t_theta must be finite and > 0, got {tt.tolist()}")


def rope_params(theta, frame_offset=0.0):
    """theta > 0 and finite; frame_offset finite: either would otherwise give NaN keys."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (
            math.isfinite(theta) and theta > 0):
        fail(f"theta must be a finite number > 0, got {theta!r}")
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, (int, float)) or not (
            math.isfinite(frame_offset)):
        fail(f"frame_offset must be a finite number, got {frame_offset!r}")


def rope_input(x, name: str):
    tensor(x, name, 4, "[B, L, H, D]")
    floating(x, name)
    if x.shape[-1] % 2 or x.shape[-1] < 2:
        fail(f"{name} head dim D must be even and >= 2, got {x.shape[-1]}")


