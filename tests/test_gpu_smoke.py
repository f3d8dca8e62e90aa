"""GPU smoke selection (marker ``gpu_smoke``): every op x backend x dtype family on a few shapes,
odd ones included (lengths no multiple of any tile, one token, empty ranges and empty inputs,
grouped heads), against the float64 oracle with the tolerance rule of ``numerics``; plus the
streaming equivalence (op level and model level) on every backend.

``bench/gpu_check.sh`` runs it on a lent GPU (stage b, ``-m gpu_smoke``) and turns the test ids
``test_op[<op>-<backend>-<dtype>]`` of its junit xml into the GPU validation record. On a machine
without CUDA it runs what it can on CPU tensors (the cuda backend skips with the reason of
``vidstream.testing.why_not``); on a CUDA machine everything runs on CUDA tensors and the cpu
backend is skipped. The checks themselves are the helpers of the op test modules, reused."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import test_attention as _attn
import test_backward as _bwd
import test_lowrank as _lowrank
import test_rope3d as _rope
import test_rope3d_store as _store
import test_select_blocks as _select
import test_streaming as _streaming
import torch
from numerics import DTYPES, assert_close_to_oracle, max_err, require, run

import vidstream
from vidstream import backend as vs_backend
from vidstream import reference, testing
from vidstream.ops import select_blocks as selection
from vidstream.ops.rope_math import rope_bands
from vidstream.streaming import CacheConfig, FullSequenceAttention, StreamingDiT, StreamingKVCache
from vidstream.streaming.model import PRESETS

pytestmark = [pytest.mark.gpu_smoke, pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("reference", "cpu", "torch", "triton", "cuda")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- one function per op


def _check_one_key(backend, fn, ref_fn, args, kwargs, what):
    """``_check`` where every query sees one key: ``out`` is that key's value (the rule), ``lse``
    its scaled score, a D-term dot product whose rounding scales with its terms, not with the
    score (which may cancel to near 0, where the rule's floor, relative to the score, is below
    one rounding of the terms)."""
    out, lse = run(backend, fn, *args, **kwargs, return_lse=True)
    f64 = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    oracle_out, oracle_lse = ref_fn(*f64, **kwargs, return_lse=True)
    eager_out, _ = ref_fn(*args, **kwargs, return_lse=True)
    assert_close_to_oracle(out, oracle_out.to(out.device), eager_out, what=f"{what} out")
    _, terms = ref_fn(f64[0].abs(), f64[1].abs(), *f64[2:], **kwargs, return_lse=True)
    bound = 2 * args[0].shape[3] * torch.finfo(torch.float32).eps * terms
    assert lse.dtype == torch.float32 and torch.isfinite(lse).all(), f"{what} lse"
    assert ((lse.double() - oracle_lse).abs() <= bound).all(), (
        f"{what} lse: error {float((lse.double() - oracle_lse).abs().max()):.3e} past "
        f"{float(bound.max()):.3e}")


def _chunk_attention(backend, device, dtype):
    # (B, frames, frame_tokens, H, H_kv, D, chunk_frames, sink_frames, window_frames)
    for B, F, ft, H, H_kv, D, cf, sink, win in [
        (1, 8, 7, 4, 2, 64, 3, 1, 6),        # 56 tokens, partial last chunk, GQA, sink + window
        (2, 3, 40, 2, 2, 128, 1, 0, None),   # head dim 128, no window
        (1, 1, 1, 2, 1, 64, 1, 0, None),     # one token
        (1, 0, 4, 2, 2, 64, 1, 0, None),     # empty sequence
    ]:
        _attn._serves(backend, D, D, dtype)
        q, k, v = _attn._qkv(B, F * ft, F * ft, H, H_kv, D, D, dtype, device)
        kw = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=sink, window_frames=win)
        check = _check_one_key if F * ft == 1 else _attn._check
        check(backend, vidstream.chunk_attention, reference.chunk_attention, (q, k, v), kw,
              f"chunk_attention {backend} {dtype} F={F} ft={ft} H={H}/{H_kv} D={D}")

    def fn(q, k, v, lse=False):
        return vidstream.chunk_attention(q, k, v, frame_tokens=7, chunk_frames=3, sink_frames=1,
                                         window_frames=6, return_lse=lse)

    _grads(backend, "chunk_attention", fn, [(1, 56, 4, 64), (1, 56, 2, 64), (1, 56, 2, 64)],
           device, dtype)


def _grads(backend, op, fn, shapes, device, dtype):
    """The backward where the backend has one (the validation record then covers training too):
    every gradient against float64 autograd of the reference, as tests/test_backward.py does."""
    if vs_backend.op(op).no_backward(backend) is not None:
        return
    inputs = _bwd._draw(shapes, device)
    _bwd._check_grads(fn, inputs, dtype, backend, "qkv",
                      lse_max=_bwd._lse_max(lambda *a: fn(*a, lse=True), inputs))


def _cached_attention(backend, device, dtype):
    # (B, Lq, pool tokens, H, H_kv, D, ranges)
    for B, Lq, P, H, H_kv, D, ranges in [
        (2, 37, 150, 4, 2, 64, [[120, 150], [0, 9], [30, 101]]),          # GQA, any order
        (1, 70, 130, 2, 2, 128, [[100, 130], [0, 17], [50, 51], [60, 60]]),  # wrap, 1 token, empty
        (1, 1, 40, 2, 1, 64, [[13, 14]]),                                   # one query, one key
    ]:
        _attn._serves(backend, D, D, dtype)
        q, k, v = _attn._qkv(B, Lq, P, H, H_kv, D, D, dtype, device)
        kr = torch.tensor(ranges, dtype=torch.int32)
        check = _check_one_key if sum(e - s for s, e in ranges) == 1 else _attn._check
        check(backend, vidstream.cached_attention, reference.cached_attention, (q, k, v, kr), {},
              f"cached_attention {backend} {dtype} Lq={Lq} {ranges}")
    # Positions as metadata: each range's keys read as if rope3d_shift_-ed by its offset.
    q, k, v = _attn._qkv(2, 37, 150, 4, 2, 64, 64, dtype, device)
    kr = torch.tensor([[120, 150], [0, 9], [30, 101]], dtype=torch.int32)
    rope = dict(kv_deltas=[-3.0, 0.5, 7.25], t_theta=torch.tensor([1.0e4, 5.0e3]))
    _attn._check(backend, vidstream.cached_attention, reference.cached_attention, (q, k, v, kr),
                 rope, f"cached_attention {backend} {dtype} kv_deltas")

    def fn(q, k, v, lse=False):
        return vidstream.cached_attention(q, k, v, kr, **rope, return_lse=lse)

    _grads(backend, "cached_attention", fn, [(1, 37, 4, 64), (1, 150, 2, 64), (1, 150, 2, 64)],
           device, dtype)
    for ranges in ([], [[5, 5], [0, 0]]):  # an empty union: zeros and lse -inf
        q, k, v = _attn._qkv(1, 9, 20, 2, 1, 64, 64, dtype, device)
        kr = torch.tensor(ranges, dtype=torch.int32).reshape(-1, 2)
        out, lse = run(backend, vidstream.cached_attention, q, k, v, kr, return_lse=True)
        assert torch.equal(out, torch.zeros_like(out)), f"empty union {ranges}: out"
        assert torch.equal(lse, torch.full_like(lse, float("-inf"))), f"empty union {ranges}: lse"


def _rope3d(backend, device, dtype):
    # (head dim, heads, grid, per-head temporal theta)
    for D, H, grid, per_head in [(64, 1, (1, 1, 1), False), (96, 3, (2, 3, 5), True),
                                 (128, 4, (3, 5, 7), False), (64, 2, (0, 3, 5), False)]:
        L = grid[0] * grid[1] * grid[2]
        x = torch.randn(2, L, H, D, device=device).to(dtype)
        kw = dict(grid=grid, frame_offset=float(torch.randint(0, 2000, ()).item()) + 0.5,
                  t_theta=_rope._t_theta(H, device) if per_head else None)
        oracle = reference.rope3d(x.double(), **kw)
        eager = reference.rope3d(x, **kw)
        _rope._fresh_allocations(x)
        out = run(backend, vidstream.rope3d, x, **kw)
        assert_close_to_oracle(out, oracle, eager, what=f"rope3d {backend} {dtype} {grid}")


def _rope3d_shift_(backend, device, dtype):
    # (head dim, heads, pool tokens, ranges, per-head temporal theta)
    for D, H, P, n_ranges, per_head in [(64, 1, 1, 1, False), (96, 3, 37, 3, True),
                                        (128, 4, 130, 5, False)]:
        pool = torch.randn(2, P, H, D, device=device).to(dtype)
        ranges = _rope._random_ranges(P, n_ranges) if P > 1 else [[0, 1]]
        delta = (torch.randn(len(ranges), dtype=torch.float64) * 3000).round() / 4
        tt = _rope._t_theta(H, device) if per_head else None
        oracle = reference.rope3d_shift_(pool.double(), ranges, delta, t_theta=tt)
        eager = reference.rope3d_shift_(pool.clone(), ranges, delta, t_theta=tt)
        out = pool.clone()
        run(backend, vidstream.rope3d_shift_, out, torch.tensor(ranges, dtype=torch.int32), delta,
            t_theta=tt)
        assert_close_to_oracle(out, oracle, eager, what=f"rope3d_shift_ {backend} {dtype} P={P}")
        c_t = rope_bands(D)[0]  # only the temporal band of the ranges' tokens may change
        inside = torch.zeros(P, dtype=torch.bool)
        for s, e in ranges:
            inside[s:e] = True
        assert torch.equal(out[..., 2 * c_t:], pool[..., 2 * c_t:])
        assert torch.equal(out[:, ~inside.to(device)], pool[:, ~inside.to(device)])


def _rope3d_store_(backend, device, dtype):
    # One token, odd grid with Dv != D, Wan's head dim, an empty chunk; poisoned pools.
    for shape in _store.SHAPES:
        _store.test_store_matches_reference(backend, device, dtype, shape)


def _select_blocks(backend, device, dtype):
    # An empty and a one-token block with GQA, one query with k > M, stride 8 over 29 queries.
    for case in ("unequal-gqa", "k>M-one-query", "stride8-odd"):
        for score in ("mean", "max"):
            q, kp, r, k, stride, heads = _select._make(case, dtype, device)
            oracle, eager = _select._oracle(q, kp, r, stride, heads, score)
            kw = dict(query_stride=stride, heads=heads, score=score)
            scores = run(backend, selection.block_scores, q, kp, r, **kw)
            idx = run(backend, vidstream.select_blocks, q, kp, r, k, **kw)
            # Kernels score in float32; the reference in q's dtype.
            assert scores.device == q.device and (backend == "reference" or scores.dtype == torch.float32)
            what = f"select_blocks {backend} {case} {score} {dtype}"
            _select._finite_close(scores, oracle, eager, what)
            _select._check_indices(idx, scores, oracle, k, what)
    # The cached per-block key sums (block_key_sums) on the "mean" path.
    q, kp, r, k, stride, heads = _select._make("unequal-gqa", dtype, device)
    sums = selection.block_key_sums(kp, r)
    oracle, eager = _select._oracle(q, kp, r, stride, heads, "mean", sums)
    kw = dict(query_stride=stride, heads=heads, block_key_sums=sums)
    scores = run(backend, selection.block_scores, q, kp, r, **kw)
    idx = run(backend, vidstream.select_blocks, q, kp, r, k, **kw)
    _select._finite_close(scores, oracle, eager, f"select_blocks {backend} key sums {dtype}")
    _select._check_indices(idx, scores, oracle, k, f"select_blocks {backend} key sums {dtype}")


_LOWRANK_RANGES = [[25, 33], [3, 3], [0, 7], [38, 40]]  # unordered, empty, to the pool's end


def _lowrank_decompress(backend, device, dtype):
    # (d_c, d_r, d_nope, d_v, H)
    for d_c, d_r, d_nope, d_v, H in [(64, 0, 16, 24, 3), (192, 32, 16, 40, 2)]:
        c, w_uk, w_uv, k_r = _lowrank._inputs(2, 40, d_c, d_r, d_nope, d_v, H, dtype, device)
        N = sum(e - s for s, e in _LOWRANK_RANGES)
        _lowrank._poison_heap((2, N, H, d_nope + d_r), (2, N, H, d_v), dtype=dtype)
        k, v = run(backend, vidstream.lowrank_decompress, c, w_uk, w_uv, _LOWRANK_RANGES, k_r)
        k64, v64 = reference.lowrank_decompress(*_lowrank._f64(c, w_uk, w_uv), _LOWRANK_RANGES,
                                                *_lowrank._f64(k_r))
        k_e, v_e = reference.lowrank_decompress(c, w_uk, w_uv, _LOWRANK_RANGES, k_r)
        assert k.shape == (2, N, H, d_nope + d_r) and v.shape == (2, N, H, d_v)
        assert_close_to_oracle(k, k64, k_e, what=f"lowrank_decompress {backend} {dtype} k")
        assert_close_to_oracle(v, v64, v_e, what=f"lowrank_decompress {backend} {dtype} v")
    c, w_uk, w_uv, k_r = _lowrank._inputs(1, 9, 64, 32, 16, 24, 2, dtype, device)
    k, v = run(backend, vidstream.lowrank_decompress, c, w_uk, w_uv, [[4, 4], [0, 0]], k_r)
    assert k.shape == (1, 0, 2, 48) and v.shape == (1, 0, 2, 24)


def _lowrank_cached_attention(backend, device, dtype):
    strategies = {"cpu": (None, "tiled", "absorb"), "triton": ("decompress", "absorb")}.get(
        backend, (None,))
    # (d_c, d_r, d_nope, d_v, H, Lq): d_nope + d_r == d_v in (64, 128), which the cuda attention
    # serves; 265 tokens in unordered ranges, an empty one.
    ranges = [[150, 300], [0, 0], [10, 125]]
    for d_c, d_r, d_nope, d_v, H, Lq in [(192, 32, 32, 64, 2, 45), (64, 0, 64, 64, 3, 1)]:
        _attn._serves(backend, d_nope + d_r, d_v, dtype)
        c, w_uk, w_uv, k_r = _lowrank._inputs(2, 300, d_c, d_r, d_nope, d_v, H, dtype, device)
        q = torch.randn(2, Lq, H, d_nope + d_r, device=device).to(dtype)
        o64, l64 = reference.lowrank_cached_attention(*_lowrank._f64(q, c, w_uk, w_uv), ranges,
                                                      k_r_pool=_lowrank._f64(k_r)[0],
                                                      return_lse=True)
        o_e, l_e = reference.lowrank_cached_attention(q, c, w_uk, w_uv, ranges, k_r_pool=k_r,
                                                      return_lse=True)
        for strategy in strategies:
            _lowrank._poison_heap((2, Lq, H, d_v), (2, H, Lq), dtype=dtype)
            out, lse = run(backend, vidstream.lowrank_cached_attention, q, c, w_uk, w_uv, ranges,
                           k_r_pool=k_r, return_lse=True, strategy=strategy)
            # tests/test_lowrank.py's known gap: the fused CPU kernels at float32 rounding level.
            factor = 4.0 if (backend == "cpu" and dtype == torch.float32
                             and strategy in (None, "tiled", "absorb")) else 2.0
            what = f"lowrank_cached_attention {backend} {strategy} {dtype} d_c={d_c} Lq={Lq}"
            assert_close_to_oracle(out, o64, o_e, factor=factor, what=f"{what} out")
            assert lse.dtype == torch.float32 and lse.shape == (2, H, Lq)
            assert_close_to_oracle(lse, l64, l_e, factor=factor, what=f"{what} lse")


CASES = {
    "chunk_attention": _chunk_attention,
    "cached_attention": _cached_attention,
    "rope3d": _rope3d,
    "rope3d_shift_": _rope3d_shift_,
    "rope3d_store_": _rope3d_store_,
    "select_blocks": _select_blocks,
    "lowrank_decompress": _lowrank_decompress,
    "lowrank_cached_attention": _lowrank_cached_attention,
}


def _op_params():
    return [pytest.param(op, b, dt, id=f"{op}-{b}-{dtype_name(dt)}")
            for op in CASES for b in BACKENDS for dt in DTYPES]


def _runs_here(backend: str):
    if backend == "cpu" and DEVICE == "cuda":
        pytest.skip("the cpu backend takes CPU tensors; this run checks CUDA tensors")


@pytest.mark.parametrize("op,backend,dtype", _op_params())
def test_op(op, backend, dtype):
    _runs_here(backend)
    require(backend, op, DEVICE, dtype)
    CASES[op](backend, DEVICE, dtype)


def test_every_op_has_a_case():
    assert set(CASES) == set(testing.ops()), "an op was added or renamed: give it a smoke case"


# ----------------------------------------------------------------------------- streaming


@contextlib.contextmanager
def _ieee_float32():
    """No TF32 in float32 convolutions and matmuls (cuDNN allows it by default): a chunk and the
    whole sequence must round alike."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"streaming-{b}")
