"""The attention ops (docs/spec.md §1, §2): ``chunk_attention``, full-sequence chunk-causal sink +
window attention, and ``cached_attention``, one chunk's queries against token ranges of a pool.

Each op: its public function, its input checks, its eager reference (materialised scores and a
mask: small shapes only), the fake of its C++ op and its registrations. Kernels:
``csrc/{cpu,cuda}/attention.cpp``, ``csrc/kernels/attention.*``, ``triton_kernels/attention.py``;
the C++ ops always return ``(out, lse)`` and the public functions drop ``lse`` when unasked.
"""

from __future__ import annotations

import torch

from .. import _extension, backend
from . import checks
from .metadata import TokenRanges

CHUNK_ATTENTION = backend.op("chunk_attention")
CACHED_ATTENTION = backend.op("cached_attention")


# ----------------------------------------------------------------------------- public ops


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, frame_tokens: int,
                    chunk_frames: int, sink_frames: int = 0, window_frames: int | None = None,
                    scale: float | None = None, return_lse: bool = False):
    """Full-sequence chunk-causal sink + window attention (docs/spec.md §1). ``q`` [B, L, H, D],
    ``k`` [B, L, H_kv, D], ``v`` [B, L, H_kv, Dv]; returns ``out`` [B, L, H, Dv] and, with
    ``return_lse``, the float32 log-sum-exp [B, H, L]."""
    _check_chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames)
    scale = checks.scale_value(scale, q.shape[3])
    return CHUNK_ATTENTION.resolve(q)(
        q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale, return_lse)


def cached_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, kv_ranges, *,
                     scale: float | None = None, return_lse: bool = False):
    """One chunk's queries ``q`` [B, Lq, H, D] against the union of the token ranges
    ``kv_ranges`` [R, 2] (int tensor, pairs, or prepared ``TokenRanges``) of a pool ``k_pool``
    [B, P, H_kv, D], ``v_pool`` [B, P, H_kv, Dv] (docs/spec.md §2). An empty union gives zeros
    and ``lse = -inf``."""
    ranges = _check_cached_attention(q, k_pool, v_pool, kv_ranges)
    scale = checks.scale_value(scale, q.shape[3])
    return CACHED_ATTENTION.resolve(q)(q, k_pool, v_pool, ranges, scale, return_lse)


# ----------------------------------------------------------------------------- input checks


def check_qkv(q, k, v, k_name="k", v_name="v"):
    """q [B, L, H, D], k [B, L, H_kv, D], v [B, L, H_kv, Dv]: the attention ops' shared rules."""
    checks.tensor(q, "q", 4, "[B, L, H, D]")
    checks.tensor(k, k_name, 4, "[B, L, H_kv, D]")
    checks.tensor(v, v_name, 4, "[B, L, H_kv, Dv]")
    checks.floating(q, "q")
    checks.same("q", q, k_name, k)
    checks.same("q", q, v_name, v)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        checks.fail(f"batch sizes differ: q {q.shape[0]}, {k_name} {k.shape[0]}, {v_name} {v.shape[0]}")
    if q.shape[3] < 1:
        checks.fail(f"q head dim must be >= 1, got {q.shape[3]}")
    if k.shape[3] != q.shape[3]:
        checks.fail(f"{k_name} head dim must equal q's ({q.shape[3]}), got {k.shape[3]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        checks.fail(f"{v_name} must have the tokens and heads of {k_name} "
                    f"({k.shape[1]}, {k.shape[2]}), got ({v.shape[1]}, {v.shape[2]})")
    checks.gqa(q.shape[2], k.shape[2], k_name)


def _check_chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames):
    check_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:
        checks.fail(f"k must have the tokens of q ({q.shape[1]}), got {k.shape[1]}")
    checks.positive_int(frame_tokens, "frame_tokens")
    checks.positive_int(chunk_frames, "chunk_frames")
    checks.positive_int(sink_frames, "sink_frames", minimum=0)
    if q.shape[1] % frame_tokens:
        checks.fail(f"the sequence length L = {q.shape[1]} must be a multiple of frame_tokens = "
                    f"{frame_tokens}")
    if window_frames is not None:
        checks.positive_int(window_frames, "window_frames")
        if window_frames < chunk_frames:
            checks.fail(f"window_frames must be >= chunk_frames = {chunk_frames}, got {window_frames}")


def _check_cached_attention(q, k_pool, v_pool, kv_ranges) -> TokenRanges:
    check_qkv(q, k_pool, v_pool, "k_pool", "v_pool")
    return checks.ranges(kv_ranges, k_pool.shape[1], "kv_ranges", q.device)


# ----------------------------------------------------------------------------- reference


def chunk_mask(L: int, frame_tokens: int, chunk_frames: int, sink_frames: int = 0,
               window_frames: int | None = None, device=None) -> torch.Tensor:
    """Boolean [L, L] mask, True where query i may attend key j (docs/spec.md §1)."""
    idx = torch.arange(L, device=device)
    frame = idx // frame_tokens
    chunk = frame // chunk_frames
    end = (chunk + 1) * chunk_frames
    allowed = chunk[None, :] <= chunk[:, None]
    if window_frames is not None:
        in_window = frame[None, :] >= (end[:, None] - window_frames)
        allowed &= (frame[None, :] < sink_frames) | in_window
    return allowed


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[2], dim=2) if t.shape[2] != heads else t


