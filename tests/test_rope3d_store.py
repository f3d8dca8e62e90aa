"""rope3d_store_ (docs/spec.md §6 cache write): every backend against the float64 reference, poisoned
pools, untouched tokens, opcheck, bad inputs."""

import pytest
import torch

import vidstream
from tests.numerics import assert_close_to_oracle, backend_device_pairs, poison_, require, run
from vidstream import reference

# (B, F, h, w, H_kv, D, Dv, pool tokens)
SHAPES = [
    (1, 1, 1, 1, 1, 2, 2, 4),        # one token
    (2, 3, 2, 3, 2, 16, 16, 40),
    (1, 2, 3, 5, 3, 24, 8, 64),      # odd grid, Dv != D
    (2, 4, 4, 4, 4, 128, 128, 96),   # Wan's head dim
    (1, 0, 2, 2, 2, 8, 8, 8),        # empty chunk
]


def _slots(F, hw, P, gen):
    """F non-overlapping frame slots in random order inside [0, P)."""
    free = P // hw
    picks = torch.randperm(free, generator=gen)[:F]
    return (picks * hw).to(torch.int32)


def _case(shape, dtype, device, t_theta=False):
    B, F, h, w, H, D, Dv, P = shape
    gen = torch.Generator().manual_seed(B * 1000 + F * 100 + D)
    k = torch.randn(B, F * h * w, H, D, generator=gen).to(device, dtype)
    v = torch.randn(B, F * h * w, H, Dv, generator=gen).to(device, dtype)
    slots = _slots(F, h * w, P, gen)
    pos = torch.rand(F, generator=gen, dtype=torch.float64) * 900 - 50  # any real position
    tt = (10000.0 * (1 + 0.1 * torch.randn(H, generator=gen))).to(device) if t_theta else None
    return k, v, slots, pos, tt


def _oracle(shape, k, v, slots, pos, tt):
    B, F, h, w, H, D, Dv, P = shape
    kp = torch.zeros(B, P, H, D, dtype=torch.float64)
    vp = torch.zeros(B, P, H, Dv, dtype=torch.float64)
    reference.rope3d_store_(kp, vp, k.double().cpu(), v.double().cpu(), slots, pos, grid=(F, h, w),
                            t_theta=None if tt is None else tt.cpu())
    return kp, vp


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_store_matches_reference(backend, device, dtype, shape):
    require(backend, "rope3d_store_", device, dtype)
    B, F, h, w, H, D, Dv, P = shape
    for t_theta in (False, True):
        k, v, slots, pos, tt = _case(shape, dtype, device, t_theta)
        kp = poison_(torch.empty(B, P, H, D, dtype=dtype, device=device))
        vp = poison_(torch.empty(B, P, H, Dv, dtype=dtype, device=device))
        run(backend, vidstream.rope3d_store_, kp, vp, k, v, slots, pos, grid=(F, h, w), t_theta=tt)
        ok, ov = _oracle(shape, k, v, slots, pos, tt)
        ek, ev = (torch.zeros_like(kp), torch.zeros_like(vp))
        reference.rope3d_store_(ek, ev, k, v, slots, pos, grid=(F, h, w), t_theta=tt)
        written = torch.zeros(P, dtype=torch.bool)
        for s in slots.tolist():
            written[s:s + h * w] = True
        # Written tokens: close to the float64 oracle; the rest: still poisoned (never touched).
        assert_close_to_oracle(kp[:, written].cpu(), ok[:, written], ek[:, written].cpu(), what="k")
        assert torch.equal(vp[:, written].cpu(), v.cpu()[:, _frame_order(slots, h * w)]), "v copied"
        assert torch.isnan(kp[:, ~written]).all() and torch.isnan(vp[:, ~written]).all()


def _frame_order(slots, hw):
    """Source token index of every written pool token, in pool order."""
    idx = []
    for f in torch.argsort(slots.long()).tolist():
        idx += list(range(f * hw, (f + 1) * hw))
    return torch.tensor(idx, dtype=torch.long)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_store_equals_rope3d_at_integer_positions(backend, device):
    require(backend, "rope3d_store_", device, torch.float32)
    B, F, h, w, H, D = 2, 3, 2, 4, 2, 32
    k = torch.randn(B, F * h * w, H, D, device=device)
    v = torch.randn(B, F * h * w, H, D, device=device)
    kp = torch.zeros(B, F * h * w, H, D, device=device)
    vp = torch.zeros_like(kp)
    run(backend, vidstream.rope3d_store_, kp, vp, k, v, [0, h * w, 2 * h * w], [7.0, 8.0, 9.0],
        grid=(F, h, w))
    expect = reference.rope3d(k, grid=(F, h, w), frame_offset=7)
    torch.testing.assert_close(kp, expect, atol=2e-6, rtol=2e-6)
    assert torch.equal(vp, v)


