"""3D RoPE and its in-place re-rotation on every backend, against the float64 reference."""

import pytest
import torch
from numerics import DTYPES, assert_close_to_oracle, backend_device_pairs, require, run

import vidstream
from vidstream import reference
from vidstream.ops.rope_math import rope_bands

# (head dim, heads, grid): token counts that are no multiple of any tile, one token, one head.
SHAPES = [
    (64, 1, (1, 1, 1)),
    (96, 3, (2, 3, 5)),
    (128, 12, (3, 5, 7)),
    (64, 5, (4, 1, 13)),
]


def _t_theta(heads, device):
    return 10000.0 * (1 + 0.1 * torch.randn(heads, device=device, dtype=torch.float64)).abs()


def _fresh_allocations(like: torch.Tensor):
    """Leaves NaN in memory the allocator will hand out next, so an output element a kernel
    never writes shows up as NaN (the CUDA caching allocator reuses the freed block)."""
    junk = torch.full_like(like, float("nan"))
    del junk


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,heads,grid", SHAPES, ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["theta", "t_theta"])
def test_rope3d(backend, device, dtype, head_dim, heads, grid, per_head):
    require(backend, "rope3d", device, dtype)
    L = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, L, heads, head_dim, device=device).to(dtype)
    kw = dict(grid=grid, frame_offset=float(torch.randint(0, 2000, ()).item()) + 0.5,
              t_theta=_t_theta(heads, device) if per_head else None)
    oracle = reference.rope3d(x.double(), **kw)
    eager = reference.rope3d(x, **kw)
    _fresh_allocations(x)
    out = run(backend, vidstream.rope3d, x, **kw)
    assert_close_to_oracle(out, oracle, eager, what=f"rope3d {backend}")


def _random_ranges(P: int, n: int, gen=None):
    """n disjoint ranges inside [0, P) in random order, one of them empty and one a single token
    when n allows."""
    cuts = torch.sort(torch.randperm(P + 1, generator=gen)[: 2 * n]).values.tolist()
    rng = [[cuts[2 * i], cuts[2 * i + 1]] for i in range(n)]
    if n >= 2:
        rng[0][1] = rng[0][0]  # empty
        rng[1][1] = rng[1][0] + 1  # one token
    order = torch.randperm(n, generator=gen).tolist()
    return [rng[i] for i in order]


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,heads,P,n_ranges", [
    (64, 1, 1, 1), (96, 3, 37, 3), (128, 12, 130, 5), (64, 7, 300, 8)], ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["theta", "t_theta"])
