"""The attention ops (docs/spec.md §1, §2): ``chunk_attention``, full-sequence chunk-causal sink +
window attention, and ``cached_attention``, one chunk's queries against token ranges of a pool.

Each op: its public function, its input checks, its eager reference (materialised scores and a
mask: small shapes only), the fake of its C++ op and its registrations. Kernels:
``csrc/{cpu,cuda}/attention.cpp``, ``csrc/kernels/attention.*``, ``triton_kernels/attention.py``;
the C++ ops always return ``(out, lse)`` and the public functions drop ``lse`` when unasked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union, overload

import torch
from torch import Tensor

from .. import _extension, backend
from . import checks
from .metadata import RangeDeltas, TokenRanges

# What an attention op returns: ``out``, or ``(out, lse)`` when ``return_lse=True``.
AttentionResult = Union[Tensor, tuple[Tensor, Tensor]]
# Token ranges [R, 2]: an int tensor, (start, end) pairs, or prepared TokenRanges.
RangesLike = Union[Tensor, Sequence, TokenRanges]

CHUNK_ATTENTION = backend.op("chunk_attention")
CACHED_ATTENTION = backend.op("cached_attention")


# ----------------------------------------------------------------------------- public ops


@overload
def chunk_attention(q: Tensor, k: Tensor, v: Tensor, *, frame_tokens: int, chunk_frames: int,
                    sink_frames: int = ..., window_frames: int | None = ...,
                    scale: float | None = ..., return_lse: Literal[False] = ...) -> Tensor: ...
@overload
def chunk_attention(q: Tensor, k: Tensor, v: Tensor, *, frame_tokens: int, chunk_frames: int,
                    sink_frames: int = ..., window_frames: int | None = ...,
                    scale: float | None = ..., return_lse: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def chunk_attention(q: Tensor, k: Tensor, v: Tensor, *, frame_tokens: int, chunk_frames: int,
                    sink_frames: int = ..., window_frames: int | None = ...,
                    scale: float | None = ..., return_lse: bool = ...) -> AttentionResult: ...


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, *, frame_tokens: int, chunk_frames: int,
                    sink_frames: int = 0, window_frames: int | None = None,
                    scale: float | None = None, return_lse: bool = False) -> AttentionResult:
    """Chunk-causal attention with an attention sink and a sliding window, over a whole sequence.

    The ``L`` tokens are frames of ``frame_tokens`` tokens (frame-major: a frame's tokens are
    consecutive), grouped into chunks of ``chunk_frames`` frames (the last may be partial). A
    query attends every key of its own chunk and of earlier chunks (bidirectional inside a chunk,
    causal across chunks), except that with ``window_frames`` an earlier key is kept only if it is
    in the first ``sink_frames`` frames (the sink) or within ``window_frames`` frames of the end
    of the query's chunk (Self-Forcing's ``local_attn_size``; LongLive uses window 12, sink 3).

    Args:
        q: queries ``[B, L, H, D]`` (tokens before heads, like flash-attn; from SDPA's
            ``[B, H, L, D]`` pass ``q.transpose(1, 2)``).
        k: keys ``[B, L, H_kv, D]``; ``H`` must be a multiple of ``H_kv`` (grouped heads: query
            head ``h`` reads kv head ``h // (H // H_kv)``).
        v: values ``[B, L, H_kv, Dv]``.
        frame_tokens: tokens per frame (``h * w`` of the latent grid); ``L`` must be a multiple.
        chunk_frames: frames per chunk (>= 1).
        sink_frames: leading frames every query may see (>= 0).
        window_frames: None (all earlier chunks) or an int >= ``chunk_frames``.
        scale: softmax scale; default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp of the scores.

    Returns:
        ``out [B, L, H, Dv]`` in q's dtype; with ``return_lse`` the pair ``(out, lse)``, ``lse``
        float32 ``[B, H, L]``.

    Raises ``ValueError`` naming the argument for any input outside these rules (``TypeError``,
    also a ``ValueError``, for a wrong kind of argument). Inputs: float32, float16, bfloat16
    (float64 on the reference backend); any strides. The exact definition, with a worked example
    of the mask: docs/spec.md §1 (``vidstream.reference.chunk_mask`` builds the mask)."""
    mask = _check_chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames)
    scale = checks.scale_value(scale, q.shape[3])
    q, k, v = (checks.rows_contiguous(t) for t in (q, k, v))
    grad = backend.needs_grad(q, k, v)
    return CHUNK_ATTENTION.resolve(q, grad)(q, k, v, frame_tokens, *mask, scale, return_lse)


# Per-range temporal offsets in frames: a number for every range, R numbers, a float tensor [R],
# or prepared RangeDeltas.
DeltasLike = Union[float, Sequence, Tensor, RangeDeltas, None]


@overload
def cached_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, kv_ranges: RangesLike, *,
                     kv_deltas: DeltasLike = ..., theta: float = ..., t_theta: Tensor | None = ...,
                     scale: float | None = ..., return_lse: Literal[False] = ...) -> Tensor: ...
@overload
def cached_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, kv_ranges: RangesLike, *,
                     kv_deltas: DeltasLike = ..., theta: float = ..., t_theta: Tensor | None = ...,
                     scale: float | None = ...,
                     return_lse: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def cached_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, kv_ranges: RangesLike, *,
                     kv_deltas: DeltasLike = ..., theta: float = ..., t_theta: Tensor | None = ...,
                     scale: float | None = ..., return_lse: bool = ...) -> AttentionResult: ...


def cached_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, kv_ranges: RangesLike, *,
                     kv_deltas: DeltasLike = None, theta: float = 10000.0,
                     t_theta: Tensor | None = None, scale: float | None = None,
                     return_lse: bool = False) -> AttentionResult:
    """One chunk's queries against the union of token ranges of a preallocated K/V pool.

    Every query attends every key whose pool index lies in one of the half-open ranges
    ``[start, end)`` of ``kv_ranges`` (no mask among them: the caller decides what the ranges
    hold, e.g. a sink, a ring-buffer window that wraps as two ranges, compressed mid blocks and
    the current chunk's slot).

    Args:
        q: queries ``[B, Lq, H, D]`` (tokens before heads; from ``[B, H, Lq, D]`` pass
            ``q.transpose(1, 2)``).
        k_pool: keys ``[B, P, H_kv, D]``, ``P`` the pool's capacity; ``H`` a multiple of ``H_kv``.
        v_pool: values ``[B, P, H_kv, Dv]``.
        kv_ranges: ``[R, 2]`` token ranges as an int tensor, a list of ``(start, end)`` pairs or
            prepared ``vidstream.TokenRanges`` (trusted, not read back to the host: for CUDA
            graphs). In bounds, pairwise disjoint, any order; empty ranges allowed.
        kv_deltas: None, or per-range temporal offsets in frames (a number for every range, or
            ``R`` finite numbers, fractional and negative allowed): every key of range ``r`` is
            read as if ``rope3d_shift_``-ed by ``kv_deltas[r]`` frames (positions as metadata:
            the pool is never written). ``cached_attention(q, k, v, r, kv_deltas=d)`` equals
            ``cached_attention(q, rope3d_shift_(k.clone(), r, d), v, r)`` up to rounding.
        theta, t_theta: the RoPE of the keys, as given to ``rope3d`` (read only with
            ``kv_deltas``; ``t_theta`` per kv head ``[H_kv]``).
        scale: softmax scale; default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp of the scores.

    Returns:
        ``out [B, Lq, H, Dv]``; with ``return_lse`` ``(out, lse)``, ``lse`` float32
        ``[B, H, Lq]``. An empty union gives zeros and ``lse = -inf``.

    Raises ``ValueError`` naming the argument for inputs outside these rules. The definition and
    an example of the bounded cache's ranges: docs/spec.md §2."""
    ranges = _check_cached_attention(q, k_pool, v_pool, kv_ranges)
    deltas = range_deltas(kv_deltas, ranges, k_pool, t_theta, theta, "kv_deltas")
    scale = checks.scale_value(scale, q.shape[3])
    q, k_pool, v_pool = (checks.rows_contiguous(t) for t in (q, k_pool, v_pool))
    grad = backend.needs_grad(q, k_pool, v_pool)
    fn = CACHED_ATTENTION.resolve(q, grad)
    if deltas is None:
        return fn(q, k_pool, v_pool, ranges, scale, return_lse)
    return fn(q, k_pool, v_pool, ranges, scale, return_lse, deltas, float(theta), t_theta)


# ----------------------------------------------------------------------------- input checks


def check_qkv(q, k, v, k_name="k", v_name="v") -> None:
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


@checks.layout_hint(q="[B, L, H, D]", k="[B, L, H_kv, D]", v="[B, L, H_kv, Dv]")
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


def bounded_mask_params(frames: int, chunk_frames: int, sink_frames: int,
                        window_frames: int | None) -> tuple[int, int, int | None]:
    """Equivalent mask parameters no larger than the sequence (``frames`` frames): a chunk of at
    least ``frames`` frames is one chunk; a sink of at least ``frames`` holds every frame; a
    window reaches back from a chunk end, which is below ``2 * frames``, so any longer window
    sees everything. Kernels then form ``x * frame_tokens`` without int64 overflow for any input."""
    n = max(frames, 1)
    chunk = min(chunk_frames, n)
    window = None if window_frames is None else max(chunk, min(window_frames, 2 * n))
    return chunk, min(sink_frames, n), window


@checks.layout_hint(q="[B, Lq, H, D]", k_pool="[B, P, H_kv, D]", v_pool="[B, P, H_kv, Dv]")
def _check_cached_attention(q, k_pool, v_pool, kv_ranges) -> TokenRanges:
    check_qkv(q, k_pool, v_pool, "k_pool", "v_pool")
    return checks.ranges(kv_ranges, k_pool.shape[1], "kv_ranges", q.device)


def range_deltas(deltas, ranges: TokenRanges, keys: Tensor, t_theta, theta,
                 name: str) -> Tensor | None:
    """Per-range temporal offsets as float64 [R] host values, or None where there are none or
    all are 0 (then the op is the one without offsets, bit for bit). ``keys`` [B, P, H_kv, D]
    gives the head count ``t_theta`` must match."""
    checks.rope_params(theta)
    checks.t_theta(t_theta, keys.shape[2])
    if deltas is None:
        return None
    if isinstance(deltas, RangeDeltas):  # prepared: its length is all there is to check
        if len(deltas) != len(ranges):
            checks.fail(f"{name} must have one entry per range ({len(ranges)}), got {len(deltas)}")
        return deltas.tensor if deltas.any else None
    out = checks.positions(deltas, len(ranges), name, "R")
    if not torch.compiler.is_compiling() and not bool(out.any()):
        return None
    return out


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


def dense_attention(q, k, v, scale, return_lse, keep=None) -> AttentionResult:
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


def empty_attention(q, dv: int, return_lse: bool) -> AttentionResult:
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
                          return_lse) -> AttentionResult:
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


def shifted_keys(k_pool: Tensor, ranges: TokenRanges, deltas: Tensor, theta, t_theta) -> Tensor:
    """The keys of ``ranges`` gathered in range order [B, N, H_kv, D], each moved by its range's
    offset (``deltas`` float64 [R]) as ``rope3d_shift_`` moves it."""
    return shift_gathered(gather_tokens(k_pool, ranges), ranges, deltas, theta, t_theta)


def shift_gathered(k: Tensor, ranges: TokenRanges, deltas: Tensor, theta, t_theta) -> Tensor:
    """Keys ``k`` [B, N, H_kv, D] gathered from ``ranges`` in range order, each moved by its
    range's offset: the temporal band rotated in float32 (float64 for float64) from float64
    angles, rounded once to k's dtype, as ``rope3d_shift_`` does."""
    from .rope_math import rope_bands, rotate_pairs, temporal_angles

    lengths = torch.tensor([max(e - s, 0) for s, e in ranges._host()], dtype=torch.int64)
    per_token = deltas.to(torch.float64).repeat_interleave(lengths).to(k.device)
    c_t = rope_bands(k.shape[3])[0]
    band = rotate_pairs(k[..., : 2 * c_t], temporal_angles(per_token, c_t, theta, t_theta)[None])
    return torch.cat([band, k[..., 2 * c_t:]], dim=-1)


def cached_attention_eager(q, k_pool, v_pool, ranges: TokenRanges, scale, return_lse,
                           deltas=None, theta=10000.0, t_theta=None) -> AttentionResult:
    if deltas is not None:  # the definition: shift a copy of the pool, then attend
        from .rope3d import rope3d_shift_eager_

        k_pool = rope3d_shift_eager_(k_pool.clone(), ranges, deltas, theta, t_theta)
    keep = ranges.membership(k_pool.shape[1], q.device).any(dim=0)
    return dense_attention(q, k_pool, v_pool, scale, return_lse, keep)


def chunk_attention_reference(q, k, v, *, frame_tokens, chunk_frames, sink_frames=0,
                              window_frames=None, scale=None, return_lse=False) -> AttentionResult:
    """``chunk_attention`` computed eagerly, chunk by chunk (the oracle)."""
    mask = _check_chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames)
    scale = checks.scale_value(scale, q.shape[3])
    return chunk_attention_eager(q, k, v, frame_tokens, *mask, scale, return_lse)


