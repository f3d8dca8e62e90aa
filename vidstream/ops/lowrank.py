"""The low-rank (latent) KV cache ops (docs/spec.md §4) and the strategies behind the attention.

``lowrank_cached_attention`` has three ways to attend over a latent cache:

``"decompress"``  decompress the active context once per call into a transient K/V
                  (``lowrank_decompress`` of the backend), then ``vidstream.cached_attention``.
``"absorb"``      fold ``w_uk`` into the queries (``q_lat[h] = q_nope[h] @ w_uk[h]^T``) and attend
                  in the latent space: keys ``concat(c, k_r)`` and values ``c`` shared by all heads
                  (one kv head, head dim ``d_c + d_r``), then ``out[h] = o_lat[h] @ w_uv[h]``. The
                  softmax scale stays that of the original query, ``(d_nope + d_r) ** -0.5`` by
                  default, since ``q_lat . c == q_nope . k_nope``.
``"tiled"``       decompress one KV tile at a time inside the attention kernel (C++ CPU only).

With ``strategy=None`` the backend picks by ``choose_strategy`` (a cost model checked against
the measurements of ``bench/bench_lowrank.py``).

Backends: ``cpu`` runs "tiled" and "absorb" as one fused C++ kernel and "decompress" as its C++
decompression + ``cached_attention``; ``triton`` runs "absorb" as a fused Triton latent-attention
kernel and "decompress" as its Triton decompression + ``cached_attention``; ``cuda`` has
``lowrank_decompress`` only (no C++ CUDA attention op: on CUDA tensors the attention runs on the
``triton`` backend). The GPU kernels are not yet validated on a GPU (opt-in). A strategy that
composes ``cached_attention`` uses that op's implementation on the same backend.
Kernels: ``csrc/{cpu,cuda}/lowrank.cpp``, ``csrc/kernels/lowrank.*``, ``triton_kernels/lowrank.py``.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from .. import _extension, backend
from . import checks
from .attention import (
    CACHED_ATTENTION,
    AttentionResult,
    DeltasLike,
    RangesLike,
    cached_attention_eager,
    empty_attention,
    gather_tokens,
    range_deltas,
    shift_gathered,
)
from .metadata import TokenRanges

STRATEGIES = ("decompress", "absorb", "tiled")
LOWRANK_DECOMPRESS = backend.op("lowrank_decompress")
LOWRANK_CACHED_ATTENTION = backend.op("lowrank_cached_attention")


def lowrank_decompress(c_pool: Tensor, w_uk: Tensor, w_uv: Tensor, kv_ranges: RangesLike,
                       k_r_pool: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Full keys and values of the tokens in ``kv_ranges`` of a low-rank (latent) KV cache.

    The cache keeps per token a latent ``c`` of ``d_c`` values and, optionally, a positional key
    ``k_r`` of ``d_r`` values, both shared by all heads; head ``h`` reconstructs
    ``k_h = concat(c @ w_uk[h], k_r)`` and ``v_h = c @ w_uv[h]`` (VideoMLA; build the weights
    from a dense K/V projection with ``vidstream.LowRankKV.from_dense``).

    Args:
        c_pool: latents ``[B, P, d_c]``.
        w_uk: key up-projections ``[H, d_c, d_nope]``.
        w_uv: value up-projections ``[H, d_c, d_v]``.
        kv_ranges: ``[R, 2]`` token ranges into the pool (int tensor, pairs or prepared
            ``TokenRanges``; in bounds, disjoint).
        k_r_pool: positional keys ``[B, P, d_r]`` (already rotated), or None.

    Returns:
        ``(k [B, N, H, d_nope + d_r], v [B, N, H, d_v])``, ``N`` the tokens of the ranges, range
        by range in the order given. Definition: docs/spec.md §4."""
    ranges = _check_lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    grad = backend.needs_grad(c_pool, w_uk, w_uv, k_r_pool)
    return LOWRANK_DECOMPRESS.resolve(c_pool, grad)(c_pool, w_uk, w_uv, ranges, k_r_pool)


@overload
def lowrank_cached_attention(q: Tensor, c_pool: Tensor, w_uk: Tensor, w_uv: Tensor,
                             kv_ranges: RangesLike, *, k_r_pool: Tensor | None = ...,
                             kv_deltas: DeltasLike = ..., theta: float = ...,
                             scale: float | None = ..., return_lse: Literal[False] = ...,
                             strategy: str | None = ...) -> Tensor: ...
@overload
def lowrank_cached_attention(q: Tensor, c_pool: Tensor, w_uk: Tensor, w_uv: Tensor,
                             kv_ranges: RangesLike, *, k_r_pool: Tensor | None = ...,
                             kv_deltas: DeltasLike = ..., theta: float = ...,
                             scale: float | None = ..., return_lse: Literal[True],
                             strategy: str | None = ...) -> tuple[Tensor, Tensor]: ...
@overload
def lowrank_cached_attention(q: Tensor, c_pool: Tensor, w_uk: Tensor, w_uv: Tensor,
                             kv_ranges: RangesLike, *, k_r_pool: Tensor | None = ...,
                             kv_deltas: DeltasLike = ..., theta: float = ...,
                             scale: float | None = ..., return_lse: bool = ...,
                             strategy: str | None = ...) -> AttentionResult: ...


