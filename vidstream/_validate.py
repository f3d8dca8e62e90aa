"""Input checks of every SPEC op. Each raises ``ValueError`` naming the argument and what was
expected. The public ops and the reference call these once; kernels then trust their inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _fail(msg: str):
    raise ValueError(msg)


def tensor(t, name: str, ndim: int, dims: str):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(f"{name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")


def floating(t: torch.Tensor, name: str):
    if t.dtype not in FLOAT_DTYPES:
        _fail(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor):
    if a.dtype != b.dtype:
        _fail(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        _fail(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def positive_int(v, name: str, minimum: int = 1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(f"{name} must be an int >= {minimum}, got {v!r}")


def gqa(heads: int, kv_heads: int, kv_name: str):
    if kv_heads < 1 or heads % kv_heads != 0:
        _fail(f"{kv_name} has {kv_heads} heads; the query heads ({heads}) must be a multiple of it")


def scale_value(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        _fail(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        _fail(f"scale must be finite, got {scale}")
    return float(scale)


def ranges(r, pool_len: int, name: str = "ranges") -> torch.Tensor:
    """Checks half-open token ranges [R, 2] (in bounds, start <= end, pairwise disjoint, empty
    ones allowed anywhere) and returns them as a CPU int32 tensor."""
    if isinstance(r, torch.Tensor):
        if r.dtype not in (torch.int32, torch.int64):
            _fail(f"{name} must be an int32 tensor of shape [R, 2], got dtype {r.dtype}")
        # Checked in int64: an int64 value cast to int32 first could wrap into bounds.
        host = r.detach().to("cpu", torch.int64)
    elif isinstance(r, Sequence):
        rows = [list(p) if isinstance(p, Sequence) else p for p in r]
        if any(not isinstance(p, list) or len(p) != 2 for p in rows):
            _fail(f"{name} must be a list of (start, end) pairs, got {r!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for p in rows for v in p):
            _fail(f"{name} entries must be ints, got {r!r}")
        host = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
    else:
        _fail(f"{name} must be an int32 tensor [R, 2] or a list of (start, end), got {type(r).__name__}")
    if host.dim() != 2 or host.shape[1] != 2:
        _fail(f"{name} must have shape [R, 2], got {tuple(host.shape)}")
    if torch.compiler.is_compiling():
        # Under tracing the values are not known here; the C++ ops check them again when they
        # run, the Triton kernels do not (documented in CONTRIBUTING.md).
        return host.to(torch.int32)
    starts, ends = host[:, 0], host[:, 1]
    bad = (starts < 0) | (ends > pool_len) | (starts > ends)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        _fail(f"{name}[{i}] = [{int(starts[i])}, {int(ends[i])}) must satisfy "
              f"0 <= start <= end <= {pool_len}")
    nonempty = host[starts < ends]
    if nonempty.shape[0] > 1:
        order = torch.argsort(nonempty[:, 0])
        srt = nonempty[order]
        clash = srt[1:, 0] < srt[:-1, 1]
        if bool(clash.any()):
            i = int(clash.nonzero()[0, 0])
            a, b = srt[i].tolist(), srt[i + 1].tolist()
            _fail(f"{name} must not overlap: [{a[0]}, {a[1]}) and [{b[0]}, {b[1]})")
    return host.to(torch.int32)


def grid3(grid, tokens: int):
    if not (isinstance(grid, Sequence) and len(grid) == 3 and all(
            isinstance(g, int) and not isinstance(g, bool) for g in grid)):
        _fail(f"grid must be a tuple of three ints (F, h, w), got {grid!r}")
    f, h, w = grid
    if f < 0 or h < 1 or w < 1 or f * h * w != tokens:
        _fail(f"grid (F, h, w) = {tuple(grid)} must have F*h*w == L = {tokens}")


def t_theta(tt, heads: int):
    if tt is None:
        return
    if not isinstance(tt, torch.Tensor) or tt.dim() != 1 or tt.shape[0] != heads:
        shape = tuple(tt.shape) if isinstance(tt, torch.Tensor) else type(tt).__name__
        _fail(f"t_theta must be a float tensor of shape [H] = [{heads}], got {shape}")
    if not tt.is_floating_point():
        _fail(f"t_theta must be floating point, got {tt.dtype}")
    if not torch.compiler.is_compiling() and not bool(((tt > 0) & torch.isfinite(tt)).all()):
        _fail(f"t_theta must be finite and > 0, got {tt.tolist()}")


def rope_params(theta, frame_offset=0.0):
    """theta > 0 and finite; frame_offset finite: either would otherwise give NaN keys."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (
            math.isfinite(theta) and theta > 0):
        _fail(f"theta must be a finite number > 0, got {theta!r}")
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, (int, float)) or not (
            math.isfinite(frame_offset)):
        _fail(f"frame_offset must be a finite number, got {frame_offset!r}")