def cached_attention_reference(q, k_pool, v_pool, kv_ranges, *, kv_deltas=None, theta=10000.0,
                               t_theta=None, scale=None, return_lse=False) -> AttentionResult:
    """``cached_attention`` computed eagerly (the oracle)."""
    ranges = _check_cached_attention(q, k_pool, v_pool, kv_ranges)
    deltas = range_deltas(kv_deltas, ranges, k_pool, t_theta, theta, "kv_deltas")
    scale = checks.scale_value(scale, q.shape[3])
    return cached_attention_eager(q, k_pool, v_pool, ranges, scale, return_lse, deltas, theta,
                                  t_theta)


# ----------------------------------------------------------------------------- kernels


def _pick(out, lse, return_lse):
    return (out, lse) if return_lse else out


def _chunk_attention_native(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                            return_lse):
    out, lse = torch.ops.vidstream.chunk_attention(q, k, v, frame_tokens, chunk_frames, sink_frames,
                                                   window_frames, float(scale))
    return _pick(out, lse, return_lse)


def _cached_attention_native(q, k_pool, v_pool, ranges, scale, return_lse, deltas=None,
                             theta=10000.0, t_theta=None):
    out, lse = torch.ops.vidstream.cached_attention(q, k_pool, v_pool, ranges.tensor, float(scale),
                                                    deltas, float(theta), t_theta)
    return _pick(out, lse, return_lse)