def lowrank_cached_attention(q: Tensor, c_pool: Tensor, w_uk: Tensor, w_uv: Tensor,
                             kv_ranges: RangesLike, *, k_r_pool: Tensor | None = None,
                             kv_deltas: DeltasLike = None, theta: float = 10000.0,
                             scale: float | None = None, return_lse: bool = False,
                             strategy: str | None = None) -> AttentionResult:
    """``cached_attention`` over a low-rank (latent) KV cache, without keeping its decompressed
    keys and values: equal to ``cached_attention(q, *lowrank_decompress(...), [[0, N]])``.

    Args:
        q: queries ``[B, Lq, H, d_nope + d_r]`` (``B`` of ``c_pool``, ``H`` of ``w_uk``).
        c_pool, w_uk, w_uv, kv_ranges, k_r_pool: the latent cache, as in ``lowrank_decompress``.
        kv_deltas, theta: per-range temporal offsets of the RoPE key ``k_r_pool`` (rotated by
            ``rope3d`` with head dim ``d_r``), as ``kv_deltas`` of ``cached_attention``: the
            tokens of range ``r`` are read as if their ``k_r`` were ``rope3d_shift_``-ed by
            ``kv_deltas[r]``. Needs ``k_r_pool`` (the latents carry no position).
        scale: softmax scale; default ``(d_nope + d_r) ** -0.5``.
        return_lse: also return the float32 log-sum-exp ``[B, H, Lq]``.
        strategy: None (chosen per shape), ``"decompress"`` (once per call, then
            ``cached_attention``), ``"absorb"`` (``w_uk`` folded into the queries, attention in
            the latent space) or ``"tiled"`` (decompressed per tile inside the kernel, CPU only);
            the reference backend ignores it (it is the definition).

    Returns:
        ``out [B, Lq, H, d_v]``, or ``(out, lse)`` with ``return_lse``; an empty union gives zeros
        and ``lse = -inf``. Definition: docs/spec.md §4."""
    ranges = _check_lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    _check_lowrank_query(q, c_pool, w_uk, k_r_pool)
    deltas = _check_k_r_deltas(kv_deltas, ranges, k_r_pool, theta)
    scale = checks.scale_value(scale, q.shape[3])
    if strategy is not None and strategy not in STRATEGIES:
        checks.fail(f"strategy must be None or one of {', '.join(STRATEGIES)}, got {strategy!r}")
    grad = backend.needs_grad(q, c_pool, w_uk, w_uv, k_r_pool)
    fn = LOWRANK_CACHED_ATTENTION.resolve(q, grad)
    rope = () if deltas is None else (deltas, float(theta))
    return fn(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale, return_lse, strategy, *rope)


def _check_k_r_deltas(kv_deltas, ranges: TokenRanges, k_r_pool, theta) -> Tensor | None:
    if kv_deltas is not None and k_r_pool is None:
        checks.fail("kv_deltas moves the RoPE key k_r_pool; without k_r_pool the latents carry "
                    "no position to move")
    return range_deltas(kv_deltas, ranges, _as_heads(k_r_pool), None, theta, "kv_deltas") \
        if kv_deltas is not None else None


def _as_heads(k_r: Tensor) -> Tensor:
    """[B, N, d_r] as keys of one kv head [B, N, 1, d_r] (a view)."""
    return k_r.unsqueeze(2)


def shifted_k_r_pool(k_r_pool: Tensor, ranges: TokenRanges, deltas, theta, shift=None) -> Tensor:
    """A copy of ``k_r_pool`` with each range moved by its offset (``shift``: a backend's
    ``rope3d_shift_`` implementation, default the eager one)."""
    from .rope3d import rope3d_shift_eager_

    out = k_r_pool.clone()
    (shift or rope3d_shift_eager_)(_as_heads(out), ranges, deltas, theta, None)
    return out


# ----------------------------------------------------------------------------- input checks


def _check_lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool) -> TokenRanges:
    checks.tensor(c_pool, "c_pool", 3, "[B, P, d_c]")
    checks.floating(c_pool, "c_pool")
    checks.tensor(w_uk, "w_uk", 3, "[H, d_c, d_nope]")
    checks.tensor(w_uv, "w_uv", 3, "[H, d_c, d_v]")
    checks.same("c_pool", c_pool, "w_uk", w_uk)
    checks.same("c_pool", c_pool, "w_uv", w_uv)
    d_c = c_pool.shape[2]
    if w_uk.shape[1] != d_c:
        checks.fail(f"w_uk must have shape [H, d_c={d_c}, d_nope], got {tuple(w_uk.shape)}")
    if w_uv.shape[0] != w_uk.shape[0] or w_uv.shape[1] != d_c:
        checks.fail(f"w_uv must have shape [H={w_uk.shape[0]}, d_c={d_c}, d_v], got "
                    f"{tuple(w_uv.shape)}")
    if k_r_pool is not None:
        checks.tensor(k_r_pool, "k_r_pool", 3, "[B, P, d_r]")
        checks.same("c_pool", c_pool, "k_r_pool", k_r_pool)
        if k_r_pool.shape[:2] != c_pool.shape[:2]:
            checks.fail(f"k_r_pool must have the batch and tokens of c_pool "
                        f"{tuple(c_pool.shape[:2])}, got {tuple(k_r_pool.shape[:2])}")
    return checks.ranges(kv_ranges, c_pool.shape[1], "kv_ranges", c_pool.device)


