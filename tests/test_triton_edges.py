"""The Triton kernels at the edges (CPU, under the interpreter): the NaN/Inf rule of docs/spec.md
(Conventions, "NaN and Inf") and edge shapes of valid inputs.

A NaN or +-Inf is planted in single q, k, v (or latent) elements, inside and outside what each
query may see, and the output and lse are compared with the float64 reference: the same NaN
positions, the same infinities, the finite rest by the tolerance rule. Poisons that cannot
interfere share a launch (q: one per query row, v: one per value channel; k and latents: one per
head or batch entry), which keeps the interpreter's work small."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close_to_oracle, require, run

import vidstream
from vidstream import reference
from vidstream.ops import select_blocks as selection

NAN, INF = float("nan"), float("inf")
DTYPES = (torch.float32, torch.float16)


def _double(args):
    return [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


# NaN and Inf are the point here: numpy's warnings about them in the interpreter are noise.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _match(got, oracle, eager, what):
    """NaN where the oracle has NaN and nowhere else; elsewhere assert_close_to_oracle (which
    wants the oracle's infinities exactly)."""
    got, oracle, eager = got.cpu(), oracle.cpu(), eager.cpu()
    assert got.shape == oracle.shape, f"{what}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    nan = torch.isnan(oracle)
    bad = (torch.isnan(got) != nan).nonzero().tolist()
    assert not bad, f"{what}: NaN pattern differs from the reference at {bad[:8]} ({len(bad)} in all)"
    keep = ~nan
    finite = torch.isfinite(oracle) & keep
    # The eager reference in the kernel's dtype sets the tolerance: where it is not finite the
    # rule could not fail, so that would be a bug of the reference.
    assert bool(torch.isfinite(eager[finite]).all()), f"{what}: eager reference not finite"
    assert_close_to_oracle(got[keep], oracle[keep], eager[keep], what=what)


def _check(op, ref, args, kwargs, what):
    """Runs the Triton op and the reference (float64 and the input dtype); compares (out, lse)."""
    out, lse = run("triton", op, *args, **kwargs, return_lse=True)
    kw64 = dict(zip(kwargs, _double(kwargs.values())))
    o64, l64 = ref(*_double(args), **kw64, return_lse=True)
    o, l_ = ref(*args, **kwargs, return_lse=True)
    assert lse.dtype == torch.float32
    _match(out, o64, o, f"{what} out")
    _match(lse, l64, l_, f"{what} lse")
    return out, lse


# ----------------------------------------------------------------------------- chunk_attention

# (frame_tokens, chunk_frames, sink_frames, window_frames, L, poisoned tokens). L = 12: frame 1
# (tokens 2-3) is seen by chunk 0 only, chunk 1 (tokens 4-7) by itself only, the sink (0-1) by
# all; the one 32-row tile spans three chunks, so its mask differs from row to row. L = 45:
# chunks of 10 tokens; tiles and key blocks straddle chunk and window boundaries.
_L12 = (2, 2, 1, 2, 12, (0, 2, 5, 9, 11))
_L45 = (5, 2, 1, 3, 45, (1, 7, 12, 24, 33))
_VALUES = (NAN, INF, -INF)


def _chunk_case(config, tensor, dtype, values=_VALUES):
    """One launch. q: each poison in its own row of one head (a query row reads only its own q).
    v: each (token, value) in its own channel of one head (output channel e reads only v[:, e]).
    k: a poisoned key reaches whole rows, so one head per (token, value)."""
    ft, cf, sink, window, L, tokens = config
    D = 16
    if tensor == "k":  # NaN at every token, the infinities at two
        spots = [(t, 3, val) for val in values for t in (tokens if val != val else tokens[1::2])]
        H = len(spots)
    else:
        spots = [(t, e % D, val) for e, (t, val) in enumerate(
            (t, val) for val in values for t in tokens)]
        H = 1
    q, k, v = (torch.randn(1, L, H, D).to(dtype) for _ in range(3))
    for h, (t, e, val) in enumerate(spots):
        dict(q=q, k=k, v=v)[tensor][0, t, h if tensor == "k" else 0, e] = val
    kw = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=sink, window_frames=window)
    out, _ = _check(vidstream.chunk_attention, reference.chunk_attention, (q, k, v), kw,
                    f"chunk L={L} {tensor} {dtype}")
    if tensor == "v":  # a value reaches exactly the rows that may see its key
        mask = reference.chunk_mask(L, ft, cf, sink, window)
        for t, e, val in spots:
            hit = mask[:, t] if val != val else mask[:, t] & ~torch.isfinite(out[0, :, 0, e])
            assert torch.equal(~torch.isfinite(out[0, :, 0, e]), mask[:, t]), (t, e, val)
            assert torch.equal(torch.isnan(out[0, :, 0, e]), hit & (val != val)), (t, e, val)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_chunk_attention_nonfinite(dtype, tensor):
    require("triton", "chunk_attention", "cpu", dtype)
    _chunk_case(_L12, tensor, dtype)


