"""The Triton backward of chunk_attention and cached_attention (triton_kernels/attention_backward.py)
against float64 autograd of the eager reference, by the flash-attn rule (tests/numerics.py): the
kernel's error at most about twice that of eager autograd in the same dtype.

The kernels get ``out`` and ``lse`` from the float64 reference run on the same (rounded) inputs,
as an exact forward would give them, so that these tests do not depend on the Triton forward.
Under the interpreter the tiles are ``INTERPRET_TILE`` (16) square: the small shapes here still
span several query and key blocks, straddling chunk, window, sink and range boundaries."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close_to_oracle

from vidstream import triton_kernels
from vidstream.ops.attention import cached_attention_reference, chunk_attention_reference, chunk_mask

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # NaN is planted on purpose below: numpy's warnings about it in the interpreter are noise.
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(scope="module")
def kernels():
    if triton_kernels.mode() is None:
        pytest.skip("triton cannot run here (not installed, or no GPU and TRITON_INTERPRET unset)")
    from vidstream.triton_kernels import attention_backward

    return attention_backward


def _dev():
    return "cuda" if triton_kernels.mode() == "gpu" else "cpu"


def _grads(fn, inputs, dout, dtype):
    """torch.autograd.grad of fn(*inputs) in ``dtype`` (copies that require grad)."""
    xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*xs), xs, dout.to(dtype))


def _compare(got, oracle, eager, names, what):
    """NaN exactly where float64 autograd has NaN; elsewhere the flash-attn rule."""
    for g, o, e, name in zip(got, oracle, eager, names):
        g, o, e = g.cpu(), o.cpu(), e.cpu()
        assert g.dtype == e.dtype and g.shape == o.shape, f"{what} {name}: {g.dtype} {g.shape}"
        nan = torch.isnan(o)
        bad = (torch.isnan(g) != nan).nonzero().tolist()
        assert not bad, f"{what} {name}: NaN pattern differs from autograd at {bad[:6]} ({len(bad)})"
        assert bool(torch.isfinite(e[~nan]).all()), f"{what} {name}: eager not finite"
        assert_close_to_oracle(g[~nan], o[~nan], e[~nan], what=f"{what} {name}")


def _intervals(flags: torch.Tensor) -> list:
    """Maximal runs of True in a bool vector, as (start, end)."""
    idx = flags.nonzero().flatten().tolist()
    runs = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _expected_counts(L, ft, cf, sink, window, tile, group):
    """Blocks a kernel must visit when it visits only blocks holding an allowed pair: dK/dV (per
    key block, summed over the G heads) covers the queries that see any of its keys, dQ (per
    query block) the keys any of its queries sees, each run of them with as few tiles as fit."""
    mask = chunk_mask(L, ft, cf, sink, window)
    blocks = range(0, L, tile)
    dkdv, dq = [], []
    for n0 in blocks:
        runs = _intervals(mask[:, n0:n0 + tile].any(1))
        assert len(runs) == 1  # the queries of a key block are one run (docs/spec.md §1)
        dkdv.append(group * -(-(runs[0][1] - runs[0][0]) // tile))
    for m0 in blocks:
        dq.append(sum(-(-(b - a) // tile) for a, b in _intervals(mask[m0:m0 + tile].any(0))))
    return torch.tensor(dkdv, dtype=torch.int32), torch.tensor(dq, dtype=torch.int32)


# ----------------------------------------------------------------------------- chunk_attention

# (frame_tokens, chunk_frames, sink_frames, window_frames, L, H, H_kv). L is no multiple of the
# 16-token tile; odd frame sizes put chunk boundaries inside tiles. float16 on one case: the mask
# logic is the same for every dtype, and the interpreter's time is short.
_F32, _BOTH = [torch.float32], [torch.float32, torch.float16]
_CHUNK_CASES = [
    ("window>chunk-sink1-gqa2", (3, 2, 1, 3, 45, 4, 2), _BOTH),
    ("no-window", (5, 1, 0, None, 35, 1, 1), _F32),
    ("window=chunk-sink0-mqa", (3, 2, 0, 2, 39, 4, 1), _F32),
    ("one-token-chunks-sink1", (1, 1, 1, 4, 37, 2, 1), _F32),
]


@pytest.mark.parametrize("case,dtype", [pytest.param(name, dt, id=f"{name}-{dt}")
                                        for name, _, dts in _CHUNK_CASES for dt in dts])
def test_chunk_backward(kernels, case, dtype):
    ft, cf, sink, window, L, H, Hk = dict((n, c) for n, c, _ in _CHUNK_CASES)[case]
    D, Dv = 16, 24
    dev = _dev()
    q, k, v = (torch.randn(1, L, h, d, device=dev).to(dtype)
               for h, d in ((H, D), (Hk, D), (Hk, Dv)))
    dout = torch.randn(1, L, H, Dv, device=dev).to(dtype)
    mask = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=sink, window_frames=window)
    out, lse = chunk_attention_reference(q.double(), k.double(), v.double(), **mask,
                                         return_lse=True)
    out, lse = out.to(dtype), lse.float()
    scale = D ** -0.5
    if dtype == torch.float32:  # the launcher, with the visited-block counts
        counts = {}
        got = kernels.chunk_backward_launch(dout, q, k, v, out, lse, ft, cf, sink, window, scale,
                                            counts=counts)
        if triton_kernels.mode() == "interpret":
            # Excluded blocks are skipped, not masked: each program visits exactly the blocks
            # that hold an allowed (query, key) pair.
            dkdv, dq = _expected_counts(L, ft, cf, sink, window, kernels.INTERPRET_TILE, H // Hk)
            assert torch.equal(counts["dkdv"].cpu(), dkdv.expand(Hk, -1)), (counts["dkdv"], dkdv)
            assert torch.equal(counts["dq"].cpu(), dq.expand(H, -1)), (counts["dq"], dq)
    else:  # the registered op
        got = kernels.chunk_attention_backward_triton(dout, q, k, v, out, lse, ft, cf, sink, window,
                                                      scale)
    fn = lambda q, k, v: chunk_attention_reference(q, k, v, **mask, scale=scale)  # noqa: E731
    oracle = _grads(fn, (q, k, v), dout, torch.float64)
    eager = _grads(fn, (q, k, v), dout, dtype)
    _compare(got, oracle, eager, ("dq", "dk", "dv"), case)


def test_chunk_backward_nan_stays_where_autograd_puts_it(kernels):
    """One poison per head (H = H_kv = 4, so heads do not mix): a NaN in k, in v, in a q row and in
    a dout row, each at a token that later chunks' windows exclude. Masked pairs inside tiles
    whose mask differs by row must not carry it (0 * NaN) to gradients autograd keeps finite."""
    ft, cf, sink, window, L = 3, 2, 1, 3, 30
    D = 16
    dev = _dev()
    q, k, v, dout = (torch.randn(1, L, 4, D, device=dev) for _ in range(4))
    # Chunks of 6 tokens; a 3-frame window. Token 10 (frame 3) is seen by chunks 1..2 only,
    # token 13 (frame 4) by chunk 2 only; row 12 (chunk 2) shares its query tile with keys of
    # chunks 3..4 it may not see, row 20 (chunk 3) with keys of frames 3..4.
    k[0, 10, 0, 3] = float("nan")
    v[0, 13, 1, 5] = float("nan")
    q[0, 12, 2, 7] = float("nan")
    dout[0, 20, 3, 2] = float("nan")
    mask = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=sink, window_frames=window)
    out, lse = chunk_attention_reference(q.double(), k.double(), v.double(), **mask,
                                         return_lse=True)
    scale = D ** -0.5
    got = kernels.chunk_attention_backward_triton(dout, q, k, v, out.float(), lse.float(), ft, cf,
                                                  sink, window, scale)
    fn = lambda q, k, v: chunk_attention_reference(q, k, v, **mask, scale=scale)  # noqa: E731
    oracle = _grads(fn, (q, k, v), dout, torch.float64)
    eager = _grads(fn, (q, k, v), dout, torch.float32)
    for g in oracle:  # the poisons must leave finite gradients for the test to mean anything
        assert bool(torch.isfinite(g).any()) and bool(torch.isnan(g).any())
    _compare(got, oracle, eager, ("dq", "dk", "dv"), "nan")


# ----------------------------------------------------------------------------- cached_attention

# (pool tokens, ranges, kv_deltas, t_theta per kv head, Lq). Ranges unsorted, with empty and
# one-token ones; offsets negative, fractional, zero.
_CACHED_CASES = [
    ("plain", (70, [[40, 57], [3, 4], [10, 10], [20, 38]], None, None, 19), _F32),
    ("offsets", (70, [[40, 57], [3, 4], [10, 10], [20, 38]], [-2.5, 3.0, 7.0, 0.0], None, 13),
     [torch.float16]),
    ("offsets-t_theta", (50, [[33, 50], [0, 1], [5, 21]], [1.25, -4.0, 0.5], [1.0e4, 2.5e3], 13),
     _BOTH),
]


@pytest.mark.parametrize("case,dtype", [pytest.param(name, dt, id=f"{name}-{dt}")
                                        for name, _, dts in _CACHED_CASES for dt in dts])
def test_cached_backward(kernels, case, dtype):
    P, ranges, deltas, t_theta, Lq = dict((n, c) for n, c, _ in _CACHED_CASES)[case]
    B, H, Hk, D, Dv = 1, 4, 2, 20, 12  # D = 20: 4 temporal pairs, a scale not 2**-n
    dev = _dev()
    q = torch.randn(B, Lq, H, D, device=dev).to(dtype)
    k, v = (torch.randn(B, P, Hk, d, device=dev).to(dtype) for d in (D, Dv))
    dout = torch.randn(B, Lq, H, Dv, device=dev).to(dtype)
    d64 = None if deltas is None else torch.tensor(deltas, dtype=torch.float64)
    tt = None if t_theta is None else torch.tensor(t_theta, device=dev)
    rope = dict(kv_deltas=d64, t_theta=tt)
    out, lse = cached_attention_reference(q.double(), k.double(), v.double(), ranges, **rope,
                                          return_lse=True)
    scale = D ** -0.5
    inside = torch.zeros(P, dtype=torch.bool)
    for s, e in ranges:
        inside[s:e] = True
    # Pool tokens outside the ranges must never be read: NaN there must not reach any gradient.
    kp, vp = k.clone(), v.clone()
    kp[:, ~inside.to(dev)] = float("nan")
    vp[:, ~inside.to(dev)] = float("nan")
    kr = torch.tensor(ranges, dtype=torch.int32, device=dev)
    got = kernels.cached_attention_backward_triton(dout, q, kp, vp, out.to(dtype), lse.float(), kr,
                                                   scale, d64, 10000.0, tt)
    for g in got[1:]:
        assert bool((g[:, ~inside.to(dev)] == 0).all()), "pool rows outside the ranges are not 0"
    fn = lambda q, k, v: cached_attention_reference(q, k, v, ranges, **rope, scale=scale)  # noqa: E731
    oracle = _grads(fn, (q, k, v), dout, torch.float64)
    eager = _grads(fn, (q, k, v), dout, dtype)
    _compare(got, oracle, eager, ("dq", "dk_pool", "dv_pool"), case)


def test_cached_backward_empty_union(kernels):
    """Nothing to attend (lse = -inf): dq = 0, and the pools' gradients are 0 everywhere."""
    dev = _dev()
    q, dout = torch.randn(1, 5, 2, 16, device=dev), torch.randn(1, 5, 2, 16, device=dev)
    k, v = torch.randn(1, 24, 1, 16, device=dev), torch.randn(1, 24, 1, 16, device=dev)
    ranges = [[4, 4], [20, 20]]
    out, lse = cached_attention_reference(q, k, v, ranges, return_lse=True)
    assert bool((lse == float("-inf")).all())
    kr = torch.tensor(ranges, dtype=torch.int32, device=dev)
    for g in kernels.cached_attention_backward_triton(dout, q, k, v, out, lse, kr, 0.25):
        assert bool((g == 0).all())


