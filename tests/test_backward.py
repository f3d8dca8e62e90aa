"""Gradients of every differentiable op on every backend that has a backward here (issue #14).

Each gradient against float64 autograd of the reference, with the flash-attn rule (at most about
twice eager PyTorch's error: autograd of the reference in the same dtype), on fresh random inputs
of the forward tests' kinds of shapes (odd sizes, GQA, empty and one-token ranges, sink/window);
``torch.autograd.gradcheck`` in float64 where a backend takes it; ``torch.library.opcheck`` with
``requires_grad`` inputs (its autograd-registration test) on the C++ and Triton ops;
``torch.compile(fullgraph=True)`` of forward + backward. A backend whose backward kernels are not
in this build (``Op.no_backward``) is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close_to_oracle, max_err, require

import vidstream
from vidstream import _extension, backend
from vidstream.ops import attention as attn_ops
from vidstream.ops import autograd_utils as ag
from vidstream.ops.metadata import TokenRanges

GRAD_BACKENDS = ("torch", "cpu", "triton", "cuda")


def _require_backward(backend_name: str, op: str, dtype: torch.dtype, device: str = "cpu"):
    if backend_name == "cuda":
        device = "cuda"
    require(backend_name, op, device, dtype)
    why = backend.op(op).no_backward(backend_name)
    if why is not None:
        pytest.skip(f"{backend_name} has no backward of {op} here: {why}")


def _draw(shapes, device="cpu"):
    """float64 leaves, the source of every dtype's inputs."""
    return [torch.randn(*s, dtype=torch.float64, device=device) for s in shapes]


def _grads(fn, inputs64, dtype, backend_name, weights=None, wrt=None):
    """Gradients of sum(weights * outputs) w.r.t. the inputs ``wrt`` (indices; default all)
    of ``fn(*inputs)`` run on ``backend_name`` in ``dtype``."""
    wrt = range(len(inputs64)) if wrt is None else wrt
    leaves = [t.to(dtype) for t in inputs64]
    for i in wrt:
        leaves[i].requires_grad_()
    with vidstream.use_backend(backend_name):
        outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    if weights is None:
        gen = torch.Generator().manual_seed(7)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    loss = sum((o.double() * w.to(o.device)).where(torch.isfinite(o), 0.0).sum()
               for o, w in zip(outs, weights) if w is not None)
    if not loss.requires_grad:  # nothing reaches the output (an empty union): zero gradients
        return [torch.zeros_like(leaves[i]) for i in wrt], weights
    got = torch.autograd.grad(loss, [leaves[i] for i in wrt], allow_unused=True)
    return [torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(wrt, got)], weights


def _forward_runs(fn, inputs64, dtype, backend_name):
    """The backend's forward runs these arguments (a failure here is the forward's, not the
    backward's)."""
    with torch.no_grad(), vidstream.use_backend(backend_name):
        fn(*(t.to(dtype) for t in inputs64))


def _lse_max(fn, inputs64) -> float:
    """max |lse| (finite) of an attention op's float64 reference forward, ``fn`` returning
    (out, lse)."""
    with torch.no_grad(), vidstream.use_backend("reference"):
        lse = fn(*inputs64)[1]
    lse = lse[torch.isfinite(lse)]
    return float(lse.abs().max()) if lse.numel() else 0.0


def _check_grads(fn, inputs64, dtype, backend_name, names, wrt=None, weights=None, factor=2.0,
                 lse_max=0.0):
    """The flash-attn rule for each gradient. ``lse_max``: for a flash-style attention backward,
    max |lse| of the forward. Such a backward recomputes P_ij = exp(s_ij - lse_i) from the float32
    lse it saved, whose rounding (up to eps_32 |lse_i| / 2) scales a whole row of P alike: in
    float32 that alone moves a gradient by up to ~eps_32 |lse| |g|, above eager's float32 error
    when the softmax is sharp (|lse| of 10 or more; measured up to 3x eager with no other fault).
    It is allowed for, as the kernel's own rounding (2 eps_32 |lse|max |g|max); in 16 bits the
    output dtype's rounding dominates and the term changes nothing."""
    _forward_runs(fn, inputs64, dtype, backend_name)
    oracle, weights = _grads(fn, inputs64, torch.float64, "reference", weights, wrt)
    eager, _ = _grads(fn, inputs64, dtype, "reference", weights, wrt)
    got, _ = _grads(fn, inputs64, dtype, backend_name, weights, wrt)
    eps32 = torch.finfo(torch.float32).eps
    for n, g, o, e in zip(names, got, oracle, eager):
        what = f"{backend_name} {dtype} d{n}"
        fin = torch.isfinite(o)
        if lse_max and backend_name != "torch" and bool(fin.any()):
            lse_term = 2 * eps32 * lse_max * float(o[fin].abs().max())
            if max_err(g[fin], o[fin]) <= factor * max_err(e[fin], o[fin]) + lse_term:
                continue
        assert_close_to_oracle(g, o, e, factor=factor, what=what)