def rope_input(x, name: str):
    tensor(x, name, 4, "[B, L, H, D]")
    floating(x, name)
    if x.shape[-1] % 2 or x.shape[-1] < 2:
        _fail(f"{name} head dim D must be even and >= 2, got {x.shape[-1]}")


def rope3d(x, grid, tt, theta=10000.0, frame_offset=0.0):
    rope_input(x, "x")
    grid3(grid, x.shape[1])
    t_theta(tt, x.shape[2])
    rope_params(theta, frame_offset)


def rope3d_shift(k_pool, rng, delta_frames, tt, theta=10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ranges, delta_frames) as CPU tensors (int32 [R, 2], float64 [R])."""
    rope_input(k_pool, "k_pool")
    host = ranges(rng, k_pool.shape[1])
    if isinstance(delta_frames, torch.Tensor):
        delta = delta_frames.detach().to("cpu", torch.float64).reshape(-1)
        if delta_frames.dim() > 1:
            _fail(f"delta_frames must be 1-D [R], got shape {tuple(delta_frames.shape)}")
    elif isinstance(delta_frames, (int, float)):
        delta = torch.full((host.shape[0],), float(delta_frames), dtype=torch.float64)
    else:
        delta = torch.tensor(list(delta_frames), dtype=torch.float64)
        if delta.dim() != 1:
            _fail(f"delta_frames must be 1-D [R], got shape {tuple(delta.shape)}")
    if delta.shape[0] != host.shape[0]:
        _fail(f"delta_frames must have one entry per range ([R] = [{host.shape[0]}]), "
              f"got {delta.shape[0]}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(delta).all()):
        _fail(f"delta_frames must be finite, got {delta.tolist()}")
    t_theta(tt, k_pool.shape[2])
    rope_params(theta)
    return host, delta


def attention_qkv(q, k, v, k_name="k", v_name="v"):
    tensor(q, "q", 4, "[B, L, H, D]")
    tensor(k, k_name, 4, "[B, L, H_kv, D]")
    tensor(v, v_name, 4, "[B, L, H_kv, Dv]")
    floating(q, "q")
    same("q", q, k_name, k)
    same("q", q, v_name, v)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        _fail(f"batch sizes differ: q {q.shape[0]}, {k_name} {k.shape[0]}, {v_name} {v.shape[0]}")
    if q.shape[3] < 1:
        _fail(f"q head dim must be >= 1, got {q.shape[3]}")
    if k.shape[3] != q.shape[3]:
        _fail(f"{k_name} head dim must equal q's ({q.shape[3]}), got {k.shape[3]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        _fail(f"{v_name} must have the tokens and heads of {k_name} "
              f"({k.shape[1]}, {k.shape[2]}), got ({v.shape[1]}, {v.shape[2]})")
    gqa(q.shape[2], k.shape[2], k_name)


def chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames):
    attention_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:
        _fail(f"k must have the tokens of q ({q.shape[1]}), got {k.shape[1]}")
    positive_int(frame_tokens, "frame_tokens")
    positive_int(chunk_frames, "chunk_frames")
    positive_int(sink_frames, "sink_frames", minimum=0)
    if q.shape[1] % frame_tokens:
        _fail(f"the sequence length L = {q.shape[1]} must be a multiple of frame_tokens = {frame_tokens}")
    if window_frames is not None:
        positive_int(window_frames, "window_frames")
        if window_frames < chunk_frames:
            _fail(f"window_frames must be >= chunk_frames = {chunk_frames}, got {window_frames}")


def cached_attention(q, k_pool, v_pool, kv_ranges) -> torch.Tensor:
    attention_qkv(q, k_pool, v_pool, "k_pool", "v_pool")
    return ranges(kv_ranges, k_pool.shape[1], "kv_ranges")


def lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool) -> torch.Tensor:
    tensor(c_pool, "c_pool", 3, "[B, P, d_c]")
    floating(c_pool, "c_pool")
    tensor(w_uk, "w_uk", 3, "[H, d_c, d_nope]")
    tensor(w_uv, "w_uv", 3, "[H, d_c, d_v]")
    same("c_pool", c_pool, "w_uk", w_uk)
    same("c_pool", c_pool, "w_uv", w_uv)
    d_c = c_pool.shape[2]
    if w_uk.shape[1] != d_c:
        _fail(f"w_uk must have shape [H, d_c={d_c}, d_nope], got {tuple(w_uk.shape)}")
    if w_uv.shape[0] != w_uk.shape[0] or w_uv.shape[1] != d_c:
        _fail(f"w_uv must have shape [H={w_uk.shape[0]}, d_c={d_c}, d_v], got {tuple(w_uv.shape)}")
    if k_r_pool is not None:
        tensor(k_r_pool, "k_r_pool", 3, "[B, P, d_r]")
        same("c_pool", c_pool, "k_r_pool", k_r_pool)
        if k_r_pool.shape[:2] != c_pool.shape[:2]:
            _fail(f"k_r_pool must have the batch and tokens of c_pool {tuple(c_pool.shape[:2])}, "
                  f"got {tuple(k_r_pool.shape[:2])}")
    return ranges(kv_ranges, c_pool.shape[1], "kv_ranges")


def lowrank_query(q, c_pool, w_uk, w_uv, k_r_pool):
    tensor(q, "q", 4, "[B, Lq, H, d_nope + d_r]")
    same("c_pool", c_pool, "q", q)
    d_r = 0 if k_r_pool is None else k_r_pool.shape[2]
    want = (c_pool.shape[0], w_uk.shape[0], w_uk.shape[2] + d_r)
    if (q.shape[0], q.shape[2], q.shape[3]) != want:
        _fail(f"q must have shape [B={want[0]}, Lq, H={want[1]}, d_nope + d_r = {want[2]}], "
              f"got {tuple(q.shape)}")


def select_blocks(q, k_pool, block_ranges, k, query_stride, heads, score,
                  block_key_sums=None) -> tuple:
    """Returns (block ranges int32 [M, 2] on the CPU, the list of query heads, the key sums as
    [B, M, H_kv, D] or None)."""
    tensor(q, "q", 4, "[B, Lq, H, D]")
    tensor(k_pool, "k_pool", 4, "[B, P, H_kv, D]")
    floating(q, "q")
    same("q", q, "k_pool", k_pool)
    if k_pool.shape[0] != q.shape[0] or k_pool.shape[3] != q.shape[3]:
        _fail(f"k_pool must have q's batch and head dim ({q.shape[0]}, {q.shape[3]}), "
              f"got ({k_pool.shape[0]}, {k_pool.shape[3]})")
    gqa(q.shape[2], k_pool.shape[2], "k_pool")
    blocks = ranges(block_ranges, k_pool.shape[1], "block_ranges")
    positive_int(k, "k", minimum=0)
    positive_int(query_stride, "query_stride")
    if score not in ("mean", "max"):
        _fail(f"score must be 'mean' or 'max', got {score!r}")
    H = q.shape[2]
    if heads is None:
        heads = list(range(max(1, H // 2)))
    else:
        heads = list(heads)
        if any(isinstance(h, bool) or not isinstance(h, int) for h in heads):
            _fail(f"heads must be a list of ints, got {heads}")
        if not heads or any(h < 0 or h >= H for h in heads) or len(set(heads)) != len(heads):
            _fail(f"heads must be distinct query head indices in [0, {H}), got {heads}")
    if q.shape[1] == 0:
        _fail("q must have at least one query token (Lq >= 1)")
    sums = None
    if block_key_sums is not None:
        sums = key_sums(block_key_sums, q.shape[0], blocks.shape[0], k_pool.shape[2], q.shape[3],
                        q.device)
    return blocks, heads, sums


def key_sums(s, batch: int, blocks: int, kv_heads: int, head_dim: int, device) -> torch.Tensor:
    """Per-block key sums [M, H_kv, D] (batch 1) or [B, M, H_kv, D]; returned as 4-D."""
    want = f"[M, H_kv, D] = [{blocks}, {kv_heads}, {head_dim}] (batch 1) or [B, M, H_kv, D] = " \
           f"[{batch}, {blocks}, {kv_heads}, {head_dim}]"
    if not isinstance(s, torch.Tensor):
        _fail(f"block_key_sums must be a tensor {want}, got {type(s).__name__}")
    if s.dim() == 3 and batch == 1:
        s = s.unsqueeze(0)
    if tuple(s.shape) != (batch, blocks, kv_heads, head_dim):
        _fail(f"block_key_sums must have shape {want}, got {tuple(s.shape)}")
    floating(s, "block_key_sums")
    if s.device != device:
        _fail(f"block_key_sums must be on the device of q ({device}), got {s.device}")
    return s


def rope3d_store(k_pool, v_pool, k, v, frame_slots, frame_pos, grid, tt, theta=10000.0):
    """SPEC §6 cache write. Returns (frame_slots int32 [F], frame_pos float64 [F]) on the CPU."""
    rope_input(k_pool, "k_pool")
    rope_input(k, "k")
    tensor(v_pool, "v_pool", 4, "[B, P, H_kv, Dv]")
    tensor(v, "v", 4, "[B, L, H_kv, Dv]")
    for name, t in (("v_pool", v_pool), ("k", k), ("v", v)):
        same("k_pool", k_pool, name, t)
    if k.shape[0] != k_pool.shape[0] or v.shape[0] != k_pool.shape[0] or v_pool.shape[0] != k_pool.shape[0]:
        _fail(f"batch sizes differ: k_pool {k_pool.shape[0]}, v_pool {v_pool.shape[0]}, "
              f"k {k.shape[0]}, v {v.shape[0]}")
    if tuple(k.shape[2:]) != tuple(k_pool.shape[2:]):
        _fail(f"k must have the heads and head dim of k_pool {tuple(k_pool.shape[2:])}, "
              f"got {tuple(k.shape[2:])}")
    if tuple(v_pool.shape[1:3]) != tuple(k_pool.shape[1:3]):
        _fail(f"v_pool must have the tokens and heads of k_pool {tuple(k_pool.shape[1:3])}, "
              f"got {tuple(v_pool.shape[1:3])}")
    if v.shape[1] != k.shape[1] or tuple(v.shape[2:]) != tuple(v_pool.shape[2:]):
        _fail(f"v must have shape [B, L={k.shape[1]}, {v_pool.shape[2]}, {v_pool.shape[3]}], "
              f"got {tuple(v.shape)}")
    grid3(grid, k.shape[1])
    F, h, w = grid
    slots = frame_slots.detach().to("cpu") if isinstance(frame_slots, torch.Tensor) else (
        torch.tensor(list(frame_slots), dtype=torch.int64))
    if slots.dim() != 1 or slots.shape[0] != F or slots.is_floating_point():
        _fail(f"frame_slots must be an int tensor [F] = [{F}], got {tuple(slots.shape)} {slots.dtype}")
    slots = slots.to(torch.int32)
    pos = frame_pos.detach().to("cpu", torch.float64) if isinstance(frame_pos, torch.Tensor) else (
        torch.tensor(list(frame_pos), dtype=torch.float64))
    if pos.dim() != 1 or pos.shape[0] != F:
        _fail(f"frame_pos must have shape [F] = [{F}], got {tuple(pos.shape)}")
    hw = h * w
    bad = (slots < 0) | (slots + hw > k_pool.shape[1])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        _fail(f"frame_slots[{i}] = {int(slots[i])} must satisfy 0 <= slot and slot + h*w ({hw}) "
              f"<= {k_pool.shape[1]}")
    srt = torch.sort(slots.long()).values
    if srt.shape[0] > 1 and bool((srt[1:] - srt[:-1] < hw).any()):
        _fail(f"frame_slots must not overlap: two slots are closer than h*w = {hw}: {slots.tolist()}")
    if not bool(torch.isfinite(pos).all()):
        _fail(f"frame_pos must be finite, got {pos.tolist()}")
    t_theta(tt, k.shape[2])
    rope_params(theta)
    return slots, pos