@checks.layout_hint(q="[B, Lq, H, d_nope + d_r]")
def _check_lowrank_query(q, c_pool, w_uk, k_r_pool):
    checks.tensor(q, "q", 4, "[B, Lq, H, d_nope + d_r]")
    checks.same("c_pool", c_pool, "q", q)
    d_r = 0 if k_r_pool is None else k_r_pool.shape[2]
    want = (c_pool.shape[0], w_uk.shape[0], w_uk.shape[2] + d_r)
    if (q.shape[0], q.shape[2], q.shape[3]) != want:
        checks.fail(f"q must have shape [B={want[0]}, Lq, H={want[1]}, d_nope + d_r = {want[2]}], "
                    f"got {tuple(q.shape)}")


def attention_flops(batch: int, queries: int, tokens: int, heads: int, d_c: int, d_nope: int,
                    d_r: int, d_v: int) -> dict:
    """Multiply-adds of each strategy: what ``choose_strategy`` compares. Decompressing costs
    ``N H d_c (d_nope + d_v)`` once, then the attention works at head dim ``d_nope + d_r`` / ``d_v``;
    absorbing costs ``Lq H d_c (d_nope + d_v)`` for the two small products, then the attention
    works at ``d_c + d_r`` / ``d_c`` for every head."""
    up = heads * d_c * (d_nope + d_v)
    attn = batch * queries * tokens * heads
    expand = batch * tokens * up + attn * (d_nope + d_r + d_v)
    return {"decompress": expand, "tiled": expand,
            "absorb": batch * queries * up + attn * (2 * d_c + d_r)}


# Absorb when its multiply-adds are below this multiple of decompressing's. CPU, measured
# (bench/bench_lowrank.py strategy sweep, one thread, process time, Lq 1..1560, N 4680,
# d_c 64/192/512): absorb vs tiled took 0.12-0.76x the time below a ratio of 1.0, 1.0x at 1.0,
# 1.5-3.2x above 1.5, so the plain count is the rule. GPUs: not measured here; the same rule
# until bench/gpu_check.sh says otherwise.
ABSORB_FLOP_RATIO = {"cpu": 1.0, "triton": 1.0, "cuda": 1.0}


def choose_strategy(backend_name: str, batch: int, queries: int, tokens: int, heads: int, d_c: int,
                    d_nope: int, d_r: int, d_v: int) -> str:
    """The strategy a backend runs when none is asked for. Absorbing wins for few queries
    (decode-like) or a latent narrower than the heads (``2 d_c + d_r < d_nope + d_r + d_v``); a
    video chunk of thousands of queries against a 192-wide latent decompresses. On the CPU the
    decompression runs per KV chunk inside the fused kernel ("tiled"), which measured 2.7x
    faster than "decompress" (a whole-context K/V, then today's reference cached_attention) and
    level with eager einsum + SDPA; on a GPU, per-tile decompression would be repeated by
    every query block (``d_c (d_nope + d_v) / (block_q (d_nope + d_r + d_v))``, 1.3x the attention
    itself at Wan shapes and 128-query blocks), so the GPU backends decompress once per call."""
    f = attention_flops(batch, queries, tokens, heads, d_c, d_nope, d_r, d_v)
    if f["absorb"] < ABSORB_FLOP_RATIO.get(backend_name, 1.0) * f["decompress"]:
        return "absorb"
    return "tiled" if backend_name == "cpu" else "decompress"


# ----------------------------------------------------------------------------- implementations


def _attend(backend_name, q, k, v, scale, return_lse):
    """cached_attention over all of k, v ([B, N, H_kv, *]) on ``backend_name`` (None: the backend
    that runs it here)."""
    whole = TokenRanges.trusted([(0, k.shape[1])], q.device)
    fn = CACHED_ATTENTION.resolve(q) if backend_name is None else CACHED_ATTENTION.impl(backend_name)
    return fn(q, k, v, whole, scale, return_lse)


def _absorbed(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale, return_lse, backend_name=None):
    """Strategy "absorb" composed from two small products and cached_attention with one kv head
    (head dim d_c + d_r, values d_c). The products run in float32 (float64 for float64) and round
    once to q's dtype: in 16 bits that rounding of q_lat shifts all scores of a query alike, so
    the log-sum-exp errs up to ~2.5x eager PyTorch (the Triton kernel attends a hi + lo split
    instead). The spelling of strategy (b) with cached_attention of ``backend_name``; no backend
    routes 16-bit inputs here."""
    d_nope = w_uk.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_lat = torch.einsum("bqhn,hcn->bqhc", q[..., :d_nope].to(cdt), w_uk.to(cdt)).to(q.dtype)
    q_a = torch.cat([q_lat, q[..., d_nope:]], dim=-1)
    idx = ranges.token_index(c_pool.device)
    c = c_pool.index_select(1, idx)
    k_a = torch.cat([c, k_r_pool.index_select(1, idx)], dim=-1) if k_r_pool is not None else c
    res = _attend(backend_name, q_a, k_a.unsqueeze(2), c.unsqueeze(2), scale, return_lse)
    o_lat = res[0] if return_lse else res
    out = torch.einsum("bqhc,hcv->bqhv", o_lat.to(cdt), w_uv.to(cdt)).to(q.dtype)
    return (out, res[1]) if return_lse else out