# ----------------------------------------------------------------------------- attention

# (B, frames, frame_tokens, H, H_kv, D, Dv, chunk_frames, sink_frames, window_frames)
CHUNK_CASES = [
    (1, 5, 3, 2, 1, 8, 8, 2, 0, None),      # odd sizes, GQA, a partial last chunk
    (2, 6, 2, 4, 2, 16, 12, 2, 1, 4),       # sink + window, Dv != D
    (1, 4, 5, 3, 3, 8, 8, 1, 0, 2),         # window without sink, 1-frame chunks
    (1, 3, 1, 2, 2, 4, 4, 3, 3, None),      # one chunk, one token a frame
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", GRAD_BACKENDS)
def test_chunk_attention_grads(backend_name, dtype, case):
    B, F, ft, H, Hk, D, Dv, cf, sf, wf = case
    _require_backward(backend_name, "chunk_attention", dtype)
    L = F * ft
    inputs = _draw([(B, L, H, D), (B, L, Hk, D), (B, L, Hk, Dv)])

    def fn(q, k, v, lse=False):
        return vidstream.chunk_attention(q, k, v, frame_tokens=ft, chunk_frames=cf,
                                         sink_frames=sf, window_frames=wf, return_lse=lse)

    _check_grads(fn, inputs, dtype, backend_name, "qkv",
                 lse_max=_lse_max(lambda *a: fn(*a, lse=True), inputs))


# (Lq, P, H, H_kv, D, Dv, ranges, deltas)
CACHED_CASES = [
    (5, 12, 2, 1, 8, 8, [[0, 3], [5, 9]], None),
    (7, 20, 4, 2, 16, 12, [[17, 18], [2, 2], [4, 11]], None),   # one-token and empty ranges
    (3, 9, 3, 3, 8, 8, [[6, 9], [0, 2]], None),                  # ranges out of order
    (4, 10, 2, 1, 8, 8, [[3, 3]], None),                         # an empty union
    (6, 16, 2, 1, 16, 16, [[0, 4], [8, 13]], [1.5, -2.0]),       # positions as metadata
]


@pytest.mark.parametrize("case", range(len(CACHED_CASES)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", GRAD_BACKENDS)
def test_cached_attention_grads(backend_name, dtype, case):
    Lq, P, H, Hk, D, Dv, ranges, deltas = CACHED_CASES[case]
    _require_backward(backend_name, "cached_attention", dtype)
    if deltas is not None and backend_name == "triton" and dtype != torch.float32:
        dtype = torch.float32  # one offsets case per backend is enough under the interpreter
    inputs = _draw([(1, Lq, H, D), (1, P, Hk, D), (1, P, Hk, Dv)])

    def fn(q, kp, vp, lse=False):
        return vidstream.cached_attention(q, kp, vp, ranges, kv_deltas=deltas, return_lse=lse)

    _check_grads(fn, inputs, dtype, backend_name, ["q", "k_pool", "v_pool"],
                 lse_max=_lse_max(lambda *a: fn(*a, lse=True), inputs))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("backend_name", GRAD_BACKENDS)
@pytest.mark.parametrize("op", ["chunk_attention", "cached_attention"])
def test_attention_lse_gradient(op, backend_name, dtype):
    """return_lse=True with a loss on lse as well as out: the lse gradient is folded in."""
    _require_backward(backend_name, op, dtype)
    if op == "chunk_attention":
        inputs = _draw([(1, 12, 2, 8), (1, 12, 1, 8), (1, 12, 1, 8)])

        def fn(q, k, v):
            return vidstream.chunk_attention(q, k, v, frame_tokens=2, chunk_frames=2,
                                             sink_frames=1, window_frames=4, return_lse=True)
    else:
        inputs = _draw([(1, 5, 2, 8), (1, 14, 1, 8), (1, 14, 1, 8)])

        def fn(q, k, v):
            return vidstream.cached_attention(q, k, v, [[0, 3], [6, 6], [9, 14]], return_lse=True)

    lse_max = _lse_max(fn, inputs)
    _check_grads(fn, inputs, dtype, backend_name, "qkv", lse_max=lse_max)
    # lse alone: out has no gradient (its grad is None inside the backward)
    gen = torch.Generator().manual_seed(3)
    _check_grads(fn, inputs, dtype, backend_name, "qkv", lse_max=lse_max,
                 weights=[None, torch.randn(1, 2, inputs[0].shape[1], generator=gen,
                                            dtype=torch.float64)])


def _dense_backward(keep, scale):
    """A stand-in backward kernel in PyTorch with the kernels' contract: P recomputed from the
    saved lse, ``Delta = rowsum(dout * out)`` from the given dout and out; ``keep`` [Lk]."""

    def run(dout, q, k, v, out, lse, *args):
        H, Hk = q.shape[2], k.shape[2]
        G = H // Hk
        qd, kd, vd, od, dod = (t.double() for t in (q, k, v, out, dout))
        kx, vx = kd.repeat_interleave(G, 2), vd.repeat_interleave(G, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", qd, kx) * scale
        p = torch.exp(s - lse.double()[..., None]).where(keep, 0.0).nan_to_num(0.0)
        dv = torch.einsum("bhqk,bqhd->bkhd", p, dod)
        dp = torch.einsum("bqhd,bkhd->bhqk", dod, vx)
        delta = (dod * od).sum(-1).transpose(1, 2)[..., None]
        ds = p * (dp - delta)
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, kx) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, qd) * scale
        fold = lambda t: t.unflatten(2, (Hk, G)).sum(3)  # noqa: E731
        return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)

    return run


def test_lse_fold_is_exact():
    """autograd_utils.attention_grads around a kernel with the backward kernels' contract gives
    the gradient of a loss on out and lse (float64: to rounding)."""
    q, k, v = (t.requires_grad_() for t in _draw([(1, 5, 2, 8), (1, 9, 1, 8), (1, 9, 1, 6)]))
    ranges = TokenRanges.trusted([(0, 3), (5, 9)], "cpu")
    out, lse = attn_ops.cached_attention_eager(q, k, v, ranges, 0.3, True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v), retain_graph=True)
    keep = ranges.membership(9).any(0)
    kernel = _dense_backward(keep, 0.3)
    got = ag.attention_grads(kernel, dout, dlse, q.detach(), k.detach(), v.detach(),
                             out.detach(), lse.detach(), ranges.tensor, 0.3, None, 1e4, None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)  # lse is float32
    got = ag.attention_grads(kernel, None, dlse, q.detach(), k.detach(), v.detach(),
                             out.detach(), lse.detach(), ranges.tensor, 0.3, None, 1e4, None)
    want = torch.autograd.grad((lse * dlse).sum(), (q, k, v), allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for t, w in zip((q, k, v), want)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- rope3d


@pytest.mark.parametrize("grid,H,D,tt", [((3, 2, 5), 2, 16, False), ((2, 3, 3), 3, 10, True),
                                         ((1, 1, 1), 1, 6, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", GRAD_BACKENDS)
def test_rope3d_grads(backend_name, dtype, grid, H, D, tt):
    _require_backward(backend_name, "rope3d", dtype)
    L = grid[0] * grid[1] * grid[2]
    (x,) = _draw([(2, L, H, D)])
    t_theta = torch.tensor([500.0, 10000.0, 2000.0][:H]) if tt else None

    def fn(x):
        return vidstream.rope3d(x, grid=grid, frame_offset=2.5, t_theta=t_theta)

    _check_grads(fn, [x], dtype, backend_name, "x")


# ----------------------------------------------------------------------------- low-rank

# (P, d_c, H, d_nope, d_r, d_v, ranges)
LOWRANK_CASES = [
    (12, 6, 2, 4, 4, 5, [[0, 3], [5, 9]]),
    (15, 16, 3, 8, 0, 8, [[14, 15], [2, 2], [4, 10]]),   # no k_r; one-token and empty ranges
]


@pytest.mark.parametrize("case", range(len(LOWRANK_CASES)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", GRAD_BACKENDS)
def test_lowrank_decompress_grads(backend_name, dtype, case):
    P, dc, H, dn, dr, dv, ranges = LOWRANK_CASES[case]
    _require_backward(backend_name, "lowrank_decompress", dtype)
    shapes = [(1, P, dc), (H, dc, dn), (H, dc, dv)] + ([(1, P, dr)] if dr else [])
    inputs = _draw(shapes)

    def fn(c, wuk, wuv, kr=None):
        return vidstream.lowrank_decompress(c, wuk, wuv, ranges, k_r_pool=kr)

    _check_grads(fn, inputs, dtype, backend_name, ["c_pool", "w_uk", "w_uv", "k_r_pool"])


@pytest.mark.parametrize("strategy", [None, "decompress", "absorb", "tiled"])
@pytest.mark.parametrize("case", range(len(LOWRANK_CASES)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("backend_name", GRAD_BACKENDS)
def test_lowrank_cached_attention_grads(backend_name, dtype, case, strategy):
    P, dc, H, dn, dr, dv, ranges = LOWRANK_CASES[case]
    _require_backward(backend_name, "lowrank_cached_attention", dtype)
    if strategy == "tiled" and backend_name != "cpu":
        pytest.skip("'tiled' is the cpu backend's")
    shapes = [(1, 5, H, dn + dr), (1, P, dc), (H, dc, dn), (H, dc, dv)] + (
        [(1, P, dr)] if dr else [])
    inputs = _draw(shapes)
    deltas = [0.5, -1.0, 2.0][:len(ranges)] if dr and case == 0 else None

    def fn(q, c, wuk, wuv, kr=None, lse=False):
        return vidstream.lowrank_cached_attention(q, c, wuk, wuv, ranges, k_r_pool=kr,
                                                  kv_deltas=deltas, strategy=strategy,
                                                  return_lse=lse)

    # With gradients the kernel backends decompress whatever the strategy (ops/lowrank.py,
    # _grad_ready); the torch backend's "absorb" attends in the latent space in float32/64.
    _check_grads(fn, inputs, dtype, backend_name, ["q", "c_pool", "w_uk", "w_uv", "k_r_pool"],
                 lse_max=_lse_max(lambda *a: fn(*a, lse=True), inputs))


def _fused_lowrank(backend_name, q, c, wuk, wuv, kr, ranges, deltas, absorb):
    """The fused kernel op itself (C++ tiled/absorb, Triton absorb), called as its backend does."""
    from vidstream.ops import lowrank as lr

    r = TokenRanges.trusted(ranges, "cpu")
    d = None if deltas is None else torch.tensor(deltas, dtype=torch.float64)
    scale = q.shape[3] ** -0.5
    if backend_name == "cpu":
        return torch.ops.vidstream.lowrank_cached_attention(q, c, wuk, wuv, r.tensor, kr, scale,
                                                            absorb, d, 1e4)[0]
    return lr._absorbed_triton(q, c, wuk, wuv, r, kr, scale, False, d, 1e4)


@pytest.mark.parametrize("deltas", [None, [1.5, -0.5]])
@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_fused_lowrank_ops_backward(backend_name, absorb, deltas):
    """The fused ops' registered backward (direct calls, torch.compile). Their forward forms the
    scores in another order than the reference's decompress-then-attend (latent space, or per
    tile), and the C++ op's backward recomputes P from decompressed keys: float32 gradient errors
    of 2-8e-6 where eager's vary by draw from 8e-7 to 4e-6, so the per-draw ratio reached 10x
    (Triton absorb, dc_pool). Checked within 16x eager's error plus the floor: a wrong or missing
    term is off by O(1e-1), five orders above."""
    _require_backward(backend_name, "lowrank_cached_attention", torch.float32)
    if backend_name == "triton" and not absorb:
        pytest.skip("the Triton fused op is the absorbed form")
    ranges = [[0, 3], [5, 9]]
    inputs = _draw([(1, 4, 2, 8), (1, 12, 6), (2, 6, 4), (2, 6, 5), (1, 12, 4)])

    def ref(q, c, wuk, wuv, kr):
        return vidstream.lowrank_cached_attention(q, c, wuk, wuv, ranges, k_r_pool=kr,
                                                  kv_deltas=deltas)

    oracle, w = _grads(ref, inputs, torch.float64, "reference")
    eager, _ = _grads(ref, inputs, torch.float32, "reference", w)
    leaves = [t.float().requires_grad_() for t in inputs]
    out = _fused_lowrank(backend_name, *leaves, ranges, deltas, absorb)
    got = torch.autograd.grad((out.double() * w[0]).sum(), leaves)
    for n, g, o, e in zip(["q", "c_pool", "w_uk", "w_uv", "k_r_pool"], got, oracle, eager):
        assert_close_to_oracle(g, o, e, factor=16.0, what=f"{backend_name} fused d{n}")


# ----------------------------------------------------------------------------- not differentiable


def test_select_blocks_is_not_differentiable():
    q = torch.randn(1, 8, 2, 8, requires_grad=True)
    kp = torch.randn(1, 32, 1, 8, requires_grad=True)
    idx = vidstream.select_blocks(q, kp, [[0, 8], [8, 16], [16, 24], [24, 32]], 2)
    assert idx.dtype == torch.int64 and not idx.requires_grad


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_in_place_rope_ops_refuse_gradients_on_kernels(backend_name):
    require(backend_name, "rope3d_shift_", "cpu", torch.float32)
    base = torch.randn(1, 12, 2, 8, requires_grad=True)
    with vidstream.use_backend(backend_name), pytest.raises(
            ValueError, match=rf"rope3d_shift_ has no backward on the '{backend_name}' backend"):
        vidstream.rope3d_shift_(base * 1.0, [[0, 4]], [1.0])
    k = torch.randn(1, 4, 1, 8, requires_grad=True)
    with vidstream.use_backend(backend_name), pytest.raises(ValueError, match="rope3d_store_"):
        vidstream.rope3d_store_(torch.zeros(1, 12, 1, 8), torch.zeros(1, 12, 1, 8), k,
                                torch.randn(1, 4, 1, 8), [2], [3.0], grid=(1, 2, 2))


# ----------------------------------------------------------------------------- gradcheck (float64)

GRADCHECK_BACKENDS = ("reference", "torch")


def _gradcheck(backend_name, fn, *inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run(*xs):
        with vidstream.use_backend(backend_name):
            return fn(*xs)

    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend_name", GRADCHECK_BACKENDS)
def test_gradcheck_float64(backend_name):
    q, k, v = _draw([(1, 6, 2, 4), (1, 6, 1, 4), (1, 6, 1, 3)])
    _gradcheck(backend_name, lambda q, k, v: vidstream.chunk_attention(
        q, k, v, frame_tokens=2, chunk_frames=1, sink_frames=1, window_frames=2), q, k, v)
    q, kp, vp = _draw([(1, 3, 2, 4), (1, 9, 1, 4), (1, 9, 1, 3)])
    _gradcheck(backend_name, lambda q, k, v: vidstream.cached_attention(
        q, k, v, [[7, 9], [0, 1], [4, 4]], kv_deltas=[0.5, -1.0, 0.0]),
        q, kp, vp)
    (x,) = _draw([(1, 8, 2, 6)])
    _gradcheck(backend_name, lambda x: vidstream.rope3d(x, grid=(2, 2, 2), frame_offset=1.5), x)
    c, wuk, wuv, kr = _draw([(1, 7, 3), (2, 3, 2), (2, 3, 2), (1, 7, 4)])
    _gradcheck(backend_name, lambda c, a, b, r: vidstream.lowrank_decompress(
        c, a, b, [[0, 2], [4, 5]], k_r_pool=r), c, wuk, wuv, kr)
    (q,) = _draw([(1, 2, 2, 6)])
    _gradcheck(backend_name, lambda q, c, a, b, r: vidstream.lowrank_cached_attention(
        q, c, a, b, [[0, 2], [4, 5]], k_r_pool=r, kv_deltas=[1.0, -0.5]), q, c, wuk, wuv, kr)


def test_decompress_backward_formula_float64():
    """The backward registered on lowrank_decompress (C++ and Triton: PyTorch ops), called in
    float64 (the kernels take no float64), equals autograd of the definition to rounding."""
    c, wuk, wuv, kr = (t.requires_grad_() for t in _draw([(1, 7, 3), (2, 3, 2), (2, 3, 2),
                                                           (1, 7, 4)]))
    ranges = torch.tensor([[4, 6], [0, 2]], dtype=torch.int32)
    from vidstream.ops import lowrank as lr

    class Ctx:
        needs_input_grad = (True, True, True, False, False, True)

        def save_for_backward(self, *t):
            self.saved_tensors = t

    def fn(c, wuk, wuv, kr):
        return lr.lowrank_decompress_eager(c, wuk, wuv, TokenRanges.trusted([(4, 6), (0, 2)], "cpu"), kr)

    k, v = fn(c, wuk, wuv, kr)
    dk, dv = torch.randn_like(k), torch.randn_like(v)
    want = torch.autograd.grad((k * dk).sum() + (v * dv).sum(), (c, wuk, wuv, kr))
    ctx = Ctx()
    lr._decompress_setup_context(ctx, (c, wuk, wuv, ranges, 4, kr), (k, v))
    got = lr._decompress_backward(ctx, dk, dv)
    for g, w in zip([got[0], got[1], got[2], got[5]], want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- opcheck

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def _req(*ts):
    return [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in ts]


def _cpp_opcheck_cases():
    f = torch.float32
    ranges = torch.tensor([[0, 3], [5, 9]], dtype=torch.int32)
    return {
        "rope3d": (None, lambda: (*_req(torch.randn(1, 8, 2, 8)), 2, 2, 2, 1.5, 1e4, None)),
        "chunk_attention": ("chunk_attention_backward", lambda: (
            *_req(torch.randn(1, 12, 2, 8), torch.randn(1, 12, 1, 8), torch.randn(1, 12, 1, 8)),
            2, 2, 1, 4, 0.3)),
        "cached_attention": ("cached_attention_backward", lambda: (
            *_req(torch.randn(1, 5, 2, 8), torch.randn(1, 12, 1, 8), torch.randn(1, 12, 1, 8)),
            ranges, 0.3, None, 1e4, None)),
        "lowrank_decompress": (None, lambda: (
            *_req(torch.randn(1, 12, 6, dtype=f), torch.randn(2, 6, 4), torch.randn(2, 6, 5)),
            ranges, 7, *_req(torch.randn(1, 12, 4)))),
        "lowrank_cached_attention": ("cached_attention_backward", lambda: (
            *_req(torch.randn(1, 5, 2, 8), torch.randn(1, 12, 6), torch.randn(2, 6, 4),
                  torch.randn(2, 6, 5)), ranges, *_req(torch.randn(1, 12, 4)), 0.3, True,
            None, 1e4)),
    }


@pytest.mark.parametrize("op", list(_cpp_opcheck_cases()))
def test_opcheck_cpp_ops_with_grad(op):
    if not _extension.load():
        pytest.skip("vidstream._C is not built")
    needs, args = _cpp_opcheck_cases()[op]
    if needs is not None and not _extension.has_kernel(needs, "CPU"):
        pytest.skip(f"no CPU kernel of {needs} in this build")
    torch.library.opcheck(getattr(torch.ops.vidstream, op).default, args(),
                          test_utils=OPCHECK_UTILS)


def _triton_opcheck_cases():
    from vidstream.triton_kernels import attention, lowrank, rope3d

    idx = torch.tensor([0, 1, 2, 5, 6, 7, 8], dtype=torch.int32)
    ranges = torch.tensor([[0, 3], [5, 9]], dtype=torch.int32)
    return {
        "rope3d_triton": ("light", lambda: (rope3d.rope3d_triton, (
            *_req(torch.randn(1, 8, 2, 8)), 2, 2, 2, 1.5, 1e4, None))),
        "lowrank_decompress_triton": ("light", lambda: (lowrank.lowrank_decompress_triton, (
            *_req(torch.randn(1, 12, 6), torch.randn(2, 6, 4), torch.randn(2, 6, 5)), idx,
            *_req(torch.randn(1, 12, 4))))),
        "chunk_attention_triton": ("attention", lambda: (attention.chunk_attention_triton, (
            *_req(torch.randn(1, 12, 2, 16), torch.randn(1, 12, 1, 16), torch.randn(1, 12, 1, 16)),
            2, 2, 1, 4, 0.3))),
        "cached_attention_triton": ("attention", lambda: (attention.cached_attention_triton, (
            *_req(torch.randn(1, 5, 2, 16), torch.randn(1, 12, 1, 16), torch.randn(1, 12, 1, 16)),
            ranges, 0.3))),
        "lowrank_latent_attention_triton": ("attention", lambda: (
            lowrank.lowrank_latent_attention_triton, (
                *_req(torch.randn(1, 6, 16)), None, *_req(torch.randn(1, 6, 16),
                                                           torch.randn(1, 12, 16),
                                                           torch.randn(1, 12, 16)),
                idx, 0.3))),
    }


@pytest.mark.parametrize("op", ["rope3d_triton", "lowrank_decompress_triton",
                                "chunk_attention_triton", "cached_attention_triton",
                                "lowrank_latent_attention_triton"])
def test_opcheck_triton_ops_with_grad(op):
    require("triton", "rope3d", "cpu", torch.float32)
    kind, make = _triton_opcheck_cases()[op]
    why = ag.triton_backward(kind)
    if why is not None:
        pytest.skip(why)
    fn, args = make()
    # The Triton interpreter runs on host pointers and cannot be traced (tests/test_registration):
    # no AOT dispatch test on CPU tensors; all four on a GPU.
    utils = OPCHECK_UTILS if torch.cuda.is_available() else OPCHECK_UTILS[:3]
    torch.library.opcheck(fn, args, test_utils=utils)


# ----------------------------------------------------------------------------- torch.compile


def _compile_case(op):
    """(inputs, fn) of one small forward whose output feeds a loss."""
    if op == "rope3d":
        return _draw([(1, 8, 2, 8)]), lambda x: vidstream.rope3d(x, grid=(2, 2, 2), frame_offset=1.0)
    if op == "chunk_attention":
        return _draw([(1, 8, 2, 16), (1, 8, 1, 16), (1, 8, 1, 16)]), lambda q, k, v: \
            vidstream.chunk_attention(q, k, v, frame_tokens=2, chunk_frames=2, sink_frames=1,
                                      window_frames=2)
    r = TokenRanges.trusted([(0, 3), (5, 9)], "cpu")
    if op == "cached_attention":
        return _draw([(1, 4, 2, 16), (1, 12, 1, 16), (1, 12, 1, 16)]), lambda q, k, v: \
            vidstream.cached_attention(q, k, v, r)
    if op == "lowrank_decompress":
        return _draw([(1, 12, 6), (2, 6, 4), (2, 6, 5), (1, 12, 4)]), lambda c, a, b, kr: \
            torch.cat([t.flatten() for t in vidstream.lowrank_decompress(c, a, b, r, k_r_pool=kr)])
    return _draw([(1, 4, 2, 8), (1, 12, 6), (2, 6, 4), (2, 6, 5), (1, 12, 4)]), \
        lambda q, c, a, b, kr: vidstream.lowrank_cached_attention(q, c, a, b, r, k_r_pool=kr,
                                                                  strategy="absorb")


@pytest.mark.parametrize("op", ["rope3d", "chunk_attention", "cached_attention",
                                "lowrank_decompress", "lowrank_cached_attention"])
def test_compile_fullgraph_forward_backward(op):
    """Forward + backward through the op's default CPU kernel (float32, inputs requiring grad),
    compiled fullgraph, equals eager."""
    _require_backward("cpu", op, torch.float32)
    inputs64, fn = _compile_case(op)

    def loss(*xs):
        out = fn(*xs)
        return (out * out).sum()

    def grads(f):
        leaves = [t.float().requires_grad_() for t in inputs64]
        with vidstream.use_backend("cpu"):
            f(*leaves).backward()
        return [t.grad for t in leaves]

    torch._dynamo.reset()
    # aot_eager: AOTAutograd traces forward and backward through the ops' fakes and registered
    # autograd (what fullgraph needs of them); inductor's codegen adds nothing about the ops and
    # minutes on this machine.
    got = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    want = grads(loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