def test_rope3d_shift_(backend, device, dtype, head_dim, heads, P, n_ranges, per_head):
    require(backend, "rope3d_shift_", device, dtype)
    pool = torch.randn(2, P, heads, head_dim, device=device).to(dtype)
    ranges = _random_ranges(P, n_ranges) if P > 1 else [[0, 1]]
    # Negative, fractional and large deltas.
    delta = (torch.randn(len(ranges), dtype=torch.float64) * 3000).round() / 4
    tt = _t_theta(heads, device) if per_head else None
    oracle = reference.rope3d_shift_(pool.double(), ranges, delta, t_theta=tt)
    eager = reference.rope3d_shift_(pool.clone(), ranges, delta, t_theta=tt)
    out = pool.clone()
    returned = run(backend, vidstream.rope3d_shift_, out, torch.tensor(ranges, dtype=torch.int32),
                   delta, t_theta=tt)
    assert returned is out
    assert_close_to_oracle(out, oracle, eager, what=f"rope3d_shift_ {backend}")
    # Only the temporal band of tokens inside the ranges may change, to the bit.
    c_t = rope_bands(head_dim)[0]
    inside = torch.zeros(P, dtype=torch.bool)
    for s, e in ranges:
        inside[s:e] = True
    assert torch.equal(out[..., 2 * c_t:], pool[..., 2 * c_t:])
    assert torch.equal(out[:, ~inside.to(device)], pool[:, ~inside.to(device)])


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_shift_composes_with_rope3d(backend, device, dtype):
    """rope3d_shift_(rope3d(x, a), d) == rope3d(x, a + d): moving cached keys in time."""
    require(backend, "rope3d_shift_", device, dtype)
    grid, a = (5, 3, 4), 1017.0
    x = torch.randn(1, 60, 4, 128, device=device).to(dtype)
    tt = _t_theta(4, device)
    # Three ranges, each with its own delta: frames 0-1, 2, 3-4.
    ranges = torch.tensor([[36, 60], [0, 24], [24, 36]], dtype=torch.int32)
    delta = torch.tensor([-1000.0, 250.0, 7.0], dtype=torch.float64)
    k = run(backend, vidstream.rope3d, x, grid=grid, frame_offset=a, t_theta=tt)
    run(backend, vidstream.rope3d_shift_, k, ranges, delta, t_theta=tt)
    want = torch.empty(1, 60, 4, 128, dtype=torch.float64, device=device)
    for (s, e), d in zip(ranges.tolist(), delta.tolist()):
        f0, f1 = s // 12, e // 12
        sub = reference.rope3d(x[:, s:e].double(), grid=(f1 - f0, 3, 4), frame_offset=a + d + f0,
                               t_theta=tt)
        want[:, s:e] = sub
    eager = reference.rope3d(x, grid=grid, frame_offset=a, t_theta=tt)
    reference.rope3d_shift_(eager, ranges, delta, t_theta=tt)
    # Two roundings (rope3d, then the shift) against eager's two.
    assert_close_to_oracle(k, want, eager, what=f"shift∘rope3d {backend}")


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_shift_strided_pool(backend, device):
    """A pool that is a view (a head slice of a larger buffer) is rotated in place."""
    require(backend, "rope3d_shift_", device, torch.float32)
    big = torch.randn(2, 50, 6, 64, device=device)
    pool = big[:, :, 2:5]
    before = big.clone()
    ranges, delta = [[3, 20], [30, 49]], [5.0, -12.0]
    want = reference.rope3d_shift_(pool.double().contiguous(), ranges, delta)
    run(backend, vidstream.rope3d_shift_, pool, ranges, delta)
    torch.testing.assert_close(pool.double(), want, rtol=0, atol=1e-5)
    assert torch.equal(big[:, :, :2], before[:, :, :2]) and torch.equal(big[:, :, 5:], before[:, :, 5:])


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_empty_inputs(backend, device):
    require(backend, "rope3d", device, torch.float32)
    x = torch.randn(1, 0, 2, 64, device=device)
    assert run(backend, vidstream.rope3d, x, grid=(0, 3, 5)).shape == x.shape
    pool = torch.randn(1, 10, 2, 64, device=device)
    before = pool.clone()
    run(backend, vidstream.rope3d_shift_, pool, torch.zeros(0, 2, dtype=torch.int32), [])
    run(backend, vidstream.rope3d_shift_, pool, [[4, 4]], [3.0])
    assert torch.equal(pool, before)


