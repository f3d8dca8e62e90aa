"""Mid-block compressors: token counts, pooling, RoPE at cell centres, the learnable stack."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import devices

import vidstream
from vidstream import reference
from vidstream.streaming import compressors as C


def _cells_mean(x, grid, factors):
    """Independent pooling: for each output token, the mean of the tokens whose (frame, row,
    column) fall in its cell, found by index arithmetic on the flat token order."""
    F, h, w = grid
    ft, fh, fw = factors
    Fp, hp, wp = F // ft, h // fh, w // fw
    i = torch.arange(F * h * w)
    t, y, c = i // (h * w), (i % (h * w)) // w, i % w
    out = []
    for tp in range(Fp):
        for yp in range(hp):
            for cp in range(wp):
                sel = (t // ft == tp) & (y // fh == yp) & (c // fw == cp)
                out.append(x[:, sel].mean(1))
    return torch.stack(out, dim=1)


def _rotate_at(x, t, y, c, theta=10000.0, t_theta=None):
    """Independent float64 rotation of x [B, N, H, D] at positions (t, y, c) [N] (docs/spec.md §3)."""
    D = x.shape[3]
    half = D // 2
    c_t, c_h = half - 2 * (half // 3), half // 3
    out = x.clone()
    for n in range(x.shape[1]):
        for hh in range(x.shape[2]):
            th_t = theta if t_theta is None else float(t_theta[hh])
            for p in range(half):
                if p < c_t:
                    ang = float(t[n]) * th_t ** (-2 * p / (2 * c_t))
                elif p < c_t + c_h:
                    ang = float(y[n]) * theta ** (-2 * (p - c_t) / (2 * c_h))
                else:
                    ang = float(c[n]) * theta ** (-2 * (p - c_t - c_h) / (2 * c_h))
                a, b = x[:, n, hh, 2 * p], x[:, n, hh, 2 * p + 1]
                out[:, n, hh, 2 * p] = a * math.cos(ang) - b * math.sin(ang)
                out[:, n, hh, 2 * p + 1] = a * math.sin(ang) + b * math.cos(ang)
    return out


@pytest.mark.parametrize("grid,want", [
    ((4, 30, 52), (2, 7, 13)),  # Wan2.1 832x480, PackForcing's 4-frame block: 6,240 -> 182
    ((3, 5, 9), (1, 1, 2)),
    ((2, 4, 4), (1, 1, 1)),
    ((5, 17, 13), (2, 4, 3)),
])
@pytest.mark.parametrize("kind", ["pool", "conv"])
def test_token_counts_and_shapes(grid, want, kind):
    F, h, w = grid
    k = torch.randn(2, F * h * w, 3, 12)
    v = torch.randn(2, F * h * w, 3, 10)
    comp = C.PoolCompressor() if kind == "pool" else C.ConvCompressor(12, 10, hidden=8)
    assert comp.out_grid(grid) == want
    n = want[0] * want[1] * want[2]
    assert comp.mid_tokens(grid) == n
    km, vm = C.compress_block(k, v, grid=grid, compressor=comp, frame_offset=3.0)
    assert km.shape == (2, n, 3, 12) and vm.shape == (2, n, 3, 10)
    assert km.dtype == k.dtype and torch.isfinite(km).all() and torch.isfinite(vm).all()
    if grid == (4, 30, 52):
        assert n == 182


def test_values_are_cell_means():
    grid = (5, 9, 10)
    k = torch.randn(1, 450, 2, 8, dtype=torch.float64)
    v = torch.randn(1, 450, 2, 6, dtype=torch.float64)
    km, vm = C.compress_block(k, v, grid=grid)
    torch.testing.assert_close(vm, _cells_mean(v, grid, (2, 4, 4)))
    km0, _ = C.compress_block(k, v, grid=grid, rotated=False)
    torch.testing.assert_close(km0, _cells_mean(k, grid, (2, 4, 4)))


@pytest.mark.parametrize("with_t_theta", [False, True])
def test_rope_keys_rerotated_at_cell_centres(with_t_theta):
    """Keys built as RoPE(content) compress to RoPE(mean content) at the cell centre."""
    grid, a = (3, 6, 9), 7.5
    H, D = 2, 12
    x = torch.randn(1, 3 * 6 * 9, H, D, dtype=torch.float64)
    t_theta = torch.tensor([10000.0, 3000.0], dtype=torch.float64) if with_t_theta else None
    k = reference.rope3d(x, grid=grid, frame_offset=a, t_theta=t_theta)
    v = torch.randn(1, k.shape[1], H, 4, dtype=torch.float64)
    km, _ = C.compress_block(k, v, grid=grid, frame_offset=a, t_theta=t_theta)
    # Cells: frames {0,1}, rows {0..3}, columns {0..3} and {4..7}: centres t = a + 0.5, y = 1.5,
    # x = 1.5 and 5.5.
    t = torch.tensor([a + 0.5, a + 0.5])
    y = torch.tensor([1.5, 1.5])
    c = torch.tensor([1.5, 5.5])
    want = _rotate_at(_cells_mean(x, grid, (2, 4, 4)), t, y, c, t_theta=t_theta)
    torch.testing.assert_close(km, want, rtol=1e-10, atol=1e-10)
    # Pooling the rotated keys directly is far off: the test can tell the two apart.
    naive = _cells_mean(k, grid, (2, 4, 4))
    assert (naive - want).abs().max() > 0.1


def test_pooled_positions():
    t, y, x = C.pooled_positions((4, 30, 52), frame_offset=10.0)
    assert t.shape == (182,)
    assert t[0] == 10.5 and t[-1] == 12.5 and y[0] == 1.5 and y[-1] == 25.5
    assert x[0] == 1.5 and x[12] == 49.5 and x[13] == 1.5


def test_temporal_shift_commutes_with_compression():
    """The cache re-rotates mid keys with rope3d_shift_ like any other key: shifting the compressed
    block by delta equals compressing the block rotated delta frames later."""
    grid, a, delta = (4, 8, 8), 20.0, -13.0
    x = torch.randn(1, 256, 2, 16)
    v = torch.randn(1, 256, 2, 16)
    km, _ = C.compress_block(vidstream.rope3d(x, grid=grid, frame_offset=a), v, grid=grid,
                             frame_offset=a)
    shifted = vidstream.rope3d_shift_(km.clone(), [[0, km.shape[1]]], [delta])
    km2, _ = C.compress_block(vidstream.rope3d(x, grid=grid, frame_offset=a + delta), v, grid=grid,
                              frame_offset=a + delta)
    torch.testing.assert_close(shifted, km2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", devices())
def test_low_precision_and_devices(dtype, device):
    grid = (4, 8, 12)
    k = torch.randn(1, 384, 2, 16, dtype=torch.float64)
    v = torch.randn(1, 384, 2, 8, dtype=torch.float64)
    want_k, want_v = C.compress_block(k, v, grid=grid, frame_offset=2.0)
    for comp in (C.PoolCompressor(), C.ConvCompressor(16, 8).to(device)):
        km, vm = C.compress_block(k.to(device, dtype), v.to(device, dtype), grid=grid,
                                  frame_offset=2.0, compressor=comp)
        assert km.dtype == dtype and km.device.type == device
        tol = 4 * torch.finfo(dtype).eps * 4
        torch.testing.assert_close(km.double().cpu(), want_k, rtol=tol, atol=tol)
        torch.testing.assert_close(vm.double().cpu(), want_v, rtol=tol, atol=tol)


def test_conv_compressor_trains():
    torch.manual_seed(0)
    comp = C.ConvCompressor(8, hidden=16)
    grid = (2, 8, 8)
    k, v = torch.randn(1, 128, 2, 8), torch.randn(1, 128, 2, 8)
    target_k, target_v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    opt = torch.optim.Adam(comp.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        km, vm = comp(k, v, grid=grid, frame_offset=1.0)
        loss = (km - target_k).pow(2).mean() + (vm - target_v).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert comp.k_net.out.weight.grad is not None and comp.k_net.out.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]
    assert sum(p.numel() for p in comp.parameters()) > 0


BAD = [
    (dict(grid=(1, 30, 52)), "grid"),
    (dict(grid=(4, 3, 52)), "grid"),
    (dict(grid=(4, 30, 51)), "F\\*h\\*w"),
    (dict(v=torch.randn(1, 100, 2, 8)), "v must"),
    (dict(k=torch.randn(1, 6240, 2)), "k must be 4-D"),
    (dict(k=torch.randn(1, 6240, 2, 7)), "even"),
    (dict(t_theta=torch.ones(5)), "t_theta"),
    (dict(v=torch.randn(1, 6240, 2, 8, dtype=torch.float64)), "dtype"),
]


@pytest.mark.parametrize("bad,match", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_raise(bad, match):
    args = dict(k=torch.randn(1, 6240, 2, 8), v=torch.randn(1, 6240, 2, 8), grid=(4, 30, 52))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        C.compress_block(args.pop("k"), args.pop("v"), **args)


def test_bad_compressor_config():
    with pytest.raises(ValueError, match="factors"):
        C.PoolCompressor(factors=(2, 0, 4))
    with pytest.raises(ValueError, match="even"):
        C.ConvCompressor(8, factors=(2, 3, 4))
    with pytest.raises(ValueError, match="head dims"):
        C.ConvCompressor(8)(torch.randn(1, 128, 2, 16), torch.randn(1, 128, 2, 16), grid=(2, 8, 8))