@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_chunk_attention_nonfinite_straddling_tiles(tensor):
    require("triton", "chunk_attention", "cpu", torch.float32)
    _chunk_case(_L45, tensor, torch.float32, _VALUES if tensor != "k" else (NAN,))


def test_chunk_attention_odd_shapes():
    require("triton", "chunk_attention", "cpu", torch.float32)
    kw = dict(frame_tokens=3, chunk_frames=1, sink_frames=1, window_frames=2)
    for B, L, H, H_kv, D, Dv in [(1, 1, 1, 1, 24, 40), (1, 6, 3, 1, 5, 7), (0, 6, 2, 1, 8, 8),
                                 (1, 0, 2, 2, 8, 8)]:
        q = torch.randn(B, L, H, D)
        k, v = torch.randn(B, L, H_kv, D), torch.randn(B, L, H_kv, Dv)
        _check(vidstream.chunk_attention, reference.chunk_attention, (q, k, v),
               dict(kw, frame_tokens=1) if L == 1 else kw,
               f"chunk B={B} L={L} H={H}/{H_kv} D={D} Dv={Dv}")


# ----------------------------------------------------------------------------- cached_attention

_RANGES = [[30, 37], [3, 11], [20, 20]]  # any order, an empty range
# Outside every range: before the first (0), in the padded tail of a range's key block (15
# after [3, 11), 38 after [30, 37)), at the empty range (20). Inside: 5 and 33.
_OUTSIDE = ((0, NAN), (15, INF), (38, -INF), (20, NAN))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_cached_attention_nonfinite(dtype, tensor):
    require("triton", "cached_attention", "cpu", dtype)
    P, Lq, D = 40, 5, 16
    H = 4 if tensor == "k" else 1
    q = torch.randn(1, Lq, H, D).to(dtype)
    kp, vp = torch.randn(1, P, H, D).to(dtype), torch.randn(1, P, H, D).to(dtype)
    if tensor == "q":  # one row each
        q[0, 0, 0, 3], q[0, 2, 0, 0], q[0, 4, 0, 15] = NAN, INF, -INF
    elif tensor == "k":  # head 0: every poison outside; heads 1-3: one inside each
        for t, val in _OUTSIDE:
            kp[0, t, 0, 3] = val
        kp[0, 5, 1, 3], kp[0, 33, 2, 3], kp[0, 5, 3, 3] = NAN, INF, -INF
    else:  # one channel each: 0-3 outside, 4-6 inside
        for e, (t, val) in enumerate(_OUTSIDE + ((5, NAN), (33, INF), (10, -INF))):
            vp[0, t, 0, e] = val
    out, _ = _check(vidstream.cached_attention, reference.cached_attention, (q, kp, vp, _RANGES),
                    {}, f"cached {tensor} {dtype}")
    if tensor == "v":
        assert torch.isfinite(out[..., :4]).all() and not torch.isfinite(out[..., 4:7]).any()
    if tensor == "k":
        assert torch.isfinite(out[:, :, 0]).all()