def _absorbed_triton(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale, return_lse, deltas=None,
                     theta=10000.0):
    """Strategy "absorb" with the fused Triton latent attention: the latent tile is read once
    per query block as key and value, for all heads at once."""
    from ..triton_kernels import lowrank as kernels

    B, Lq, H, _ = q.shape
    d_nope = w_uk.shape[2]
    if ranges.num_tokens == 0:
        return empty_attention(q, w_uv.shape[2], return_lse)
    idx = ranges.token_index(c_pool.device).to(torch.int32)
    q_lat = torch.einsum("bqhn,hcn->bqhc", q[..., :d_nope].float(), w_uk.float())
    # Explicit sizes: a -1 is ambiguous when B, Lq or H is 0.
    q_lat = q_lat.reshape(B, Lq * H, w_uk.shape[1])
    hi = q_lat.to(q.dtype)
    lo = (q_lat - hi.float()).to(q.dtype) if q.dtype != torch.float32 else None
    q_r = (q[..., d_nope:].reshape(B, Lq * H, k_r_pool.shape[2])
           if k_r_pool is not None else None)
    # Offsets go to the kernel per token (in idx order): it rotates k_r as it loads it.
    token_deltas = None if deltas is None else _token_deltas(ranges, deltas)
    o_lat, lse = kernels.lowrank_latent_attention_triton(hi, lo, q_r, c_pool, k_r_pool, idx,
                                                         float(scale), token_deltas, float(theta))
    out = torch.einsum("bqhc,hcv->bqhv", o_lat.view(B, Lq, H, w_uk.shape[1]), w_uv.float()).to(q.dtype)
    return (out, lse.view(B, Lq, H).permute(0, 2, 1)) if return_lse else out


def _decompress_tokens(c, w_uk, w_uv, k_r):
    """K [B, N, H, d_nope + d_r] and V [B, N, H, d_v] of latents c [B, N, d_c] (k_r [B, N, d_r])."""
    k = torch.einsum("bnc,hcd->bnhd", c, w_uk)
    v = torch.einsum("bnc,hcd->bnhd", c, w_uv)
    if k_r is not None:
        k = torch.cat([k, k_r[:, :, None, :].expand(-1, -1, w_uk.shape[0], -1)], dim=-1)
    return k, v


def lowrank_decompress_eager(c_pool, w_uk, w_uv, ranges: TokenRanges,
                             k_r_pool) -> tuple[Tensor, Tensor]:
    k_r = None if k_r_pool is None else gather_tokens(k_r_pool, ranges)
    return _decompress_tokens(gather_tokens(c_pool, ranges), w_uk, w_uv, k_r)


def lowrank_cached_attention_eager(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale, return_lse,
                                   strategy=None, deltas=None, theta=10000.0) -> AttentionResult:
    """The definition (any ``strategy`` is the same thing): decompress, then attend. The whole
    pool is decompressed and the ranges select keys by mask, so no token count has to be known on
    the host (it traces under torch.compile). Offsets move a copy of ``k_r_pool`` first."""
    if deltas is not None:
        k_r_pool = shifted_k_r_pool(k_r_pool, ranges, deltas, theta)
    k, v = _decompress_tokens(c_pool, w_uk, w_uv, k_r_pool)
    return cached_attention_eager(q, k, v, ranges, scale, return_lse)


def lowrank_decompress_reference(c_pool, w_uk, w_uv, kv_ranges,
                                 k_r_pool=None) -> tuple[Tensor, Tensor]:
    """``lowrank_decompress`` computed eagerly (the oracle)."""
    ranges = _check_lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    return lowrank_decompress_eager(c_pool, w_uk, w_uv, ranges, k_r_pool)


def lowrank_cached_attention_reference(q, c_pool, w_uk, w_uv, kv_ranges, *, k_r_pool=None,
                                       kv_deltas=None, theta=10000.0, scale=None,
                                       return_lse=False) -> AttentionResult:
    """``lowrank_cached_attention`` computed eagerly (the oracle)."""
    ranges = _check_lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    _check_lowrank_query(q, c_pool, w_uk, k_r_pool)
    deltas = _check_k_r_deltas(kv_deltas, ranges, k_r_pool, theta)
    scale = checks.scale_value(scale, q.shape[3])
    return lowrank_cached_attention_eager(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale,
                                          return_lse, None, deltas, theta)


def _decompress_native(c_pool, w_uk, w_uv, ranges, k_r_pool):
    if c_pool.shape[2] == 0:  # no latent: K is zeros (then k_r), V zeros; the kernels tile d_c
        return lowrank_decompress_eager(c_pool, w_uk, w_uv, ranges, k_r_pool)
    return torch.ops.vidstream.lowrank_decompress(c_pool, w_uk, w_uv, ranges.tensor,
                                                  ranges.num_tokens, k_r_pool)


def _decompress_triton(c_pool, w_uk, w_uv, ranges, k_r_pool):
    from ..triton_kernels import lowrank as kernels

    return kernels.lowrank_decompress_triton(
        c_pool, w_uk, w_uv, ranges.token_index(c_pool.device).to(torch.int32), k_r_pool)


def _token_deltas(ranges: TokenRanges, deltas: Tensor) -> Tensor:
    """float64 [N]: each gathered token's range offset, in range order (host values)."""
    lengths = torch.tensor([max(e - s, 0) for s, e in ranges._host()], dtype=torch.int64)
    return deltas.to(torch.float64).repeat_interleave(lengths)


