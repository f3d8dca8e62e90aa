"""The ops are registered the way torch expects: opcheck passes, and torch.compile(fullgraph=True)
traces through them without a graph break."""

import pytest
import torch
from numerics import require

import vidstream

needs_ext = pytest.mark.skipif(not vidstream._extension.load(), reason="vidstream._C not built")


def _rope_args(device="cpu", dtype=torch.float32):
    x = torch.randn(2, 2 * 3 * 5, 3, 64, device=device, dtype=dtype)
    return (x, 2, 3, 5, 4.0, 10000.0, torch.rand(3, dtype=torch.float64) * 1000 + 9000)


def _shift_args(device="cpu", dtype=torch.float32):
    pool = torch.randn(2, 40, 3, 64, device=device, dtype=dtype)
    ranges = torch.tensor([[30, 40], [0, 5], [7, 7]], dtype=torch.int32)
    return (pool, ranges, torch.tensor([-3.0, 1000.0, 2.0], dtype=torch.float64), 10000.0, None)


@needs_ext
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck_cpp_ops(device):
    if device == "cuda":
        require("cuda", "rope3d", device, torch.float32)
    torch.library.opcheck(torch.ops.vidstream.rope3d.default, _rope_args(device))
    pool, ranges, *rest = _shift_args(device)  # the C++ ops take ranges on the pool's device
    torch.library.opcheck(torch.ops.vidstream.rope3d_shift_.default,
                          (pool, ranges.to(device), *rest))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck_triton_ops(device):
    require("triton", "rope3d", device, torch.float32)
    from vidstream.triton_kernels import rope3d as kernels

    # The Triton interpreter runs on host pointers and cannot be traced: only the schema and
    # fake-tensor checks there; everything on a GPU.
    utils = ("test_schema", "test_faketensor") if device == "cpu" else None
    kw = {} if utils is None else {"test_utils": utils}
    x, F, h, w, off, theta, tt = _rope_args(device)
    torch.library.opcheck(kernels.rope3d_triton, (x, F, h, w, off, theta, tt), **kw)
    pool, ranges, delta, theta, tt = _shift_args(device)
    torch.library.opcheck(kernels.rope3d_shift_triton_,
                          (pool, ranges.to(device), delta, theta, tt, 10), **kw)


@needs_ext
def test_torch_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    x = torch.randn(1, 30, 2, 64)
    tt = torch.rand(2, dtype=torch.float64) * 1000 + 9000

    def step(x, pool):
        k = vidstream.rope3d(x, grid=(2, 3, 5), frame_offset=3, t_theta=tt)
        vidstream.rope3d_shift_(pool, torch.tensor([[0, 30]], dtype=torch.int32),
                                torch.tensor([-1.0], dtype=torch.float64), t_theta=tt)
        return k * 2 + pool

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    pool_a, pool_b = torch.randn(1, 30, 2, 64), None
    pool_b = pool_a.clone()
    got = compiled(x, pool_a)
    want = step(x, pool_b)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(pool_a, pool_b)