def test_streaming_equivalence(backend):
    """Generating chunk by chunk over a bounded cache equals the whole sequence at once: the ops
    alone (tests/test_attention.py, a sink plus a ring window), then the DiT (tests/
    test_streaming.py, a sliding window with evictions, ring wrap-around and rope3d_shift_)."""
    _runs_here(backend)
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32  # cuda attention: 16-bit
    for op in ("chunk_attention", "cached_attention", "rope3d", "rope3d_shift_", "rope3d_store_"):
        require(backend, op, DEVICE, dtype)
    _attn.test_streaming_equals_full_sequence(backend, DEVICE, 3, 1, 6, 7)

    cfg = replace(PRESETS["tiny"], dim=128, num_heads=2)  # head dim 64: every backend serves it
    m = StreamingDiT(cfg, seed=0, dtype=dtype, device=DEVICE)
    C, R, frames = 3, 6, 12  # the fourth chunk evicts the first and wraps the ring
    x = torch.randn(1, cfg.in_dim, frames, *cfg.latent_hw, device=DEVICE)
    t = torch.rand(1, frames, device=DEVICE) * 1000
    text_kv = m.text_kv(_streaming._text(m))
    with torch.no_grad(), _ieee_float32(), vidstream.use_backend(backend):
        full = m(x, t, text_kv, FullSequenceAttention(chunk_frames=C, window_frames=R + C))
        cache = StreamingKVCache(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_heads,
                                 head_dim=cfg.head_dim, frame_shape=cfg.frame_shape,
                                 config=CacheConfig(chunk_frames=C, sink_frames=0, recent_frames=R,
                                                    mid_blocks=0),
                                 dtype=dtype, device=DEVICE)
        streamed = _streaming._stream_teacher_forced(m, cache, x, t, text_kv, C)
    assert cache.max_position == R + C - 1  # positions stayed bounded: keys were re-rotated
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    assert max_err(streamed, full) < float("inf"), "NaN in the streamed video"
    torch.testing.assert_close(streamed, full, atol=tol, rtol=tol)
