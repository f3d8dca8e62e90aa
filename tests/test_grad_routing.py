"""An op whose inputs require grad runs on its default kernel where that kernel has a backward
here (issue #14: ``Op.has_backward``, per op and backend), else on a backend autograd
differentiates (``torch``, else ``reference``), so a gradient is never silently missing; a kernel
backend without a backward, forced for such inputs, refuses with an error naming op and backend."""

from __future__ import annotations

import pytest
import torch

import vidstream
from vidstream import backend

RANGES = [[0, 3], [5, 9]]


def _leaves(*shapes, dtype):
    return [torch.randn(*s, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _rope3d(dtype):
    (x,) = _leaves((1, 8, 2, 8), dtype=dtype)
    return [x], lambda: vidstream.rope3d(x, grid=(2, 2, 2), frame_offset=1.5)


def _chunk(dtype):
    q, k, v = _leaves((1, 12, 2, 8), (1, 12, 1, 8), (1, 12, 1, 6), dtype=dtype)
    return [q, k, v], lambda: vidstream.chunk_attention(q, k, v, frame_tokens=2, chunk_frames=2,
                                                        sink_frames=1, window_frames=4)


def _cached(dtype):
    q, kp, vp = _leaves((1, 5, 2, 8), (1, 12, 1, 8), (1, 12, 1, 6), dtype=dtype)
    return [q, kp, vp], lambda: vidstream.cached_attention(q, kp, vp, RANGES)


def _decompress(dtype):
    c, wuk, wuv, kr = _leaves((1, 12, 6), (2, 6, 4), (2, 6, 5), (1, 12, 4), dtype=dtype)
    return [c, wuk, wuv, kr], lambda: torch.cat(
        [t.flatten() for t in vidstream.lowrank_decompress(c, wuk, wuv, RANGES, k_r_pool=kr)])


def _lowrank_attention(dtype):
    q, c, wuk, wuv, kr = _leaves((1, 5, 2, 8), (1, 12, 6), (2, 6, 4), (2, 6, 5), (1, 12, 4),
                                 dtype=dtype)
    return [q, c, wuk, wuv, kr], lambda: vidstream.lowrank_cached_attention(
        q, c, wuk, wuv, RANGES, k_r_pool=kr)


def _shift(dtype):
    (base,) = _leaves((1, 12, 2, 8), dtype=dtype)

    def run():
        pool = base * 1.0  # a non-leaf: autograd records the in-place rotation on it
        return vidstream.rope3d_shift_(pool, RANGES, [1.0, -2.5])
    return [base], run


def _store(dtype):
    k, v = _leaves((1, 4, 1, 8), (1, 4, 1, 6), dtype=dtype)

    def run():
        kp = torch.zeros(1, 12, 1, 8, dtype=dtype)
        vp = torch.zeros(1, 12, 1, 6, dtype=dtype)
        vidstream.rope3d_store_(kp, vp, k, v, [2], [3.0], grid=(1, 2, 2))
        return torch.cat([kp.flatten(), vp.flatten()])
    return [k, v], run


CASES = {"rope3d": _rope3d, "chunk_attention": _chunk, "cached_attention": _cached,
         "lowrank_decompress": _decompress, "lowrank_cached_attention": _lowrank_attention,
         "rope3d_shift_": _shift, "rope3d_store_": _store}


def _grads(make, dtype, backend_name=None):
    torch.manual_seed(0)
    leaves, run = make(dtype)
    ctx = vidstream.use_backend(backend_name) if backend_name else _nullcontext()
    with ctx:
        out = run()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64).to(out.dtype)
    (out * weights).sum().backward()
    return [t.grad for t in leaves]


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("op", list(CASES))
def test_default_gives_the_gradient(op):
    """float32 CPU inputs that require grad: the default (the C++ kernel without grad) gives way
    to a differentiable backend, whose gradients match float64 autograd of the reference."""
    got = _grads(CASES[op], torch.float32)
    want = _grads(CASES[op], torch.float64, "reference")
    assert all(g is not None for g in got), op
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", list(CASES))
def test_without_grad_the_kernel_still_runs(op):
    x = torch.randn(1, 4, 2, 8)
    o = backend.op(op)
    assert o.resolve_name(x, grad=False) == "cpu"
    chosen = o.resolve_name(x, grad=True)
    assert o.has_backward(chosen)
    # the kernel itself where it has a backward here, PyTorch's own ops otherwise
    assert chosen == ("cpu" if o.has_backward("cpu") else "torch")
    with torch.no_grad():
        assert not backend.needs_grad(x.requires_grad_())


def test_kernels_with_a_backward_stay_the_default():
    """rope3d's backward is the C++ op itself (the inverse rotation), lowrank_decompress's is
    PyTorch ops: both always have one on cpu."""
    x = torch.randn(1, 4, 2, 8)
    for op in ("rope3d", "lowrank_decompress"):
        assert backend.op(op).has_backward("cpu")
        assert backend.op(op).resolve_name(x, grad=True) == "cpu"
    for op in ("rope3d_shift_", "rope3d_store_"):  # in place: no backward on any kernel
        assert not backend.op(op).has_backward("cpu")
        assert backend.op(op).resolve_name(x, grad=True) == "torch"


@pytest.mark.parametrize("op", ["rope3d_shift_", "rope3d_store_"])
def test_forced_kernel_backend_without_backward_refuses(op):
    leaves, run = CASES[op](torch.float32)
    with vidstream.use_backend("cpu"), pytest.raises(
            ValueError, match=rf"vidstream\.{op} has no backward on the 'cpu' backend"):
        run()
    with vidstream.use_backend("cpu"), torch.no_grad():
        run()  # inference is fine


def test_forced_kernel_backend_with_backward_gives_the_gradient():
    got = _grads(_rope3d, torch.float32, "cpu")
    want = _grads(_rope3d, torch.float64, "reference")
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)


def test_missing_backward_kernel_is_named():
    """Where the build lacks an attention backward kernel, the forced backend says which."""
    o = backend.op("chunk_attention")
    if o.has_backward("cpu"):
        pytest.skip("this build has the CPU attention backward")
    q, k, v = _leaves((1, 4, 2, 8), (1, 4, 1, 8), (1, 4, 1, 8), dtype=torch.float32)
    with vidstream.use_backend("cpu"), pytest.raises(ValueError, match="chunk_attention_backward"):
        vidstream.chunk_attention(q, k, v, frame_tokens=2, chunk_frames=1)
