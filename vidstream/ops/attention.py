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
    mask = _check_chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames)
    scale = checks.scale_value(scale, q.shape[3])
    q, k, v = (checks.rows_contiguous(t) for t in (q, k, v))
    return CHUNK_ATTENTION.resolve(q)(q, k, v, frame_tokens, *mask, scale, return_lse)


def cached_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, kv_ranges, *,
                     scale: float | None = None, return_lse: bool = False):
    """One chunk's queries ``q`` [B, Lq, H, D] against the union of the token ranges
    ``kv_ranges`` [R, 2] (int tensor, pairs, or prepared ``TokenRanges``) of a pool ``k_pool``
    [B, P, H_kv, D], ``v_pool`` [B, P, H_kv, Dv] (docs/spec.md §2). An empty union gives zeros
    and ``lse = -inf``."""
    ranges = _check_cached_attention(q, k_pool, v_pool, kv_ranges)
    scale = checks.scale_value(scale, q.shape[3])
    q, k_pool, v_pool = (checks.rows_contiguous(t) for t in (q, k_pool, v_pool))
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
    """Returns (chunk_frames, sink_frames, window_frames) bounded by the sequence: the same mask,
    with no product a kernel forms able to overflow."""
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
    return bounded_mask_params(q.shape[1] // frame_tokens, chunk_frames, sink_frames, window_frames)


def bounded_mask_params(frames: int, chunk_frames: int, sink_frames: int, window_frames):
    """Equivalent mask parameters no larger than the sequence (``frames`` frames): a chunk of at
    least ``frames`` frames is one chunk; a sink of at least ``frames`` holds every frame; a
    window reaches back from a chunk end, which is below ``2 * frames``, so any longer window
    sees everything. Kernels then form ``x * frame_tokens`` without int64 overflow for any input."""
    n = max(frames, 1)
    chunk = min(chunk_frames, n)
    window = None if window_frames is None else max(chunk, min(window_frames, 2 * n))
    return chunk, min(sink_frames, n), window


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


def dense_attention(q, k, v, scale, return_lse, keep=None):
    """Eager attention of every query over the keys ``keep`` selects (bool [Lk], None: all):
    q [B, Lq, H, D], k [B, Lk, H_kv, D], v [B, Lk, H_kv, Dv].

    Computed the way a careful eager user would: the scale folded into q in q's dtype, scores,
    softmax and the sum over values accumulated in float32 (float64 for float64), the
    probabilities rounded to q's dtype as every kernel does, so half-precision logits that fit in
    float32 never overflow. IEEE like SDPA: a NaN or Inf among the selected keys and values
    reaches the output; keys and values outside ``keep`` cannot; with nothing selected the output
    is zeros and lse is -inf."""
    H = q.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if keep is not None:
        # Zeroed, not just masked: 0 * NaN would still reach the output.
        v = torch.where(keep[None, :, None, None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    k, v = _expand_kv(k, H).to(cdt), _expand_kv(v, H).to(cdt)
    s = torch.einsum("bqhd,bkhd->bhqk", (q * scale).to(cdt), k)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Lq]
    p = torch.softmax(s, dim=-1).to(q.dtype).to(cdt)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v).to(q.dtype)
    if keep is not None:
        empty = ~keep.any()
        out = torch.where(empty, torch.zeros((), dtype=out.dtype, device=out.device), out)
        lse = torch.where(empty, torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device), lse)
    if return_lse:
        return out, lse.float()
    return out


def empty_attention(q, dv: int, return_lse: bool):
    """The result of attending nothing: zeros and lse = -inf."""
    B, Lq, H, _ = q.shape
    out = q.new_zeros(B, Lq, H, dv)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    return (out, lse) if return_lse else out


def chunk_key_spans(chunk: int, L: int, frame_tokens: int, chunk_frames: int, sink_frames: int,
                    window_frames: int | None) -> list[tuple[int, int]]:
    """The key token spans (at most two, ascending, non-empty) every query of ``chunk`` attends:
    the mask of docs/spec.md §1 is the same for all queries of a chunk."""
    end = (chunk + 1) * chunk_frames  # first frame after the chunk
    end_tok = min(end * frame_tokens, L)
    if window_frames is None:
        return [(0, end_tok)]
    sink_tok = min(sink_frames, end) * frame_tokens
    win_tok = max(0, end - window_frames) * frame_tokens
    if sink_tok >= win_tok:
        return [(0, end_tok)]
    return [(0, sink_tok)] * (sink_tok > 0) + [(win_tok, end_tok)]


def chunk_attention_eager(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                          return_lse):
    """Chunk by chunk over exactly the keys each chunk may see: no mask, so nothing outside
    them can reach an output."""
    L = q.shape[1]
    chunk_tok = chunk_frames * frame_tokens
    outs, lses = [], []
    for c, q0 in enumerate(range(0, L, chunk_tok)):
        spans = chunk_key_spans(c, L, frame_tokens, chunk_frames, sink_frames, window_frames)
        kc = torch.cat([k[:, a:b] for a, b in spans], dim=1)
        vc = torch.cat([v[:, a:b] for a, b in spans], dim=1)
        o, lse = dense_attention(q[:, q0:q0 + chunk_tok], kc, vc, scale, True)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return empty_attention(q, v.shape[3], return_lse)
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=2)
    return (out, lse) if return_lse else out


def gather_tokens(pool: torch.Tensor, ranges: TokenRanges) -> torch.Tensor:
    """The tokens of ``pool`` [B, P, ...] in the union of ``ranges``, in range order."""
    return pool.index_select(1, ranges.token_index(pool.device))


def cached_attention_eager(q, k_pool, v_pool, ranges: TokenRanges, scale, return_lse):
    keep = ranges.membership(k_pool.shape[1], q.device).any(dim=0)
    return dense_attention(q, k_pool, v_pool, scale, return_lse, keep)


def chunk_attention_reference(q, k, v, *, frame_tokens, chunk_frames, sink_frames=0,
                              window_frames=None, scale=None, return_lse=False):
    """``chunk_attention`` computed eagerly, chunk by chunk (the oracle)."""
    mask = _check_chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames)
    scale = checks.scale_value(scale, q.shape[3])
    return chunk_attention_eager(q, k, v, frame_tokens, *mask, scale, return_lse)


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
