"""Positions as metadata (issue #12): per-range temporal offsets of cached_attention (``kv_deltas``,
docs/spec.md §2), select_blocks (``block_deltas``, §5) and lowrank_cached_attention (``kv_deltas``
of the RoPE key ``k_r_pool``, §4) on every backend.

Three kinds of check: the float64 oracle (the reference backend on float64 copies) with the
flash-attn rule against eager shift-then-attend in the test dtype; the contract as an equality
(the op with offsets equals the same backend's op on a ``rope3d_shift_``-ed copy, up to
rounding); and all-zero offsets, which must give the op without offsets bit for bit.

Backend ids: the backend name for CPU tensors (``cpu`` is the C++ one), ``<backend>-cuda`` for
CUDA tensors, so ``-k "not cpu"`` leaves out exactly the C++ kernels."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close_to_oracle, poison_, require, run

import vidstream
from vidstream import reference
from vidstream.ops import select_blocks as selection

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pairs(*backends) -> list:
    out = []
    for b in backends:
        for dev in ("cpu", "cuda"):
            if (b == "cpu" and dev == "cuda") or (b == "cuda" and dev == "cpu"):
                continue
            out.append(pytest.param(b, dev, id=b if dev == "cpu" else f"{b}-cuda"))
    return out


PAIRS = _pairs("reference", "torch", "triton", "cpu", "cuda")


def _call(backend, fn, *args, **kwargs):
    """``fn`` on ``backend``."""
    return run(backend, fn, *args, **kwargs)


def _poison_heap(*shapes, dtype, device):
    """NaN-filled blocks of the output sizes freed just before the op allocates its outputs, so
    an allocator that hands them back exposes any element a kernel leaves unwritten."""
    for s in shapes:
        poison_(torch.empty(s, dtype=dtype, device=device))


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


# ----------------------------------------------------------------------------- §2 cached_attention

# name: (B, Lq, H, H_kv, D, Dv, P, ranges, deltas, t_theta). Lq and the range lengths are not
# multiples of any tile (32 under the interpreter, 32-128 on a GPU); ranges unsorted, with an
# empty range and a one-token range; offsets negative and fractional.
ATTN_CASES = {
    "gqa-dv-unsorted": (2, 21, 4, 2, 40, 24, 90, [[40, 90], [0, 0], [3, 20], [25, 26]],
                        [2.5, -1.0, -3.25, 7.0], None),
    "gqa-t_theta": (1, 19, 4, 2, 64, 48, 70, [[30, 70], [0, 13]], [-0.5, 4.75],
                    [1.0e4, 2.5e3]),
    "mqa-t_theta": (1, 5, 4, 1, 64, 64, 50, [[10, 11], [20, 50], [0, 0]], [-6.0, 1.5, 3.0],
                    [5.0e3]),
}


def _attn_inputs(case, dtype, device):
    B, Lq, H, H_kv, D, Dv, P, ranges, deltas, tt = ATTN_CASES[case]
    q = torch.randn(B, Lq, H, D, device=device).to(dtype)
    k = torch.randn(B, P, H_kv, D, device=device).to(dtype)
    v = torch.randn(B, P, H_kv, Dv, device=device).to(dtype)
    t_theta = None if tt is None else torch.tensor(tt, device=device)
    return q, k, v, torch.tensor(ranges, dtype=torch.int32), deltas, t_theta


def _cuda_serves(backend, q, v):
    if backend == "cuda" and (q.dtype == torch.float32 or q.shape[3] not in (64, 128)
                              or v.shape[3] != q.shape[3]):
        pytest.skip("the cuda kernel serves float16/bfloat16 with D == Dv in (64, 128)")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_cached_attention_offsets(backend, device, dtype, case):
    require(backend, "cached_attention", device, dtype)
    q, k, v, r, d, tt = _attn_inputs(case, dtype, device)
    _cuda_serves(backend, q, v)
    kw = dict(kv_deltas=d, t_theta=tt)
    B, Lq, H, _ = q.shape
    _poison_heap((B, Lq, H, v.shape[3]), (B, H, Lq), dtype=dtype, device=device)
    out, lse = _call(backend, vidstream.cached_attention, q, k, v, r, **kw, return_lse=True)
    o64, l64 = reference.cached_attention(*_f64(q, k, v), r, **kw, return_lse=True)
    # Eager PyTorch in the test dtype: shift a copy of the pool (rounded to the dtype), then
    # attend with the scale folded into q and float32 scores (no half-precision overflow).
    o_e, l_e = reference.cached_attention(q, k, v, r, **kw, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == l64.shape
    assert_close_to_oracle(out, o64.to(out.device), o_e, what=f"{backend} {case} out")
    assert torch.equal(torch.isfinite(lse).cpu(), torch.isfinite(l64).cpu())
    assert_close_to_oracle(lse, l64.to(lse.device), l_e, what=f"{backend} {case} lse")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("case,dtype", [("gqa-dv-unsorted", torch.float16),
                                        ("gqa-t_theta", torch.float32)], ids=str)
def test_cached_attention_offsets_contract(backend, device, case, dtype):
    """cached_attention(q, k, v, r, kv_deltas=d) == cached_attention(q, rope3d_shift_(k.clone(),
    r, d), v, r) on one backend, up to rounding (kernels rotate in float32; Triton rounds the key
    once, as rope3d_shift_ rounds the pool, the C++ kernels keep it in float32)."""
    require(backend, "cached_attention", device, dtype)
    q, k, v, r, d, tt = _attn_inputs(case, dtype, device)
    _cuda_serves(backend, q, v)
    out, lse = _call(backend, vidstream.cached_attention, q, k, v, r, kv_deltas=d, t_theta=tt,
                     return_lse=True)
    shifted = run(backend, vidstream.rope3d_shift_, k.clone(), r, torch.tensor(d), t_theta=tt)
    want, want_lse = _call(backend, vidstream.cached_attention, q, shifted, v, r, return_lse=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, want, **tol)
    # The C++ kernels keep the rotated key in float32 (no rounding to the key dtype), so in 16
    # bits the lse differs from shift-then-attend's by the key's rounding too.
    torch.testing.assert_close(lse, want_lse, **tol)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_cached_attention_zero_offsets_exact(backend, device):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    require(backend, "cached_attention", device, dtype)
    q, k, v, r, d, tt = _attn_inputs("mqa-t_theta", dtype, device)
    plain, plain_lse = run(backend, vidstream.cached_attention, q, k, v, r, return_lse=True)
    for zeros in ([0.0, 0.0, -0.0], 0, torch.zeros(3, dtype=torch.float64, device=device)):
        out, lse = run(backend, vidstream.cached_attention, q, k, v, r, kv_deltas=zeros,
                       t_theta=tt, return_lse=True)
        assert torch.equal(out, plain) and torch.equal(lse, plain_lse), f"{backend} {zeros!r}"


@pytest.mark.parametrize("backend,device", PAIRS)
def test_cached_attention_offsets_empty_union(backend, device):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    require(backend, "cached_attention", device, dtype)
    q = torch.randn(1, 9, 2, 64, device=device).to(dtype)
    k = torch.randn(1, 20, 1, 64, device=device).to(dtype)
    out, lse = _call(backend, vidstream.cached_attention, q, k, k, [[5, 5], [0, 0]],
                     kv_deltas=[3.0, -1.5], return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


# ----------------------------------------------------------------------------- §5 select_blocks

# name: (B, Lq, H, H_kv, D, blocks, deltas, heads, query_stride, t_theta). Unsorted blocks, an
# empty one and a one-token one.
SELECT_CASES = {
    "gqa-t_theta": (2, 33, 6, 2, 24, [[40, 45], [2, 2], [5, 22], [60, 61], [23, 35]],
                    [2.5, -1.0, -3.25, 7.0, 0.5], [1, 4, 5], 3, [1.0e4, 2.5e3]),
    "mqa-d64": (1, 17, 4, 1, 64, [[20, 33], [0, 12], [40, 41]], [-4.0, 0.25, 9.0], None, 2,
                None),
}


def _select_inputs(case, dtype, device):
    B, Lq, H, H_kv, D, blocks, deltas, heads, stride, tt = SELECT_CASES[case]
    P = max(e for _, e in blocks) + 4
    q = torch.randn(B, Lq, H, D, device=device).to(dtype)
    kp = torch.randn(B, P, H_kv, D, device=device).to(dtype)
    t_theta = None if tt is None else torch.tensor(tt, device=device)
    return q, kp, torch.tensor(blocks, dtype=torch.int32), deltas, dict(
        query_stride=stride, heads=heads, block_deltas=deltas, t_theta=t_theta)


SCORES = ["mean", "mean-sums", "max"]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SELECT_CASES))
@pytest.mark.parametrize("score", SCORES)
def test_select_blocks_offsets(backend, device, dtype, case, score):
    require(backend, "select_blocks", device, dtype)
    q, kp, blocks, d, kw = _select_inputs(case, dtype, device)
    kw["score"] = score.split("-")[0]
    sums = selection.block_key_sums(kp, blocks) if score == "mean-sums" else None
    scores = _call(backend, selection.block_scores, q, kp, blocks, block_key_sums=sums, **kw)
    oracle = reference.block_scores(q.double(), kp.double(), blocks, **kw)
    eager = reference.block_scores(q, kp, blocks, block_key_sums=sums, **kw)
    # Empty blocks score exactly 0 ("mean") or -inf ("max"), offsets or not.
    inf = torch.isinf(oracle)
    assert torch.equal(torch.isinf(scores.cpu()), inf.cpu())
    assert torch.equal(scores.cpu()[inf], oracle.to(scores.dtype)[inf])
    fin = ~inf.to(scores.device)
    assert_close_to_oracle(scores[fin].float(), oracle.to(scores.device)[fin],
                           eager[fin].float(), what=f"{backend} {case} {score}")
    if dtype == torch.float32:  # the ranking of the kernel's own scores (tests/test_select_blocks.py)
        idx = _call(backend, vidstream.select_blocks, q, kp, blocks, 2, block_key_sums=sums, **kw)
        assert torch.equal(idx.cpu(), reference.topk_ascending(scores.float().cpu(), 2))


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("score", SCORES)
def test_select_blocks_offsets_contract(backend, device, score):
    """Scores with block offsets == scores of a pool whose blocks were rope3d_shift_-ed (and of
    the key sums of that pool), up to rounding; all-zero offsets change nothing, bit for bit."""
    dtype = torch.float16 if backend == "cuda" else torch.float32
    require(backend, "select_blocks", device, dtype)
    q, kp, blocks, d, kw = _select_inputs("gqa-t_theta", dtype, device)
    kw["score"] = score.split("-")[0]
    sums = selection.block_key_sums(kp, blocks) if score == "mean-sums" else None
    got = _call(backend, selection.block_scores, q, kp, blocks, block_key_sums=sums, **kw)
    shifted = run(backend, vidstream.rope3d_shift_, kp.clone(), blocks, torch.tensor(d),
                  t_theta=kw["t_theta"])
    s_sums = selection.block_key_sums(shifted, blocks) if sums is not None else None
    plain = dict(kw, block_deltas=None)
    want = run(backend, selection.block_scores, q, shifted, blocks, block_key_sums=s_sums, **plain)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if score == "mean":  # one score is enough: zeros are dropped before dispatch
        zero = run(backend, selection.block_scores, q, kp, blocks,
                   **dict(kw, block_deltas=[0.0] * len(d)))
        assert torch.equal(zero, run(backend, selection.block_scores, q, kp, blocks, **plain))


# ----------------------------------------------------------------------------- §4 lowrank

def _lowrank_params() -> list:
    out = []
    for b, dev in (("reference", "cpu"), ("torch", "cpu"), ("triton", "cpu"), ("cpu", "cpu"),
                   ("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda")):
        strategies = {"reference": (None,), "cpu": ("tiled", "absorb", "decompress"),
                      "cuda": ("decompress",)}.get(b, ("decompress", "absorb"))
        bid = b if dev == "cpu" else f"{b}-cuda"
        out += [pytest.param(b, dev, s, id=f"{bid}-{s}") for s in strategies]
    return out


# (d_c, d_r, d_nope, d_v, H, Lq): d_r 24 (4 temporal pairs, a band narrower than the tile) and
# 64 (12 pairs); d_v != d_nope + d_r.
LOWRANK_SHAPES = [
    pytest.param(64, 24, 16, 24, 3, 5, id="dc64-dr24"),
    pytest.param(32, 64, 8, 16, 2, 1, id="dc32-dr64-lq1"),
]
LOWRANK_RANGES = [[40, 59], [0, 0], [3, 20], [25, 26]]  # unsorted, empty, one token
LOWRANK_DELTAS = [2.5, -1.0, -3.25, 7.0]


def _lowrank_inputs(d_c, d_r, d_nope, d_v, H, Lq, dtype, device, B=2, P=60):
    c = torch.randn(B, P, d_c, device=device).to(dtype)
    k_r = torch.randn(B, P, d_r, device=device).to(dtype)
    w_uk = (torch.randn(H, d_c, d_nope, device=device) * d_c**-0.5).to(dtype)
    w_uv = (torch.randn(H, d_c, d_v, device=device) * d_c**-0.5).to(dtype)
    q = torch.randn(B, Lq, H, d_nope + d_r, device=device).to(dtype)
    return q, c, w_uk, w_uv, k_r


@pytest.mark.parametrize("backend,device,strategy", _lowrank_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_c,d_r,d_nope,d_v,H,Lq", LOWRANK_SHAPES)
def test_lowrank_offsets(backend, device, strategy, dtype, d_c, d_r, d_nope, d_v, H, Lq):
    require(backend, "lowrank_cached_attention", device, dtype)
    q, c, w_uk, w_uv, k_r = _lowrank_inputs(d_c, d_r, d_nope, d_v, H, Lq, dtype, device)
    B = q.shape[0]
    _poison_heap((B, Lq, H, d_v), (B, H, Lq), dtype=dtype, device=device)
    kw = dict(kv_deltas=LOWRANK_DELTAS, return_lse=True)
    out, lse = _call(backend, vidstream.lowrank_cached_attention, q, c, w_uk, w_uv,
                     LOWRANK_RANGES, k_r_pool=k_r, strategy=strategy, **kw)
    q64, c64, wk64, wv64, kr64 = _f64(q, c, w_uk, w_uv, k_r)
    o64, l64 = reference.lowrank_cached_attention(q64, c64, wk64, wv64, LOWRANK_RANGES,
                                                  k_r_pool=kr64, **kw)
    o_e, l_e = reference.lowrank_cached_attention(q, c, w_uk, w_uv, LOWRANK_RANGES, k_r_pool=k_r,
                                                  **kw)
    # As tests/test_lowrank.py: the fused CPU kernels land at 2.3-3.7x eager's float32 error at
    # rounding level (eager runs blocked GEMMs); 16-bit meets 2x.
    factor = 4.0 if (backend == "cpu" and dtype == torch.float32
                     and strategy in ("tiled", "absorb")) else 2.0
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq)
    assert_close_to_oracle(out, o64.to(out.device), o_e, factor=factor, what="out")
    assert_close_to_oracle(lse, l64.to(lse.device), l_e, factor=factor, what="lse")


@pytest.mark.parametrize("backend,device,strategy", _lowrank_params())
def test_lowrank_offsets_contract(backend, device, strategy):
    """With offsets == on a copy of k_r_pool moved by rope3d_shift_ (same backend and strategy),
    up to rounding; all-zero offsets change nothing, bit for bit."""
    dtype = torch.float32
    require(backend, "lowrank_cached_attention", device, dtype)
    q, c, w_uk, w_uv, k_r = _lowrank_inputs(64, 24, 16, 24, 3, 5, dtype, device, B=1)
    args = (q, c, w_uk, w_uv, LOWRANK_RANGES)
    got = _call(backend, vidstream.lowrank_cached_attention, *args, k_r_pool=k_r,
                kv_deltas=LOWRANK_DELTAS, strategy=strategy)
    shifted = run(backend, vidstream.rope3d_shift_, k_r.clone().unsqueeze(2), LOWRANK_RANGES,
                  torch.tensor(LOWRANK_DELTAS))[:, :, 0]
    want = run(backend, vidstream.lowrank_cached_attention, *args, k_r_pool=shifted,
               strategy=strategy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = run(backend, vidstream.lowrank_cached_attention, *args, k_r_pool=k_r,
                strategy=strategy)
    zero = run(backend, vidstream.lowrank_cached_attention, *args, k_r_pool=k_r,
               kv_deltas=[0.0] * len(LOWRANK_RANGES), strategy=strategy)
    assert torch.equal(zero, plain)


# ----------------------------------------------------------------------------- bad input


def test_offsets_bad_input():
    """The Python checks run before dispatch: one backend is enough (triton, whose kernels
    would otherwise build tables from these values)."""
    q, k, v, r, d, _ = _attn_inputs("gqa-dv-unsorted", torch.float32, "cpu")
    with vidstream.use_backend("triton"):
        with pytest.raises(ValueError, match="kv_deltas"):
            vidstream.cached_attention(q, k, v, r, kv_deltas=d[:-1])
        with pytest.raises(ValueError, match="kv_deltas"):
            vidstream.cached_attention(q, k, v, r, kv_deltas=[1.0, float("nan"), 0.0, 2.0])
        with pytest.raises(ValueError, match="kv_deltas"):
            vidstream.cached_attention(q, k, v, r, kv_deltas=torch.tensor([1.0, float("inf"),
                                                                           0.0, 2.0]))
        with pytest.raises(ValueError, match="t_theta"):
            vidstream.cached_attention(q, k, v, r, kv_deltas=d, t_theta=torch.tensor([1e4] * 4))
        qs, kp, blocks, bd, kw = _select_inputs("gqa-t_theta", torch.float32, "cpu")
        with pytest.raises(ValueError, match="block_deltas"):
            vidstream.select_blocks(qs, kp, blocks, 2, block_deltas=bd + [1.0])
        with pytest.raises(ValueError, match="block_deltas"):
            vidstream.select_blocks(qs, kp, blocks, 2, block_deltas=[float("-inf")] * len(bd))
        with pytest.raises(ValueError, match="t_theta"):
            vidstream.select_blocks(qs, kp, blocks, 2, block_deltas=bd,
                                    t_theta=torch.tensor([1e4]))
        ql, c, w_uk, w_uv, k_r = _lowrank_inputs(64, 24, 16, 24, 3, 5, torch.float32, "cpu")
        with pytest.raises(ValueError, match="kv_deltas"):  # no k_r_pool: nothing to move
            vidstream.lowrank_cached_attention(ql[..., :16], c, w_uk, w_uv, LOWRANK_RANGES,
                                               kv_deltas=LOWRANK_DELTAS)
        with pytest.raises(ValueError, match="kv_deltas"):
            vidstream.lowrank_cached_attention(ql, c, w_uk, w_uv, LOWRANK_RANGES, k_r_pool=k_r,
                                               kv_deltas=LOWRANK_DELTAS[:2])