def _attention(backend_name: str, decompress):
    def run(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale, return_lse, strategy, deltas=None,
            theta=10000.0):
        if strategy is None:
            # Values unknown (tracing a tensor): the pool length bounds the token count.
            tokens = ranges.num_tokens if ranges.pairs is not None else c_pool.shape[1]
            strategy = choose_strategy(backend_name, q.shape[0], q.shape[1], tokens,
                                       w_uk.shape[0], w_uk.shape[1], w_uk.shape[2],
                                       0 if k_r_pool is None else k_r_pool.shape[2], w_uv.shape[2])
        if backend_name == "cuda" and strategy == "absorb":
            # No fused CUDA latent attention: the composed absorb (_absorbed) would attend at
            # head dim d_c + d_r, which the CUDA attention does not serve, and in 16 bits errs
            # past the 2x-eager bound. Decompress instead.
            strategy = "decompress"
        if strategy == "decompress" or c_pool.shape[2] == 0:  # no latent to tile or absorb
            if deltas is not None:  # K is formed anyway: the offsets move a copy of k_r first
                from .rope3d import ROPE3D_SHIFT

                k_r_pool = shifted_k_r_pool(k_r_pool, ranges, deltas, theta,
                                            ROPE3D_SHIFT.impl(backend_name))
            k, v = decompress(c_pool, w_uk, w_uv, ranges, k_r_pool)
            return _attend(backend_name, q, k, v, scale, return_lse)
        if backend_name == "cpu":  # "absorb" and "tiled" are the fused C++ kernel
            out, lse = torch.ops.vidstream.lowrank_cached_attention(
                q, c_pool, w_uk, w_uv, ranges.tensor, k_r_pool, scale, strategy == "absorb",
                deltas, float(theta))
            return (out, lse) if return_lse else out
        if strategy == "absorb":
            return _absorbed_triton(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale, return_lse,
                                    deltas, theta)
        checks.fail(f"strategy 'tiled' runs on the cpu backend only; the {backend_name} "
                    "backend has 'decompress' and 'absorb'")

    return run


@_extension.register_fake("lowrank_decompress")
def _decompress_fake(c_pool, w_uk, w_uv, kv_ranges, num_tokens, k_r_pool=None):
    B, H = c_pool.shape[0], w_uk.shape[0]
    d_r = 0 if k_r_pool is None else k_r_pool.shape[2]
    k = c_pool.new_empty(B, num_tokens, H, w_uk.shape[2] + d_r)
    return k, c_pool.new_empty(B, num_tokens, H, w_uv.shape[2])


@_extension.register_fake("lowrank_cached_attention")
def _attention_fake(q, c_pool, w_uk, w_uv, kv_ranges, k_r_pool=None, scale=1.0, absorb=False,
                    kv_deltas=None, theta=10000.0):
    B, Lq, H = q.shape[:3]
    return q.new_empty(B, Lq, H, w_uv.shape[2]), q.new_empty(B, H, Lq, dtype=torch.float32)


LOWRANK_DECOMPRESS.register("reference", lowrank_decompress_eager)
LOWRANK_DECOMPRESS.register("cpu", _decompress_native)
LOWRANK_DECOMPRESS.register("cuda", _decompress_native)
LOWRANK_DECOMPRESS.register("triton", _decompress_triton)
LOWRANK_CACHED_ATTENTION.register("reference", lowrank_cached_attention_eager)
LOWRANK_CACHED_ATTENTION.register("cpu", _attention("cpu", _decompress_native))
LOWRANK_CACHED_ATTENTION.register("cuda", _attention("cuda", _decompress_native))
LOWRANK_CACHED_ATTENTION.register("triton", _attention("triton", _decompress_triton))


# ----------------------------------------------------------------------------- torch backend
# ---- torch backend: the ranges' latents gathered once (or sliced, for one range), one einsum
# per projection, and the torch backend's SDPA attention. "absorb" attends in the latent space
# in float32 (float64 for float64): the latents are d_c + d_r values per token, so the upcast
# copy is small, and no rounding of q_lat to 16 bits costs the lse its accuracy (_absorbed's
# caveat).


def _latent_tokens(pool, ranges: TokenRanges):
    """The tokens of ``pool`` [B, P, d] in the ranges, in range order: a slice for one range."""
    spans = [(s, e) for s, e in ranges.pairs if e > s]
    if len(spans) == 1:
        (s, e), = spans
        return pool[:, s:e]
    return gather_tokens(pool, ranges)


def _decompress_torch(c_pool, w_uk, w_uv, ranges: TokenRanges, k_r_pool):
    if ranges.pairs is None:  # traced values: the reference (its output length needs them)
        return lowrank_decompress_eager(c_pool, w_uk, w_uv, ranges, k_r_pool)
    k_r = None if k_r_pool is None else _latent_tokens(k_r_pool, ranges)
    return _decompress_tokens(_latent_tokens(c_pool, ranges), w_uk, w_uv, k_r)


