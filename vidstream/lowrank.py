"""Public low-rank (latent) KV cache ops (SPEC §4) and the strategies behind the attention.

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
``triton`` backend). The GPU kernels are not yet validated on a GPU (opt-in).
"""

from __future__ import annotations

import torch

from . import _extension, _validate, backend, reference

STRATEGIES = ("decompress", "absorb", "tiled")


def lowrank_decompress(c_pool: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, kv_ranges,
                       k_r_pool: torch.Tensor | None = None):
    """K [B, N, H, d_nope + d_r] and V [B, N, H, d_v] of the tokens in ``kv_ranges`` (in range
    order) from the latent pool ``c_pool`` [B, P, d_c] and the shared positional keys
    ``k_r_pool`` [B, P, d_r]."""
    host = _validate.lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    return backend.resolve("lowrank_decompress", c_pool)(c_pool, w_uk, w_uv, host, k_r_pool)


def lowrank_cached_attention(q: torch.Tensor, c_pool: torch.Tensor, w_uk: torch.Tensor,
                             w_uv: torch.Tensor, kv_ranges, *, k_r_pool: torch.Tensor | None = None,
                             scale: float | None = None, return_lse: bool = False,
                             strategy: str | None = None):
    """``cached_attention`` of ``q`` [B, Lq, H, d_nope + d_r] over the decompressed latent cache;
    returns ``out`` [B, Lq, H, d_v] (and the float32 ``lse`` [B, H, Lq] with ``return_lse``).
    ``strategy``: None (choose per shape), ``"decompress"``, ``"absorb"`` or ``"tiled"``; the
    reference backend ignores it (it is the definition)."""
    host = _validate.lowrank(c_pool, w_uk, w_uv, kv_ranges, k_r_pool)
    _validate.lowrank_query(q, c_pool, w_uk, w_uv, k_r_pool)
    scale = _validate.scale_value(scale, q.shape[3])
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be None or one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return backend.resolve("lowrank_cached_attention", q)(
        q, c_pool, w_uk, w_uv, host, k_r_pool, scale, return_lse, strategy)


def num_tokens(host_ranges: torch.Tensor) -> int:
    return int((host_ranges[:, 1] - host_ranges[:, 0]).sum()) if host_ranges.shape[0] else 0


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


def _resolve_fallback(op: str, x: torch.Tensor):
    """``backend.resolve(op, x)``; where the backend in force has no kernel for ``op`` (say the
    triton backend forced while cached_attention has only the reference), the default choice
    for ``x`` instead, so a strategy can always reach the attention it composes with."""
    try:
        return backend.resolve(op, x)
    except ValueError:
        return backend.resolve_default(op, x)


def _whole(n: int) -> torch.Tensor:
    return torch.tensor([[0, n]], dtype=torch.int32)


def _attend(q, k, v, scale, return_lse):
    """cached_attention over all of k, v ([B, N, H_kv, *])."""
    return _resolve_fallback("cached_attention", q)(q, k, v, _whole(k.shape[1]), scale, return_lse)


def _token_index(host: torch.Tensor, device) -> torch.Tensor:
    idx = [torch.arange(int(s), int(e), dtype=torch.int32) for s, e in host.tolist()]
    idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int32)
    return idx.to(device)


def _absorbed(q, c_pool, w_uk, w_uv, host, k_r_pool, scale, return_lse):
    """Strategy "absorb" composed from two small products and cached_attention with one kv head
    (head dim d_c + d_r, values d_c). The products run in float32 (float64 for float64) and round
    once to q's dtype: in 16 bits that rounding of q_lat shifts all scores of a query alike, so
    the log-sum-exp errs up to ~2.5x eager PyTorch (the Triton kernel attends a hi + lo split
    instead). The spelling of strategy (b) with the public cached_attention; no backend routes
    16-bit inputs here."""
    d_nope = w_uk.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_lat = torch.einsum("bqhn,hcn->bqhc", q[..., :d_nope].to(cdt), w_uk.to(cdt)).to(q.dtype)
    q_a = torch.cat([q_lat, q[..., d_nope:]], dim=-1)
    idx = _token_index(host, c_pool.device).long()
    c = c_pool.index_select(1, idx)
    k_a = torch.cat([c, k_r_pool.index_select(1, idx)], dim=-1) if k_r_pool is not None else c
    res = _attend(q_a, k_a.unsqueeze(2), c.unsqueeze(2), scale, return_lse)
    o_lat = res[0] if return_lse else res
    out = torch.einsum("bqhc,hcv->bqhv", o_lat.to(cdt), w_uv.to(cdt)).to(q.dtype)
    return (out, res[1]) if return_lse else out