def test_wrappers_refuse_mismatched_inputs(kernels):
    q = torch.randn(1, 6, 2, 16)
    k = v = torch.randn(1, 6, 1, 16)
    out, lse = torch.randn(1, 6, 2, 16), torch.zeros(1, 2, 6)
    with pytest.raises(ValueError, match="lse"):
        kernels.chunk_attention_backward_triton(out, q, k, v, out, lse.double(), 3, 1, 0, None, 0.25)
    with pytest.raises(ValueError, match="dout"):
        kernels.chunk_attention_backward_triton(out.half(), q, k, v, out, lse, 3, 1, 0, None, 0.25)
    with pytest.raises(ValueError, match="multiple of frame_tokens"):
        kernels.chunk_attention_backward_triton(out, q, k, v, out, lse, 4, 1, 0, None, 0.25)
    with pytest.raises(ValueError, match="kv_deltas"):
        kernels.cached_attention_backward_triton(out, q, k, v, out, lse,
                                                 torch.tensor([[0, 2]], dtype=torch.int32), 0.25,
                                                 torch.zeros(2, dtype=torch.float64))


def test_opcheck(kernels):
    """Schemas and fake kernels of the two ops (what torch.compile traces with)."""
    q, dout = torch.randn(1, 12, 2, 16), torch.randn(1, 12, 2, 8)
    k, v = torch.randn(1, 12, 1, 16), torch.randn(1, 12, 1, 8)
    mask = dict(frame_tokens=3, chunk_frames=2, sink_frames=1, window_frames=2)
    out, lse = chunk_attention_reference(q, k, v, **mask, return_lse=True)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(kernels._chunk_attention_backward_op,
                          (dout, q, k, v, out, lse, 3, 2, 1, 2, 0.25), test_utils=utils)
    kp, vp = torch.randn(1, 20, 1, 16), torch.randn(1, 20, 1, 8)
    kr = torch.tensor([[10, 14], [0, 3]], dtype=torch.int32)
    out, lse = cached_attention_reference(q, kp, vp, kr, kv_deltas=[1.0, -2.0], return_lse=True)
    torch.library.opcheck(kernels._cached_attention_backward_op,
                          (dout, q, kp, vp, out, lse, kr, 0.25,
                           torch.tensor([1.0, -2.0], dtype=torch.float64), 10000.0, None),
                          test_utils=utils)