BAD_ROPE = [
    (dict(x=torch.randn(2, 6, 64)), "x must be 4-D"),
    (dict(x=torch.randn(1, 6, 2, 63)), "head dim D must be even"),
    (dict(x=torch.randn(1, 6, 2, 64), grid=(1, 2, 2)), "F\\*h\\*w == L = 6"),
    (dict(x=torch.randn(1, 6, 2, 64), grid=(6, 1)), "grid must be a tuple of three ints"),
    (dict(x=torch.randn(1, 6, 2, 64), t_theta=torch.ones(3)),
     "t_theta must be a float tensor of shape \\[H\\] = \\[2\\]"),
    (dict(x=torch.randint(0, 5, (1, 6, 2, 64))), "x must be float32"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,match", BAD_ROPE)
def test_rope3d_bad_inputs(backend, kwargs, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x")
    kwargs.setdefault("grid", (3, 1, 2))
    with pytest.raises(ValueError, match=match):
        run(backend, vidstream.rope3d, x, **kwargs)


BAD_SHIFT = [
    ([[0, 5], [4, 8]], [1, 1], "must not overlap: \\[0, 5\\) and \\[4, 8\\)"),
    ([[0, 11]], [1], "0 <= start <= end <= 10"),
    ([[-1, 3]], [1], "ranges\\[0\\] = \\[-1, 3\\)"),
    ([[6, 3]], [1], "0 <= start <= end"),
    ([[0, 3]], [1, 2], "one entry per range"),
    (torch.tensor([[0.0, 3.0]]), [1], "int32 tensor"),
    (torch.tensor([0, 3], dtype=torch.int32), [1], "shape \\[R, 2\\]"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("ranges,delta,match", BAD_SHIFT)
def test_rope3d_shift_bad_inputs(backend, ranges, delta, match):
    pool = torch.randn(1, 10, 2, 64)
    before = pool.clone()
    with pytest.raises(ValueError, match=match):
        run(backend, vidstream.rope3d_shift_, pool, ranges, delta)
    assert torch.equal(pool, before)


def test_cpp_op_checks_its_own_inputs():
    """Called directly, the C++ op refuses what would take it outside its tensors."""
    pytest.importorskip("vidstream._C")
    pool = torch.randn(1, 10, 2, 64)
    # Overlap is no memory-safety matter: only the public op refuses it.
    with pytest.raises(ValueError, match="must not overlap"):
        vidstream.rope3d_shift_(pool, [[0, 5], [3, 6]], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="0 <= start <= end <= 10"):
        torch.ops.vidstream.rope3d_shift_(pool, torch.tensor([[0, 12]], dtype=torch.int32),
                                          torch.ones(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="delta_frames must have shape"):
        torch.ops.vidstream.rope3d_shift_(pool, torch.tensor([[0, 2]], dtype=torch.int32),
                                          torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="F\\*h\\*w == L"):
        torch.ops.vidstream.rope3d(torch.randn(1, 6, 2, 64), 1, 2, 2)


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch, tmp_path):
    """bfloat16 and per-head theta, which the interpreter cannot run, compiled for sm_80/sm_90."""
    from triton_aot import assert_compiles

    ptrs = {n: "*bf16" for n in ("x_ptr", "o_ptr", "pool_ptr")}
    tables = {n: "*fp32" for n in ("tab_t", "tab_h", "tab_w", "tab_ptr")}
    specs = []
    for t_heads in (1, 12):
        specs.append(("_rope3d_kernel", {**ptrs, **tables},
                      dict(C_T=22, C_H=21, C_W=21, T_HEADS=t_heads, BLOCK_T=16, BLOCK_C=64)))
        specs.append(("_rope3d_shift_kernel", {**ptrs, **tables, "ranges_ptr": "*i32"},
                      dict(C_T=22, T_HEADS=t_heads, BLOCK_T=16, BLOCK_C=32)))
    assert_compiles("vidstream.triton_kernels.rope3d", arch, specs, tmp_path)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,match", [
    (dict(theta=0.0), "theta must be a finite number > 0"),
    (dict(theta=float("nan")), "theta must be a finite number > 0"),
    (dict(frame_offset=float("inf")), "frame_offset must be a finite number"),
    (dict(t_theta=torch.tensor([1e4, -1.0], dtype=torch.float64)), "t_theta must be finite and > 0"),
])
def test_rope_parameters_that_would_give_nan_are_refused(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(backend, vidstream.rope3d, torch.randn(1, 6, 2, 64), grid=(3, 1, 2), **kwargs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("ranges,match", [
    # An empty range sorted between two overlapping ones must not hide the overlap.
    ([[0, 10], [5, 5], [6, 8]], "must not overlap: \\[0, 10\\) and \\[6, 8\\)"),
    # Checked before any cast to int32, where 2**32 + 3 would wrap to 3.
    (torch.tensor([[2**32, 2**32 + 3]], dtype=torch.int64), "0 <= start <= end <= 10"),
    ([[0.5, 2.7]], "entries must be ints"),
])
def test_rope3d_shift_range_edge_cases(backend, ranges, match):
    pool = torch.randn(1, 10, 2, 64)
    before = pool.clone()
    with pytest.raises(ValueError, match=match):
        run(backend, vidstream.rope3d_shift_, pool, ranges, [1.0] * len(ranges))
    assert torch.equal(pool, before)


def test_cpp_op_refuses_hidden_overlap_and_aliased_pools():
    pytest.importorskip("vidstream._C")
    pool = torch.randn(1, 10, 2, 64)
    # The public op refuses the overlap; the C++ op refuses the aliased pool (a race).
    with pytest.raises(ValueError, match="must not overlap"):
        vidstream.rope3d_shift_(pool, [[0, 10], [5, 5], [6, 8]], [1.0] * 3)
    expanded = torch.randn(1, 1, 2, 64).expand(1, 10, 2, 64)
    with pytest.raises(RuntimeError, match="refers to a single memory location"):
        torch.ops.vidstream.rope3d_shift_(expanded, torch.tensor([[0, 4]], dtype=torch.int32),
                                          torch.ones(1, dtype=torch.float64))