def _lowrank_attention_torch(q, c_pool, w_uk, w_uv, ranges: TokenRanges, k_r_pool, scale,
                             return_lse, strategy, deltas=None, theta=10000.0):
    from .attention import sdpa_attention

    if ranges.pairs is None:  # traced values: the masked definition
        return lowrank_cached_attention_eager(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale,
                                              return_lse, None, deltas, theta)
    if deltas is not None:
        # The ranges' latents gathered in range order, their RoPE key moved by its offsets; then
        # the same op over that one span.
        c = _latent_tokens(c_pool, ranges)
        k_r = shift_gathered(_as_heads(_latent_tokens(k_r_pool, ranges)), ranges, deltas, theta,
                             None)[:, :, 0]
        whole = TokenRanges.trusted([(0, c.shape[1])], ranges.device)
        return _lowrank_attention_torch(q, c, w_uk, w_uv, whole, k_r, scale, return_lse, strategy)
    d_nope, d_r = w_uk.shape[2], 0 if k_r_pool is None else k_r_pool.shape[2]
    if strategy is None:
        strategy = choose_strategy("torch", q.shape[0], q.shape[1], ranges.num_tokens,
                                   w_uk.shape[0], w_uk.shape[1], d_nope, d_r, w_uv.shape[2])
    if strategy == "tiled":
        checks.fail("strategy 'tiled' runs on the cpu backend only; the torch backend has "
                    "'decompress' and 'absorb'")
    if ranges.num_tokens == 0:
        return empty_attention(q, w_uv.shape[2], return_lse)
    if strategy == "decompress":
        k, v = _decompress_torch(c_pool, w_uk, w_uv, ranges, k_r_pool)
        return sdpa_attention(q, k, v, scale, return_lse)
    # "absorb": q_lat[h] = q_nope[h] @ w_uk[h]^T against keys concat(c, k_r) and values c, one
    # kv head for all heads (SDPA sees H * Lq queries of it), then out[h] = o_lat[h] @ w_uv[h].
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_lat = torch.einsum("bqhn,hcn->bqhc", q[..., :d_nope].to(cdt), w_uk.to(cdt))
    c = _latent_tokens(c_pool, ranges).to(cdt)
    if k_r_pool is not None:
        q_lat = torch.cat([q_lat, q[..., d_nope:].to(cdt)], dim=-1)
        k_lat = torch.cat([c, _latent_tokens(k_r_pool, ranges).to(cdt)], dim=-1)
    else:
        k_lat = c
    res = sdpa_attention(q_lat, k_lat[:, :, None], c[:, :, None], scale, return_lse)
    o_lat = res[0] if return_lse else res
    out = torch.einsum("bqhc,hcv->bqhv", o_lat, w_uv.to(cdt)).to(q.dtype)
    return (out, res[1]) if return_lse else out


LOWRANK_DECOMPRESS.register("torch", _decompress_torch)
LOWRANK_CACHED_ATTENTION.register("torch", _lowrank_attention_torch)


# ----------------------------------------------------------------------------- autograd
# Backward of the kernel ops (issue #14), composed of PyTorch ops plus the attention backward
# kernel of the same backend:
#   lowrank_decompress (C++ vidstream::lowrank_decompress, Triton lowrank_decompress_triton):
#     k_h = concat(c @ w_uk[h], k_r), v_h = c @ w_uv[h] over the gathered tokens, so
#     dc = sum_h dk_nope_h @ w_uk[h]^T + dv_h @ w_uv[h]^T, dw_uk[h] = c^T dk_nope_h,
#     dw_uv[h] = c^T dv_h, dk_r = sum_h dk_r_h; the per-token gradients are scattered into zero
#     pools (a pool token outside the ranges gets 0; ranges are disjoint, so one read each).
#   lowrank_cached_attention (C++, the fused "tiled"/"absorb" kernel): K, V decompressed over the
#     whole pool (the op's ranges are a tensor: their token count is not on the host), then
#     cached_attention_backward over kv_ranges (zero outside them), then the decompression's
#     chain rule above; offsets rotate the RoPE key forward, and its gradient back.
#   lowrank_latent_attention_triton (Triton "absorb"): the Triton cached_attention backward of
#     the latent attention (one kv head, keys concat(c, c, k_r) for queries concat(hi, lo, q_r):
#     the hi + lo split attended exactly), then the same chain rule.
# With gradients, the public function runs the kernel backends' "decompress" strategy (its
# backward recomputes the softmax in the forward's order; see _grad_ready), and with kv_deltas on
# a k_r_pool that requires grad it moves a copy of k_r_pool first with PyTorch ops (the
# definition; autograd differentiates it). The fused ops' own autograd (above) serves direct
# calls of the ops, torch.compile and opcheck.

from . import autograd_utils as _ag  # noqa: E402


def _decompress_grads(dk, dv, c, w_uk, w_uv, d_nope, need):
    """(dc [B, N, d_c], dw_uk, dw_uv, dk_r [B, N, d_r] or None) of the tokens' decompression;
    ``need``: which of c, w_uk, w_uv are wanted."""
    dc = dw_uk = dw_uv = None
    dk_n = dk[..., :d_nope] if dk is not None else None
    if need[0]:
        dc = c.new_zeros(c.shape)
        if dk_n is not None:
            dc = dc + torch.einsum("bnhd,hcd->bnc", dk_n, w_uk)
        if dv is not None:
            dc = dc + torch.einsum("bnhd,hcd->bnc", dv, w_uv)
    if need[1]:
        dw_uk = torch.zeros_like(w_uk) if dk_n is None else torch.einsum("bnc,bnhd->hcd", c, dk_n)
    if need[2]:
        dw_uv = torch.zeros_like(w_uv) if dv is None else torch.einsum("bnc,bnhd->hcd", c, dv)
    dk_r = dk[..., d_nope:].sum(2) if dk is not None and dk.shape[3] > d_nope else None
    return dc, dw_uk, dw_uv, dk_r


def _decompress_setup_context(ctx, inputs, output):
    c_pool, w_uk, w_uv = inputs[:3]
    ctx.k_r_shape = None if inputs[-1] is None else inputs[-1].shape
    ctx.save_for_backward(c_pool, w_uk, w_uv, inputs[3])  # kv_ranges or token_idx
    ctx.num_tokens = inputs[4] if len(inputs) == 6 else None  # the C++ op's num_tokens