def _chunk_attention_triton(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                            return_lse):
    from ..triton_kernels import attention as kernels

    out, lse = kernels.chunk_attention_triton(q, k, v, frame_tokens, chunk_frames, sink_frames,
                                              window_frames, float(scale))
    return _pick(out, lse, return_lse)


def _cached_attention_triton(q, k_pool, v_pool, ranges, scale, return_lse, deltas=None,
                             theta=10000.0, t_theta=None):
    from ..triton_kernels import attention as kernels

    out, lse = kernels.cached_attention_triton(q, k_pool, v_pool, ranges.tensor, float(scale),
                                               deltas, float(theta), t_theta)
    return _pick(out, lse, return_lse)


def _attention_outputs(q, v):
    B, L, H, _ = q.shape
    return q.new_empty(B, L, H, v.shape[3]), q.new_empty(B, H, L, dtype=torch.float32)


@_extension.register_fake("chunk_attention")
def _chunk_attention_fake(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale):
    return _attention_outputs(q, v)


@_extension.register_fake("cached_attention")
def _cached_attention_fake(q, k_pool, v_pool, kv_ranges, scale, kv_deltas=None, theta=10000.0,
                           t_theta=None):
    return _attention_outputs(q, v_pool)


CHUNK_ATTENTION.register("reference", chunk_attention_eager)
CACHED_ATTENTION.register("reference", cached_attention_eager)
CHUNK_ATTENTION.register("cpu", _chunk_attention_native)
CACHED_ATTENTION.register("cpu", _cached_attention_native)
# The CUDA default only where vidstream/validated.json validates them (bench/gpu_check.sh records it).
CHUNK_ATTENTION.register("triton", _chunk_attention_triton)
CACHED_ATTENTION.register("triton", _cached_attention_triton)
def _cuda_serves(q: torch.Tensor) -> str | None:
    """What the tensor-core kernels serve beyond every kernel (v's head dim is checked with the
    other arguments: it must equal q's on this backend)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda attention kernels take float16 or bfloat16, got {q.dtype}"
    if q.dim() == 4 and q.shape[3] not in (64, 128):
        return f"the cuda attention kernels serve head dims 64 and 128, got q head dim {q.shape[3]}"
    return None


# Hand-written mma.sync kernels (csrc/kernels/attention.cu): float16/bfloat16, head dims 64/128.
def _same_head_dims(q, v, v_name):
    if v.shape[3] != q.shape[3]:
        checks.fail(f"the cuda attention kernels need {v_name}'s head dim equal to q's "
                    f"({q.shape[3]}), got {v.shape[3]}")


def _chunk_attention_cuda(q, k, v, *args):
    _same_head_dims(q, v, "v")
    return _chunk_attention_native(q, k, v, *args)


def _cached_attention_cuda(q, k_pool, v_pool, *args):
    _same_head_dims(q, v_pool, "v_pool")
    return _cached_attention_native(q, k_pool, v_pool, *args)


CHUNK_ATTENTION.register("cuda", _chunk_attention_cuda, serves=_cuda_serves)
CACHED_ATTENTION.register("cuda", _cached_attention_cuda, serves=_cuda_serves)


# ----------------------------------------------------------------------------- torch backend
# ---- torch backend: PyTorch's own fused attention (SDPA), on any device and float dtype. The
# keys are gathered (or sliced) first, so no mask is needed: flash / efficient / cuDNN on a GPU,
# the CPU flash kernel on the CPU; a key outside the ranges is never read (docs/spec.md NaN rule).


def _sdp_choice(q, k, v, scale):
    """The SDPBackend value SDPA would pick for q, k, v (``torch.nn.attention.sdpa_kernel``
    respected), or None where torch cannot tell."""
    try:
        return torch.ops.aten._fused_sdp_choice(q, k, v, scale=scale)
    except (RuntimeError, NotImplementedError):
        return None


def _sdpa_lse_cuda(q, k, v, scale):
    """(out, lse) from the fused kernel SDPA would pick for q, k, v [B, H, L, *], or None where
    none of them can return the lse."""
    from torch.nn.attention import SDPBackend

    aten = torch.ops.aten
    errors = (RuntimeError, NotImplementedError)
    # Head dims padded to a multiple of 8 with zero channels, as SDPA itself pads for its
    # kernels: no score and no output changes.
    Dv = v.shape[-1]
    if q.shape[-1] % 8:
        q, k = (torch.nn.functional.pad(t, (0, -q.shape[-1] % 8)) for t in (q, k))
    if Dv % 8:
        v = torch.nn.functional.pad(v, (0, -Dv % 8))
    choice = _sdp_choice(q, k, v, scale)
    fused = (SDPBackend.FLASH_ATTENTION.value, SDPBackend.EFFICIENT_ATTENTION.value,
             SDPBackend.CUDNN_ATTENTION.value)
    if choice not in fused:
        return None
    # cuDNN's lse layout differs between releases: its choice is served by flash (which takes
    # the same 16-bit inputs) or else the efficient kernel.
    if choice != SDPBackend.EFFICIENT_ATTENTION.value and q.dtype in (torch.float16, torch.bfloat16) \
            and q.shape[-1] == v.shape[-1]:
        try:
            res = aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
            return res[0][..., :Dv], res[1]
        except errors:
            pass
    try:
        res = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)
    except errors:
        return None
    return res[0][..., :Dv], res[1][..., : q.shape[2]]  # its lse rows are padded to 32


def _sdpa_bhld(q, k, v, scale, need_lse):
    """Fused attention on [B, H, L, *] tensors with one head count (GQA folded by the caller):
    (out [B, H, Lq, Dv], lse [B, H, Lq] or None), or None where no fused kernel serves them."""
    if q.device.type == "cpu":
        # The CPU flash kernel (the one SDPA runs here) always yields the lse. It runs one
        # precision up: in float32 it errs up to ~3x eager PyTorch (measured), in 16 bits its
        # lse is off by ~2**-17 relative, both past the accuracy rule; in float64 it is exact
        # to rounding. (The torch backend is no CPU default: the C++ kernels are.) It needs
        # one head dim for q, k and v: zero channels change no score and no output.
        D, Dv = q.shape[-1], v.shape[-1]
        dtype = q.dtype
        up = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
        q, k, v = q.to(up), k.to(up), v.to(up)
        if Dv < D:
            v = torch.nn.functional.pad(v, (0, D - Dv))
        elif Dv > D:
            q, k = (torch.nn.functional.pad(t, (0, Dv - D)) for t in (q, k))
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v,
                                                                                  scale=scale)
        except (RuntimeError, NotImplementedError):
            return None
        return out[..., :Dv].to(dtype), lse
    if not need_lse:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), None
    return _sdpa_lse_cuda(q, k, v, scale) if q.device.type == "cuda" else None


def sdpa_attention(q, k, v, scale, return_lse) -> AttentionResult:
    """Every query of q [B, Lq, H, D] over all of k [B, N, H_kv, D], v [B, N, H_kv, Dv] with
    PyTorch's fused attention; out [B, Lq, H, Dv] (and lse float32 [B, H, Lq]). N = 0 gives
    zeros and lse = -inf. The eager formulation serves what no fused kernel takes."""
    B, Lq, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    if k.shape[1] == 0 or B * Lq == 0:
        return empty_attention(q, Dv, return_lse)
    if D == 0 or Dv == 0:  # degenerate head dims the kernels refuse: the eager form
        return dense_attention(q, k, v, scale, return_lse)
    G = H // Hk
    # GQA without repeating K/V: with no mask, the G query heads that share a kv head are just
    # G times as many queries of that head (query head h = h_kv * G + g, docs/spec.md).
    qf = q.unflatten(2, (Hk, G)).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * Lq, D)
    res = _sdpa_bhld(qf, k.transpose(1, 2), v.transpose(1, 2), scale, return_lse)
    if res is None:
        return dense_attention(q, k, v, scale, return_lse)
    o, lse = res
    out = o.unflatten(2, (G, Lq)).permute(0, 3, 1, 2, 4).reshape(B, Lq, H, Dv)
    if lse is not None:
        lse = lse.reshape(B, H, Lq).float()
    out, lse = _ieee_rows(q, k, out, lse)
    return (out, lse) if return_lse else out


def _ieee_rows(q, k, out, lse):
    """docs/spec.md's NaN/Inf rule where fused kernels take a row of non-finite scores for a
    masked row and zero it: a row is NaN when its query holds a NaN or Inf, when a key it reads
    holds a NaN (a NaN score), or when every key it reads holds an Inf (each score +-inf or NaN:
    inf - inf in the softmax). A key with an Inf among finite ones needs no help (+inf score:
    the kernels give NaN; -inf: the key drops out). Every query here reads every key. Selects
    only: every other value is kept bitwise, and nothing is read back to the host."""
    G = q.shape[2] // k.shape[2]
    nan = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
    # One pass over each tensor: min and max per row of channels (NaN propagates through both).
    q_lo, q_hi = torch.aminmax(q, dim=-1)  # [B, Lq, H]
    k_lo, k_hi = torch.aminmax(k, dim=-1)  # [B, N, H_kv]
    finite_key = torch.isfinite(k_lo) & torch.isfinite(k_hi)
    poisoned = torch.isnan(k_hi).any(dim=1) | ~finite_key.any(dim=1)  # [B, H_kv]
    rows = ~(torch.isfinite(q_lo) & torch.isfinite(q_hi)) | poisoned.repeat_interleave(
        G, dim=1)[:, None, :]
    if lse is not None:  # a non-finite lse is a NaN row too (a kernel that reports it)
        rows = rows | ~torch.isfinite(lse).transpose(1, 2)
        lse = torch.where(rows.transpose(1, 2), nan.float(), lse)
    return torch.where(rows[..., None], nan, out), lse


def _merged_spans(pairs) -> list:
    """The non-empty ranges, adjacent ones merged: attention is a sum over a key set, so pool
    order serves as well as range order, and a union that is one span needs no gather."""
    spans = []
    for s, e in sorted(p for p in pairs if p[1] > p[0]):
        if spans and spans[-1][1] == s:
            spans[-1][1] = e
        else:
            spans.append([s, e])
    return spans


def _cached_attention_torch(q, k_pool, v_pool, ranges: TokenRanges, scale, return_lse,
                            deltas=None, theta=10000.0, t_theta=None):
    if ranges.pairs is None:  # traced values: no token count on the host, the masked form
        return cached_attention_eager(q, k_pool, v_pool, ranges, scale, return_lse, deltas, theta,
                                      t_theta)
    if deltas is not None:
        # The keys are gathered in range order and their temporal band rotated by each one's
        # range offset (float64 angles, rotated in float32, rounded once as rope3d_shift_ does).
        k = shifted_keys(k_pool, ranges, deltas, theta, t_theta)
        return sdpa_attention(q, k, gather_tokens(v_pool, ranges), scale, return_lse)
    spans = _merged_spans(ranges.pairs)
    if len(spans) == 1:
        (s, e), = spans
        k, v = k_pool[:, s:e], v_pool[:, s:e]
    else:  # one gather per call, through the index the ranges object keeps per device
        k, v = gather_tokens(k_pool, ranges), gather_tokens(v_pool, ranges)
    return sdpa_attention(q, k, v, scale, return_lse)


def _slid(spans, shift: int) -> list:
    """The spans of the chunk ``shift`` tokens later when the window slides: a span starting at
    token 0 (the sink) stays, the window moves."""
    return [(a, b) if a == 0 else (a + shift, b + shift) for a, b in spans]


def _chunk_attention_torch(q, k, v, frame_tokens, chunk_frames, sink_frames, window_frames, scale,
                           return_lse):
    """One SDPA call, without a mask, per run of consecutive full chunks whose keys are the same
    spans slid by one chunk each (every chunk once the window slides: their keys are gathered
    into a batch); one call per chunk otherwise, on a slice of k and v where the chunk's keys are
    one span."""
    B, L, H, _ = q.shape
    Dv = v.shape[3]
    if L == 0 or B == 0:
        return empty_attention(q, Dv, return_lse)
    lc = chunk_frames * frame_tokens
    n_chunks = -(-L // lc)
    out = q.new_empty(B, L, H, Dv)
    lse = q.new_empty(B, H, L, dtype=torch.float32) if return_lse else None
    c = 0
    while c < n_chunks:
        spans = chunk_key_spans(c, L, frame_tokens, chunk_frames, sink_frames, window_frames)
        n = 1
        if (c + 1) * lc <= L and any(a > 0 for a, _ in spans):
            while (c + n + 1) * lc <= L and chunk_key_spans(
                    c + n, L, frame_tokens, chunk_frames, sink_frames, window_frames) == _slid(
                    spans, n * lc):
                n += 1
        q0, q1 = c * lc, min((c + n) * lc, L)
        if n == 1 and len(spans) == 1:
            (a, b), = spans
            kc, vc, qc = k[:, a:b], v[:, a:b], q[:, q0:q1]
        else:
            base = torch.cat([torch.arange(a, b, device=q.device) for a, b in spans])
            slides = torch.cat([torch.full((b - a,), a > 0, device=q.device) for a, b in spans])
            idx = base + (torch.arange(n, device=q.device)[:, None] * lc) * slides
            K = idx.shape[1]
            kc = k.index_select(1, idx.reshape(-1)).view(B * n, K, *k.shape[2:])
            vc = v.index_select(1, idx.reshape(-1)).view(B * n, K, *v.shape[2:])
            qc = q[:, q0:q1].reshape(B * n, lc if n > 1 else q1 - q0, H, q.shape[3])
        res = sdpa_attention(qc, kc, vc, scale, return_lse)
        o, lo = res if return_lse else (res, None)
        out[:, q0:q1] = o.reshape(B, q1 - q0, H, Dv)
        if return_lse:
            lse[:, :, q0:q1] = lo.reshape(B, n, H, -1).transpose(1, 2).reshape(B, H, q1 - q0)
        c += n
    return (out, lse) if return_lse else out


CHUNK_ATTENTION.register("torch", _chunk_attention_torch)
CACHED_ATTENTION.register("torch", _cached_attention_torch)


# ----------------------------------------------------------------------------- autograd
# Backward of the kernel ops (issue #14), registered the torch.library way on the C++ ops
# (vidstream::chunk_attention, vidstream::cached_attention: every device they have a backward
# kernel for) and on the Triton ops (vidstream::*_attention_triton). Saved: q, k, v, out, lse
# (the forward always returns lse) and the non-tensor arguments; the backward kernels recompute P
# from lse (never L x L). A gradient of lse (``return_lse=True`` and used) is folded in exactly
# (autograd_utils.fold_lse_grad). reference and torch are differentiated by autograd itself.

from . import autograd_utils as _ag  # noqa: E402


def _attention_setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = inputs[3:]
    ctx.set_materialize_grads(False)  # an unused lse has no gradient: skip its fold


def _cached_setup_context(ctx, inputs, output):
    q, k_pool, v_pool, kv_ranges, scale = inputs[:5]
    rest = tuple(inputs[5:]) + (None, 10000.0, None)[len(inputs) - 5:]
    kv_deltas, theta, t_theta = rest
    out, lse = output
    ctx.save_for_backward(q, k_pool, v_pool, out, lse, kv_ranges, kv_deltas, t_theta)
    ctx.scale, ctx.theta = scale, theta
    ctx.set_materialize_grads(False)


def _chunk_backward_with(kernel):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None, None
        dq, dk, dv = _ag.attention_grads(kernel, dout, dlse, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None

    return backward


def _cached_backward_with(kernel):
    def backward(ctx, dout, dlse):
        q, k_pool, v_pool, out, lse, kv_ranges, kv_deltas, t_theta = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None, None
        dq, dk, dv = _ag.attention_grads(kernel, dout, dlse, q, k_pool, v_pool, out, lse,
                                         kv_ranges, float(ctx.scale), kv_deltas,
                                         float(ctx.theta), t_theta)
        return dq, dk, dv, None, None, None, None, None

    return backward


def _chunk_backward_native(dout, q, k, v, out, lse, *args):
    return torch.ops.vidstream.chunk_attention_backward(dout, q, k, v, out, lse, *args)


def _cached_backward_native(dout, q, k_pool, v_pool, out, lse, kv_ranges, scale, kv_deltas,
                            theta, t_theta):
    return torch.ops.vidstream.cached_attention_backward(dout, q, k_pool, v_pool, out, lse,
                                                         kv_ranges, scale, kv_deltas, theta,
                                                         t_theta)


if _extension.load():
    torch.library.register_autograd("vidstream::chunk_attention",
                                    _chunk_backward_with(_chunk_backward_native),
                                    setup_context=_attention_setup_context)
    torch.library.register_autograd("vidstream::cached_attention",
                                    _cached_backward_with(_cached_backward_native),
                                    setup_context=_cached_setup_context)


def _chunk_backward_triton(dout, q, k, v, out, lse, frame_tokens, chunk_frames, sink_frames,
                           window_frames, scale):
    from ..triton_kernels import attention_backward as kernels

    return kernels.chunk_attention_backward_triton(dout, q, k, v, out, lse, frame_tokens,
                                                   chunk_frames, sink_frames, window_frames,
                                                   float(scale))


def _cached_backward_triton(dout, q, k_pool, v_pool, out, lse, kv_ranges, scale, kv_deltas,
                            theta, t_theta):
    from ..triton_kernels import attention_backward as kernels

    return kernels.cached_attention_backward_triton(dout, q, k_pool, v_pool, out, lse, kv_ranges,
                                                    float(scale), kv_deltas, float(theta), t_theta)


def _register_triton_attention_autograd():
    from ..triton_kernels import attention as kernels

    kernels.chunk_attention_triton.register_autograd(
        _chunk_backward_with(_chunk_backward_triton), setup_context=_attention_setup_context)
    kernels.cached_attention_triton.register_autograd(
        _cached_backward_with(_cached_backward_triton), setup_context=_cached_setup_context)


_ag.on_triton("attention", _register_triton_attention_autograd)
for _op in (CHUNK_ATTENTION, CACHED_ATTENTION):
    _op.mark_differentiable("triton", _ag.triton_ready("attention"))
CHUNK_ATTENTION.mark_differentiable("cpu", _ag.kernel_backward("chunk_attention_backward", "CPU"))
CACHED_ATTENTION.mark_differentiable("cpu", _ag.kernel_backward("cached_attention_backward", "CPU"))
# CUDA backward kernels are not part of issue #14 (Triton serves the GPU): differentiable only
# where a build registers them.
CHUNK_ATTENTION.mark_differentiable("cuda", _ag.kernel_backward("chunk_attention_backward", "CUDA"))
CACHED_ATTENTION.mark_differentiable("cuda", _ag.kernel_backward("cached_attention_backward", "CUDA"))


def _lse_by_autograd(run, eager, lse_at: int):
    """The torch backend's ``run`` where a gradient may flow through a returned lse: PyTorch's
    fused attention returns its lse without a derivative, so with ``return_lse`` (argument
    ``lse_at``) and inputs that require grad the eager formulation runs instead (autograd
    differentiates its logsumexp; materialised scores, as the reference)."""

    def wrapped(*args):
        if args[lse_at] and backend.needs_grad(*args[:3]):
            return eager(*args)
        return run(*args)

    return wrapped


CHUNK_ATTENTION.register("torch", _lse_by_autograd(_chunk_attention_torch, chunk_attention_eager, 8))
CACHED_ATTENTION.register("torch", _lse_by_autograd(_cached_attention_torch, cached_attention_eager,
                                                    5))


def _backward_outputs(dout, q, k, v, *args):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _has_fake(op: str) -> bool:
    """Whether ``vidstream::op`` already has a fake registered (by its kernel's author)."""
    try:
        from torch._library.simple_registry import singleton

        return singleton.find(f"vidstream::{op}").fake_impl.kernel is not None
    except (ImportError, AttributeError):
        return False


# The backward ops' fakes (for torch.compile of a backward through the C++ kernels), unless the
# kernels' own module registered them first.
for _name in ("chunk_attention_backward", "cached_attention_backward"):
    if _extension.load() and not _has_fake(_name):
        _extension.register_fake(_name)(_backward_outputs)