def test_store_views_of_a_layered_pool():
    """The cache writes into pool[layer]: a view with a non-zero offset."""
    pool_k = poison_(torch.empty(3, 1, 20, 2, 8))
    pool_v = poison_(torch.empty(3, 1, 20, 2, 8))
    k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    vidstream.rope3d_store_(pool_k[1], pool_v[1], k, v, [8, 10], [3.0, 4.0], grid=(2, 1, 2))
    expect = reference.rope3d(k, grid=(2, 1, 2), frame_offset=3)
    torch.testing.assert_close(pool_k[1, :, 8:12], expect)
    assert torch.isnan(pool_k[0]).all() and torch.isnan(pool_k[2]).all()
    assert torch.isnan(pool_k[1, :, :8]).all() and torch.isnan(pool_k[1, :, 12:]).all()


@pytest.mark.skipif(not vidstream._extension.has_kernel("rope3d_store_", "CPU"), reason="no _C")
def test_opcheck_cpu():
    kp, vp = torch.zeros(2, 30, 2, 16), torch.zeros(2, 30, 2, 8)
    k, v = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 8)
    slots = torch.tensor([18, 0], dtype=torch.int32)
    pos = torch.tensor([3.0, 4.5], dtype=torch.float64)
    torch.library.opcheck(torch.ops.vidstream.rope3d_store_.default,
                          (kp, vp, k, v, slots, pos, 2, 3, 10000.0, None))
    torch.library.opcheck(torch.ops.vidstream.rope3d_store_.default,
                          (kp, vp, k, v, slots, pos, 2, 3, 500.0, torch.full((2,), 9000.0)))


def test_triton_op_schema_and_fake():
    pytest.importorskip("triton")
    from vidstream.triton_kernels import rope3d_store

    kp, vp = torch.zeros(1, 8, 1, 4), torch.zeros(1, 8, 1, 4)
    k, v = torch.randn(1, 4, 1, 4), torch.randn(1, 4, 1, 4)
    args = (kp, vp, k, v, torch.tensor([4], dtype=torch.int32), torch.tensor([1.0], dtype=torch.float64),
            2, 2, 10000.0, None)
    torch.library.opcheck(rope3d_store.rope3d_store_triton_, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_inputs(backend):
    if backend == "cpu" and not vidstream._extension.has_kernel("rope3d_store_", "CPU"):
        pytest.skip("no _C")
    kp, vp = torch.zeros(1, 16, 2, 8), torch.zeros(1, 16, 2, 8)
    k, v = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    grid = (2, 2, 2)

    def call(**kw):
        a = dict(k_pool=kp, v_pool=vp, k=k, v=v, frame_slots=[0, 4], frame_pos=[0.0, 1.0], grid=grid)
        a.update(kw)
        with vidstream.use_backend(backend):
            vidstream.rope3d_store_(a.pop("k_pool"), a.pop("v_pool"), a.pop("k"), a.pop("v"),
                                    a.pop("frame_slots"), a.pop("frame_pos"), **a)

    call()
    with pytest.raises(ValueError, match="frame_slots must not overlap"):
        call(frame_slots=[0, 2])
    with pytest.raises(ValueError, match=r"frame_slots\[1\]"):
        call(frame_slots=[0, 14])
    with pytest.raises(ValueError, match="frame_pos"):
        call(frame_pos=[0.0])
    with pytest.raises(ValueError, match="frame_slots must be an int tensor"):
        call(frame_slots=[0, 4, 8])
    with pytest.raises(ValueError, match="grid"):
        call(grid=(3, 2, 2))
    with pytest.raises(ValueError, match="dtype"):
        call(v=v.half())
    with pytest.raises(ValueError, match="heads and head dim of k_pool"):
        call(k=torch.randn(1, 8, 1, 8))
    with pytest.raises(ValueError, match="v must have shape"):
        call(v=torch.randn(1, 8, 2, 4))
    with pytest.raises(ValueError, match="t_theta"):
        call(t_theta=torch.ones(3))


@pytest.mark.skipif(not vidstream._extension.has_kernel("rope3d_store_", "CPU"), reason="no _C")
def test_cpp_checks_name_the_argument():
    kp, vp = torch.zeros(1, 16, 2, 8), torch.zeros(1, 16, 2, 8)
    k, v = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    op = torch.ops.vidstream.rope3d_store_
    pos = torch.zeros(2, dtype=torch.float64)
    # Overlapping slots write inside the pool only: the public op refuses them.
    with pytest.raises(ValueError, match="frame_slots must not overlap"):
        vidstream.rope3d_store_(kp, vp, k, v, [0, 1], [0.0, 0.0], grid=(2, 2, 2))
    with pytest.raises(RuntimeError, match="frame_slots"):
        op(kp, vp, k, v, torch.tensor([0, 13], dtype=torch.int32), pos, 2, 2)
    with pytest.raises(RuntimeError, match="frame_pos"):
        op(kp, vp, k, v, torch.tensor([0, 4], dtype=torch.int32), pos[:1], 2, 2)
    with pytest.raises(RuntimeError, match="v_pool"):
        op(kp, torch.zeros(1, 15, 2, 8), k, v, torch.tensor([0, 4], dtype=torch.int32), pos, 2, 2)