def _decompress_backward(ctx, dk, dv):
    c_pool, w_uk, w_uv, index = ctx.saved_tensors
    idx = (_ag.token_index(index, ctx.num_tokens) if ctx.num_tokens is not None
           else index.to(torch.int64))
    P = c_pool.shape[1]
    c = c_pool.index_select(1, idx)
    need = ctx.needs_input_grad
    dc, dw_uk, dw_uv, dk_r = _decompress_grads(dk, dv, c, w_uk, w_uv, w_uk.shape[2],
                                               (need[0], need[1], need[2]))
    dc_pool = None if dc is None else _ag.scatter_tokens(dc, idx, P)
    dk_r_pool = None
    if ctx.k_r_shape is not None and need[-1]:
        dk_r_pool = (c_pool.new_zeros(ctx.k_r_shape) if dk_r is None
                     else _ag.scatter_tokens(dk_r, idx, P))
    if ctx.num_tokens is not None:  # C++: (c_pool, w_uk, w_uv, kv_ranges, num_tokens, k_r_pool)
        return dc_pool, dw_uk, dw_uv, None, None, dk_r_pool
    return dc_pool, dw_uk, dw_uv, None, dk_r_pool  # Triton: (..., token_idx, k_r_pool)


def _rotate_k_r(k_r: Tensor, per_token: Tensor, theta, inverse: bool) -> Tensor:
    """k_r [B, N, d_r] with its temporal band rotated by per-token offsets (float64 [N]) as
    rope3d_shift_ moves it (inverse: the transposed rotation, for gradients)."""
    from .rope_math import rope_bands, rotate_pairs, temporal_angles

    c_t = rope_bands(k_r.shape[2])[0]
    ang = temporal_angles(per_token.to(k_r.device), c_t, theta, None)[:, 0]  # [N, c_t]
    band = rotate_pairs(k_r[..., : 2 * c_t], (-ang if inverse else ang)[None])
    return torch.cat([band, k_r[..., 2 * c_t:]], dim=-1)


def _pool_deltas(kv_ranges: Tensor, deltas: Tensor, P: int, device) -> Tensor:
    """float64 [P]: each pool token's range offset (0 outside the ranges)."""
    r = kv_ranges.to(device, torch.int64)
    pos = torch.arange(P, device=device)
    member = (pos[None] >= r[:, :1]) & (pos[None] < r[:, 1:])
    return torch.where(member, deltas.to(device, torch.float64)[:, None], 0.0).sum(0)


def _lowrank_attention_setup_context(ctx, inputs, output):
    q, c_pool, w_uk, w_uv, kv_ranges, k_r_pool, scale, absorb, kv_deltas, theta = inputs
    out, lse = output
    ctx.save_for_backward(q, c_pool, w_uk, w_uv, kv_ranges, k_r_pool, kv_deltas, out, lse)
    ctx.scale, ctx.theta = scale, theta
    ctx.set_materialize_grads(False)


def _lowrank_attention_backward(ctx, dout, dlse):
    q, c_pool, w_uk, w_uv, kv_ranges, k_r_pool, kv_deltas, out, lse = ctx.saved_tensors
    none = (None,) * 10
    if dout is None and dlse is None:
        return none
    d_nope = w_uk.shape[2]
    P = c_pool.shape[1]
    k_r = k_r_pool
    per_token = None
    if k_r_pool is not None and kv_deltas is not None:
        per_token = _pool_deltas(kv_ranges, kv_deltas, P, k_r_pool.device)
        k_r = _rotate_k_r(k_r_pool, per_token, ctx.theta, False)
    k, v = _decompress_tokens(c_pool, w_uk, w_uv, k_r)  # the whole pool: [B, P, H, *]
    dq, dk, dv = _ag.attention_grads(
        torch.ops.vidstream.cached_attention_backward, dout, dlse, q, k.contiguous(),
        v.contiguous(), out, lse, kv_ranges, float(ctx.scale), None, 10000.0, None)
    need = ctx.needs_input_grad
    dc, dw_uk, dw_uv, dk_r = _decompress_grads(dk, dv, c_pool, w_uk, w_uv, d_nope,
                                               (need[1], need[2], need[3]))
    dk_r_pool = None
    if k_r_pool is not None and dk_r is not None:
        dk_r_pool = dk_r if per_token is None else _rotate_k_r(dk_r, per_token, ctx.theta, True)
    return dq, dc, dw_uk, dw_uv, None, dk_r_pool, None, None, None, None


if _extension.load():
    torch.library.register_autograd("vidstream::lowrank_decompress", _decompress_backward,
                                    setup_context=_decompress_setup_context)
    torch.library.register_autograd("vidstream::lowrank_cached_attention",
                                    _lowrank_attention_backward,
                                    setup_context=_lowrank_attention_setup_context)


def _latent_setup_context(ctx, inputs, output):
    q_lat, q_lat_lo, q_r, c_pool, k_r_pool, token_idx, scale, token_deltas, theta = inputs
    o, lse = output
    ctx.save_for_backward(q_lat, q_lat_lo, q_r, c_pool, k_r_pool, token_idx, token_deltas, o, lse)
    ctx.scale, ctx.theta = scale, theta
    ctx.set_materialize_grads(False)