def test_cached_attention_empty_and_infinite_logits():
    require("triton", "cached_attention", "cpu", torch.float32)
    q = torch.randn(2, 4, 1, 8)
    kp, vp = torch.randn(2, 12, 1, 8), torch.randn(2, 12, 1, 8)
    kp[:, 5], vp[:, 5] = NAN, NAN
    # Nothing to attend, though the pool holds NaN: zeros and lse = -inf.
    out, lse = run("triton", vidstream.cached_attention, q, kp, vp, [[5, 5], [9, 9]],
                   return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -INF).all())
    # One key with an infinite logit: +inf gives out NaN and lse +inf; -inf leaves a row whose
    # only allowed score is -inf: out NaN (softmax over no finite score), lse -inf; not zeros.
    kp[:, 2] = torch.randn(8).abs()
    kp[:, 2, :, 1] = INF
    q[0, :, :, 1] = q[0, :, :, 1].abs()
    q[1, :, :, 1] = -q[1, :, :, 1].abs()
    out, lse = _check(vidstream.cached_attention, reference.cached_attention,
                      (q, kp, vp, [[2, 3], [7, 7]]), {}, "cached one key, infinite logit")
    assert torch.isnan(out).all() and bool((lse[0] == INF).all()) and bool((lse[1] == -INF).all())
    # The same -inf logit beside finite ones: that key gets weight 0.
    _check(vidstream.cached_attention, reference.cached_attention, (q[1:], kp[1:], vp[1:], [[0, 4]]),
           {}, "cached -inf logit among finite ones")


def test_cached_attention_odd_shapes():
    require("triton", "cached_attention", "cpu", torch.float32)
    for B, Lq, H, H_kv, D, Dv, ranges in [(1, 1, 1, 1, 24, 40, [[3, 4]]),
                                          (1, 3, 3, 1, 5, 7, [[0, 9], [11, 12]]),
                                          (0, 3, 2, 1, 8, 8, [[0, 4]]),
                                          (1, 0, 2, 2, 8, 8, [[0, 4]])]:
        q = torch.randn(B, Lq, H, D)
        kp, vp = torch.randn(B, 12, H_kv, D), torch.randn(B, 12, H_kv, Dv)
        _check(vidstream.cached_attention, reference.cached_attention, (q, kp, vp, ranges), {},
               f"cached B={B} Lq={Lq} H={H}/{H_kv} D={D} Dv={Dv}")


# ----------------------------------------------------------------------------- low-rank

_LR_RANGES = [[12, 14], [2, 9]]
_LR_IN, _LR_OUT = (4, 13, 8), (0, 10, 19)  # inside the ranges; outside (before, between, last)


def _lowrank_inputs(B, Lq=2, H=1, P=20, d_c=12, d_nope=8, d_r=4, d_v=6, dtype=torch.float32):
    def w(*s):
        return (torch.randn(*s) / max(s[1], 1) ** 0.5).to(dtype)

    q = torch.randn(B, Lq, H, d_nope + d_r).to(dtype)
    c = torch.randn(B, P, d_c).to(dtype)
    kr = torch.randn(B, P, d_r).to(dtype) if d_r else None
    return q, c, w(H, d_c, d_nope), w(H, d_c, d_v), kr


def _lowrank_check(strategy, what, q, c, wuk, wuv, kr, ranges=_LR_RANGES):
    def op(*a, **kw):
        return vidstream.lowrank_cached_attention(*a, **kw, strategy=strategy)

    return _check(op, reference.lowrank_cached_attention, (q, c, wuk, wuv, ranges),
                  dict(k_r_pool=kr), f"lowrank {strategy} {what}")


# Latent infinities are not tested under "absorb": folding w_uk into q changes which sums meet
# an Inf (q_lat . c has one infinite term where q . (c w_uk) has several, of either sign), so
# Inf - Inf (NaN) and +-Inf legitimately differ from the reference there; so do infinite q.
_LR_NONFINITE = [pytest.param(t, s, d, id=f"{t}-{s}-{str(d)[6:]}") for s in ("absorb", "decompress")
                 for t in ("q", "c", "k_r") for d in DTYPES if t == "k_r" or d == torch.float32]