def _absorbed_triton(q, c_pool, w_uk, w_uv, host, k_r_pool, scale, return_lse):
    """Strategy "absorb" with the fused Triton latent attention: the latent tile is read once
    per query block as key and value, for all heads at once."""
    from .triton_kernels import lowrank as kernels

    B, Lq, H, _ = q.shape
    d_nope = w_uk.shape[2]
    idx = _token_index(host, c_pool.device)
    if idx.numel() == 0:
        out = q.new_zeros(B, Lq, H, w_uv.shape[2])
        lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    q_lat = torch.einsum("bqhn,hcn->bqhc", q[..., :d_nope].float(), w_uk.float())
    q_lat = q_lat.reshape(B, Lq * H, -1)
    hi = q_lat.to(q.dtype)
    lo = (q_lat - hi.float()).to(q.dtype) if q.dtype != torch.float32 else None
    q_r = q[..., d_nope:].reshape(B, Lq * H, -1) if k_r_pool is not None else None
    o_lat, lse = kernels.lowrank_latent_attention_triton(hi, lo, q_r, c_pool, k_r_pool, idx,
                                                         float(scale))
    out = torch.einsum("bqhc,hcv->bqhv", o_lat.view(B, Lq, H, -1), w_uv.float()).to(q.dtype)
    return (out, lse.view(B, Lq, H).permute(0, 2, 1)) if return_lse else out


def _decompress_native(c_pool, w_uk, w_uv, host, k_r_pool):
    return torch.ops.vidstream.lowrank_decompress(c_pool, w_uk, w_uv, host, num_tokens(host),
                                                  k_r_pool)


def _decompress_triton(c_pool, w_uk, w_uv, host, k_r_pool):
    from .triton_kernels import lowrank as kernels

    return kernels.lowrank_decompress_triton(c_pool, w_uk, w_uv, _token_index(host, c_pool.device),
                                             k_r_pool)


def _attention(backend_name: str, decompress):
    def run(q, c_pool, w_uk, w_uv, host, k_r_pool, scale, return_lse, strategy):
        if strategy is None:
            strategy = choose_strategy(backend_name, q.shape[0], q.shape[1], num_tokens(host),
                                       w_uk.shape[0], w_uk.shape[1], w_uk.shape[2],
                                       0 if k_r_pool is None else k_r_pool.shape[2], w_uv.shape[2])
        if backend_name == "cuda" and strategy == "absorb":
            # No fused CUDA latent attention: the composed absorb (_absorbed) would attend at
            # head dim d_c + d_r, which the CUDA attention does not serve, and in 16 bits errs
            # past the 2x-eager bound. Decompress instead.
            strategy = "decompress"
        if strategy == "decompress":
            k, v = decompress(c_pool, w_uk, w_uv, host, k_r_pool)
            return _attend(q, k, v, scale, return_lse)
        if backend_name == "cpu":  # "absorb" and "tiled" are the fused C++ kernel
            out, lse = torch.ops.vidstream.lowrank_cached_attention(
                q, c_pool, w_uk, w_uv, host, k_r_pool, scale, strategy == "absorb")
            return (out, lse) if return_lse else out
        if strategy == "absorb":
            return _absorbed_triton(q, c_pool, w_uk, w_uv, host, k_r_pool, scale, return_lse)
        raise ValueError(f"strategy 'tiled' runs on the cpu backend only; the {backend_name} "
                         "backend has 'decompress' and 'absorb'")

    return run


def _reference_attention(q, c_pool, w_uk, w_uv, host, k_r_pool, scale, return_lse, strategy):
    return reference._lowrank_cached_attention(q, c_pool, w_uk, w_uv, host, k_r_pool, scale,
                                               return_lse)


@_extension.register_fake("lowrank_decompress")
def _decompress_fake(c_pool, w_uk, w_uv, kv_ranges, num_tokens, k_r_pool=None):
    B, H = c_pool.shape[0], w_uk.shape[0]
    d_r = 0 if k_r_pool is None else k_r_pool.shape[2]
    k = c_pool.new_empty(B, num_tokens, H, w_uk.shape[2] + d_r)
    return k, c_pool.new_empty(B, num_tokens, H, w_uv.shape[2])


@_extension.register_fake("lowrank_cached_attention")
def _attention_fake(q, c_pool, w_uk, w_uv, kv_ranges, k_r_pool=None, scale=1.0, absorb=False):
    B, Lq, H = q.shape[:3]
    return q.new_empty(B, Lq, H, w_uv.shape[2]), q.new_empty(B, H, Lq, dtype=torch.float32)


backend.register("lowrank_decompress", "reference", reference._lowrank_decompress)
backend.register("lowrank_decompress", "cpu", _decompress_native)
backend.register("lowrank_decompress", "cuda", _decompress_native)
backend.register("lowrank_decompress", "triton", _decompress_triton)
backend.register("lowrank_cached_attention", "reference", _reference_attention)
backend.register("lowrank_cached_attention", "cpu", _attention("cpu", _decompress_native))
backend.register("lowrank_cached_attention", "cuda", _attention("cuda", _decompress_native))
backend.register("lowrank_cached_attention", "triton", _attention("triton", _decompress_triton))