def _latent_backward(ctx, do, dlse):
    """The latent attention as a cached_attention of one kv head over the gathered tokens
    (queries R = Lq * H rows): its Triton backward, then the gather's and the rotation's."""
    from ..triton_kernels import attention_backward as kernels

    q_lat, q_lat_lo, q_r, c_pool, k_r_pool, token_idx, token_deltas, o, lse = ctx.saved_tensors
    if do is None and dlse is None:
        return (None,) * 9
    dt = q_lat.dtype
    idx = token_idx.to(torch.int64)
    N, P, d_c = idx.shape[0], c_pool.shape[1], c_pool.shape[2]
    c = c_pool.index_select(1, idx)
    qs, ks = [q_lat], [c]
    if q_lat_lo is not None:
        qs.append(q_lat_lo)
        ks.append(c)
    has_r = q_r is not None and k_r_pool is not None and k_r_pool.shape[2] > 0
    if has_r:
        k_r = k_r_pool.index_select(1, idx)
        if token_deltas is not None:
            k_r = _rotate_k_r(k_r, token_deltas, ctx.theta, False)
        qs.append(q_r)
        ks.append(k_r)
    qa = torch.cat(qs, dim=-1).unsqueeze(2)  # [B, R, 1, *]
    ka = torch.cat(ks, dim=-1).unsqueeze(2).to(dt)
    va = c.unsqueeze(2).to(dt)
    whole = torch.tensor([[0, N]], dtype=torch.int32, device=q_lat.device)
    dq, dk, dv = _ag.attention_grads(
        lambda *a: kernels.cached_attention_backward_triton(*a),
        None if do is None else do.unsqueeze(2).to(dt), None if dlse is None else dlse[:, None],
        qa, ka.contiguous(), va.contiguous(), o.unsqueeze(2).to(dt), lse[:, None], whole,
        float(ctx.scale), None, 10000.0, None)
    dq, dk, dv = dq[:, :, 0], dk[:, :, 0], dv[:, :, 0]
    dq_lat = dq[..., :d_c]
    dq_lo = dq[..., d_c:2 * d_c] if q_lat_lo is not None else None
    off = d_c * (2 if q_lat_lo is not None else 1)
    dc = dv.to(c_pool.dtype) + dk[..., :d_c].to(c_pool.dtype)
    if q_lat_lo is not None:
        dc = dc + dk[..., d_c:2 * d_c].to(c_pool.dtype)
    dc_pool = _ag.scatter_tokens(dc, idx, P)
    dq_r = dk_r_pool = None
    if has_r:
        dq_r = dq[..., off:]
        dk_r = dk[..., off:]
        if token_deltas is not None:
            dk_r = _rotate_k_r(dk_r, token_deltas, ctx.theta, True)
        dk_r_pool = _ag.scatter_tokens(dk_r.to(k_r_pool.dtype), idx, P)
    return dq_lat, dq_lo, dq_r, dc_pool, dk_r_pool, None, None, None, None


def _register_triton_decompress_autograd():
    from ..triton_kernels import lowrank as kernels

    kernels.lowrank_decompress_triton.register_autograd(_decompress_backward,
                                                        setup_context=_decompress_setup_context)


def _register_triton_latent_autograd():
    from ..triton_kernels import lowrank as kernels

    kernels.lowrank_latent_attention_triton.register_autograd(
        _latent_backward, setup_context=_latent_setup_context)


_ag.on_triton("light", _register_triton_decompress_autograd)
_ag.on_triton("attention", _register_triton_latent_autograd)


def _grad_ready(run):
    """``run`` (a kernel backend's lowrank_cached_attention) as it runs when gradients are
    needed: strategy "decompress" (the kernel's decompression, then its cached_attention: the
    backward recomputes the softmax in the order the forward formed it; the fused "absorb" and
    "tiled" forwards form the scores in another order, and a backward from their saved lse
    measured up to 5x eager's float32 error), with offsets applied first by PyTorch ops where
    k_r_pool requires grad (autograd differentiates the rotation, the definition)."""

    def wrapped(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale, return_lse, strategy,
                deltas=None, theta=10000.0):
        if backend.needs_grad(q, c_pool, w_uk, w_uv, k_r_pool):
            strategy = "decompress"
        if deltas is not None and backend.needs_grad(k_r_pool):
            k_r_pool = shifted_k_r_pool(k_r_pool, ranges, deltas, theta)
            deltas = None
        rope = () if deltas is None else (deltas, theta)
        return run(q, c_pool, w_uk, w_uv, ranges, k_r_pool, scale, return_lse, strategy, *rope)

    return wrapped


for _name in ("cpu", "cuda", "triton"):
    LOWRANK_CACHED_ATTENTION.register(_name, _grad_ready(LOWRANK_CACHED_ATTENTION.impl(_name)))
LOWRANK_DECOMPRESS.mark_differentiable("cpu")
LOWRANK_DECOMPRESS.mark_differentiable("cuda")
LOWRANK_DECOMPRESS.mark_differentiable("triton", _ag.triton_ready("light"))
LOWRANK_CACHED_ATTENTION.mark_differentiable(
    "cpu", _ag.kernel_backward("cached_attention_backward", "CPU"))
LOWRANK_CACHED_ATTENTION.mark_differentiable(
    "cuda", _ag.kernel_backward("cached_attention_backward", "CUDA"))
LOWRANK_CACHED_ATTENTION.mark_differentiable("triton", _ag.triton_ready("attention"))
# The torch backend's fused attention returns lse without a derivative: with return_lse and
# gradients, the definition runs (autograd differentiates its logsumexp).
LOWRANK_CACHED_ATTENTION.register("torch", lambda *a: (
    lowrank_cached_attention_eager(*a) if a[7] and backend.needs_grad(a[0], a[1], a[2], a[3], a[5])
    else _lowrank_attention_torch(*a)))