@pytest.mark.parametrize("tensor,strategy,dtype", _LR_NONFINITE)
def test_lowrank_cached_attention_nonfinite(tensor, strategy, dtype):
    require("triton", "lowrank_cached_attention", "cpu", dtype)
    values = (NAN,) if strategy == "absorb" and tensor != "k_r" else _VALUES
    # Batch 0: every poison outside the ranges; batch 1 + i: values[i] inside.
    q, c, wuk, wuv, kr = _lowrank_inputs(1 + len(values), dtype=dtype)
    for i, val in enumerate(values):
        if tensor == "q":
            q[1 + i, i % 2, 0, 1] = val
        else:
            t = c if tensor == "c" else kr
            t[0, _LR_OUT[i], 1] = val
            t[1 + i, _LR_IN[i], 1] = val
    out, _ = _lowrank_check(strategy, f"{tensor} {dtype}", q, c, wuk, wuv, kr)
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_decompress_nonfinite(dtype):
    require("triton", "lowrank_decompress", "cpu", dtype)
    _, c, wuk, wuv, kr = _lowrank_inputs(1, dtype=dtype)
    for i, val in enumerate(_VALUES):
        c[0, _LR_IN[i], i], c[0, _LR_OUT[i], i] = val, val
        kr[0, _LR_IN[i], i], kr[0, _LR_OUT[i], i] = -val, -val
    got = run("triton", vidstream.lowrank_decompress, c, wuk, wuv, _LR_RANGES, k_r_pool=kr)
    want = reference.lowrank_decompress(*_double((c, wuk, wuv, _LR_RANGES)), k_r_pool=kr.double())
    eager = reference.lowrank_decompress(c, wuk, wuv, _LR_RANGES, k_r_pool=kr)
    for g, w, e, name in zip(got, want, eager, "kv"):
        _match(g, w, e, f"decompress {name} {dtype}")


@pytest.mark.parametrize("strategy", ["absorb", "decompress"])
def test_lowrank_no_queries(strategy):
    require("triton", "lowrank_cached_attention", "cpu", torch.float32)
    out, lse = _lowrank_check(strategy, "Lq=0", *_lowrank_inputs(1, Lq=0))
    assert out.shape == (1, 0, 1, 6) and lse.shape == (1, 1, 0)
    _lowrank_check(strategy, "B=0", *_lowrank_inputs(0))
    _lowrank_check(strategy, "H=0", *_lowrank_inputs(1, H=0))


@pytest.mark.parametrize("strategy", ["absorb", "decompress"])
def test_lowrank_edge_shapes(strategy):
    require("triton", "lowrank_cached_attention", "cpu", torch.float32)
    _lowrank_check(strategy, "one query, one token", *_lowrank_inputs(1, Lq=1), [[7, 8]])
    _lowrank_check(strategy, "empty ranges", *_lowrank_inputs(1), [[3, 3]])
    _lowrank_check(strategy, "d_c=0", *_lowrank_inputs(1, d_c=0, d_nope=3, d_r=5, d_v=3))
    _lowrank_check(strategy, "odd dims", *_lowrank_inputs(1, H=3, d_c=20, d_nope=5, d_r=0, d_v=33))


def test_lowrank_decompress_edge_shapes():
    require("triton", "lowrank_decompress", "cpu", torch.float32)
    for what, (_, c, wuk, wuv, kr), ranges in [
            ("d_c=0", _lowrank_inputs(1, d_c=0), _LR_RANGES),
            ("empty", _lowrank_inputs(1), [[4, 4]]),
            ("one token, odd dims", _lowrank_inputs(1, H=2, d_c=5, d_nope=3, d_r=1, d_v=7), [[3, 4]]),
            ("B=0", _lowrank_inputs(0), _LR_RANGES)]:
        got = run("triton", vidstream.lowrank_decompress, c, wuk, wuv, ranges, k_r_pool=kr)
        want = reference.lowrank_decompress(*_double((c, wuk, wuv, ranges)), k_r_pool=kr.double())
        eager = reference.lowrank_decompress(c, wuk, wuv, ranges, k_r_pool=kr)
        for g, w, e, name in zip(got, want, eager, "kv"):
            _match(g, w, e, f"decompress {what} {name}")


# ----------------------------------------------------------------------------- select_blocks

_BLOCKS = [[0, 3], [3, 8], [8, 8], [10, 14], [14, 20]]  # token 9 is in no block


def _scores_and_pick(q, kp, k, **kw):
    s = run("triton", selection.block_scores, q, kp, _BLOCKS, **kw)
    idx = run("triton", vidstream.select_blocks, q, kp, _BLOCKS, k, **kw)
    s64 = reference.block_scores(q.double(), kp.double(), _BLOCKS, **kw)
    s32 = reference.block_scores(q, kp, _BLOCKS, **kw)
    return s, idx, s64, s32


# (poisoned tensor, index, blocks whose score is NaN): a key inside block 1, a key in no block,
# a sampled query (rows 0, 4, 8 with query_stride=4) of a scored head (0) (all blocks but the
# empty one: an empty sum is 0 under "mean", an empty max -inf), an unsampled query, a query of
# a head that is not scored.
_SELECT = [("k", (0, 4, 0, 2), [1]), ("k", (0, 9, 0, 2), []), ("q", (0, 4, 0, 5), [0, 1, 3, 4]),
           ("q", (0, 5, 0, 5), []), ("q", (0, 0, 1, 5), [])]