def masked_attention(q, k, v, mask, scale, return_lse):
    """Eager attention: q [B, Lq, H, D], k [B, Lk, H_kv, D], v [B, Lk, H_kv, Dv], mask bool
    [Lq, Lk] or None."""
    H = q.shape[2]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)  # [B, H, Lq]
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # a query with nothing to attend: all -inf row
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    if return_lse:
        return out, lse.float()
    return out


def empty_attention(q, dv: int, return_lse: bool):
    """The result of attending nothing: zeros and lse = -inf."""
    B, Lq, H, _ = q.shape
    out = q.new_zeros(B, Lq, H, dv)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    return (out, lse) if return_lse else out


def chunk_attention_eager(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                          return_lse):
    mask = chunk_mask(q.shape[1], frame_tokens, chunk_frames, sink_frames, window_frames, q.device)
    return masked_attention(q, k, v, mask, scale, return_lse)


def gather_tokens(pool: torch.Tensor, ranges: TokenRanges) -> torch.Tensor:
    """The tokens of ``pool`` [B, P, ...] in the union of ``ranges``, in range order."""
    return pool.index_select(1, ranges.token_index(pool.device))


def cached_attention_eager(q, k_pool, v_pool, ranges: TokenRanges, scale, return_lse):
    k = gather_tokens(k_pool, ranges)
    v = gather_tokens(v_pool, ranges)
    if k.shape[1] == 0:
        return empty_attention(q, v_pool.shape[3], return_lse)
    return masked_attention(q, k, v, None, scale, return_lse)


def chunk_attention_reference(q, k, v, *, frame_tokens, chunk_frames, sink_frames=0,
                              window_frames=None, scale=None, return_lse=False):
    """``chunk_attention`` computed eagerly with a mask (the oracle)."""
    _check_chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames)
    scale = checks.scale_value(scale, q.shape[3])
    return chunk_attention_eager(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames,
                                 scale, return_lse)


def cached_attention_reference(q, k_pool, v_pool, kv_ranges, *, scale=None, return_lse=False):
    """``cached_attention`` computed eagerly (the oracle)."""
    ranges = _check_cached_attention(q, k_pool, v_pool, kv_ranges)
    scale = checks.scale_value(scale, q.shape[3])
    return cached_attention_eager(q, k_pool, v_pool, ranges, scale, return_lse)


# ----------------------------------------------------------------------------- kernels


def _pick(out, lse, return_lse):
    return (out, lse) if return_lse else out


def _chunk_attention_native(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                            return_lse):
    out, lse = torch.ops.vidstream.chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames,
                                                   window_frames, float(scale))
    return _pick(out, lse, return_lse)


def _cached_attention_native(q, k_pool, v_pool, ranges, scale, return_lse):
    out, lse = torch.ops.vidstream.cached_attention(q, k_pool, v_pool, ranges.tensor, float(scale))
    return _pick(out, lse, return_lse)


def _chunk_attention_triton(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                            return_lse):
    from ..triton_kernels import attention as kernels

    out, lse = kernels.chunk_attention_triton(q, k, v, frame_tokens, chunk_frames, sink_frames,
                                              window_frames, float(scale))
    return _pick(out, lse, return_lse)


def _cached_attention_triton(q, k_pool, v_pool, ranges, scale, return_lse):
    from ..triton_kernels import attention as kernels

    out, lse = kernels.cached_attention_triton(q, k_pool, v_pool, ranges.tensor, float(scale))
    return _pick(out, lse, return_lse)


def _attention_outputs(q, v):
    B, L, H, _ = q.shape
    return q.new_empty(B, L, H, v.shape[3]), q.new_empty(B, H, L, dtype=torch.float32)


@_extension.register_fake("chunk_attention")
def _chunk_attention_fake(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale):
    return _attention_outputs(q, v)


@_extension.register_fake("cached_attention")
def _cached_attention_fake(q, k_pool, v_pool, kv_ranges, scale):
    return _attention_outputs(q, v_pool)


CHUNK_ATTENTION.register("reference", chunk_attention_eager)
CACHED_ATTENTION.register("reference", cached_attention_eager)
CHUNK_ATTENTION.register("cpu", _chunk_attention_native)
CACHED_ATTENTION.register("cpu", _cached_attention_native)
# Not yet run on a GPU: opt-in on CUDA tensors (vidstream.use_backend) until bench/gpu_check.sh passes.
CHUNK_ATTENTION.register("triton", _chunk_attention_triton, gpu_validated=False)
CACHED_ATTENTION.register("triton", _cached_attention_triton, gpu_validated=False)
# Hand-written mma.sync kernels (csrc/kernels/attention.cu): float16/bfloat16, head dims 64/128.
CHUNK_ATTENTION.register("cuda", _chunk_attention_native, gpu_validated=False)
CACHED_ATTENTION.register("cuda", _cached_attention_native, gpu_validated=False)