@pytest.mark.parametrize("score", ["mean", "max"])
def test_select_blocks_nan(score):
    dtype = torch.float32  # 16-bit inputs are widened on load: nothing dtype-specific here
    require("triton", "select_blocks", "cpu", dtype)
    for tensor, at, nan_blocks in _SELECT:
        q, kp = torch.randn(1, 9, 2, 8).to(dtype), torch.randn(1, 20, 1, 8).to(dtype)
        dict(q=q, k=kp)[tensor][at] = NAN
        s, idx, s64, s32 = _scores_and_pick(q, kp, 2, query_stride=4, score=score)
        what = f"{score} {dtype} NaN in {tensor}{list(at)}"
        assert torch.isnan(s).nonzero().flatten().tolist() == nan_blocks, what
        _match(s, s64.float(), s32.float(), what)
        # NaN ranks above every number; the rest by score.
        assert idx.tolist() == reference.topk_ascending(s, 2).tolist(), what
        assert set(nan_blocks[:2]) <= set(idx.tolist()), what


def test_select_blocks_max_inf():
    dtype = torch.float32
    require("triton", "select_blocks", "cpu", dtype)
    for val in (INF, -INF):
        q, kp = torch.randn(1, 9, 2, 8).to(dtype), torch.randn(1, 20, 1, 8).to(dtype)
        kp[0, 4, 0, 2] = val
        kp[0, 15:17, 0] = val  # block 4: two keys with one dot of each sign or two of one
        s, idx, s64, s32 = _scores_and_pick(q, kp, 3, score="max")
        _match(s, s64.float(), s32.float(), f"max {val} {dtype}")
        assert idx.tolist() == reference.topk_ascending(s, 3).tolist()


@pytest.mark.parametrize("score", ["mean", "max"])
def test_select_blocks_order_nan_and_ties(score):
    """Exact scores: blocks 0, 2, 4 tie, 1 and 3 are NaN, 5 is the largest number."""
    require("triton", "select_blocks", "cpu", torch.float32)
    blocks = [[2 * m, 2 * m + 2] for m in range(6)]
    q = torch.ones(1, 1, 1, 4)
    kp = torch.ones(1, 12, 1, 4)
    kp[0, 2, 0, 1] = NAN
    kp[0, 7, 0, 3] = NAN
    kp[0, 10:12] = 2.0
    for k, want in [(2, [1, 3]), (4, [0, 1, 3, 5]), (5, [0, 1, 2, 3, 5]), (7, [0, 1, 2, 3, 4, 5])]:
        got = run("triton", vidstream.select_blocks, q, kp, blocks, k, score=score, scale=1.0)
        ref = reference.select_blocks(q, kp, blocks, k, score=score, scale=1.0)
        assert got.tolist() == want == ref.tolist(), (k, got.tolist(), ref.tolist())


def test_select_blocks_edge_shapes():
    require("triton", "select_blocks", "cpu", torch.float32)
    for score in ("mean", "max"):
        # No batch: every score is a mean over nothing (NaN), but an empty block keeps 0 / -inf
        # (docs/spec.md §5); NaN ranks first, so the first k non-empty blocks.
        q, kp = torch.randn(0, 4, 2, 8), torch.randn(0, 20, 1, 8)
        s, idx, s64, _ = _scores_and_pick(q, kp, 2, score=score)
        empty = torch.tensor([b <= a for a, b in _BLOCKS])
        want = torch.where(empty, 0.0 if score == "mean" else float("-inf"), float("nan"))
        torch.testing.assert_close(s, want, equal_nan=True)
        torch.testing.assert_close(s64.float(), want, equal_nan=True)
        assert idx.tolist() == [i for i in range(len(_BLOCKS)) if not empty[i]][:2]
        # One query, one head, an odd head dim.
        q, kp = torch.randn(1, 1, 1, 5), torch.randn(1, 20, 1, 5)
        s, idx, s64, s32 = _scores_and_pick(q, kp, 3, score=score)
        _match(s, s64.float(), s32.float(), f"{score} one query")
        assert idx.tolist() == reference.topk_ascending(s, 3).tolist()
