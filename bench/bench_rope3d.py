"""RoPE benchmark at Wan-1.3B shapes: 12 heads x 128, 1560 tokens per latent frame.

- ``rope3d_shift_`` on a 27,872-token cache (PackForcing's active context) against the eager way
  (the temporal band through complex float32 and back, range by range); bandwidth counts the bytes
  the op must read and write (the temporal band only) and, on a GPU, is set against a
  device-to-device copy measured in the same run.
- ``rope3d`` of one 3-frame chunk (4,680 tokens) against Wan2.1's eager way (complex float64).

    python bench/bench_rope3d.py [--device cuda] [--dtype bfloat16] [--json bench/results/]

``--headline`` (bench/gpu_check.sh) is the same two shapes with fewer repetitions; ``--tiny`` a
2-head, 16-token-frame version that only checks the harness.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import vidstream  # noqa: E402
from vidstream.ops.rope_math import band_omega, rope_bands  # noqa: E402

HEADS, HEAD_DIM, FRAME_TOKENS, GRID_HW = 12, 128, 1560, (30, 52)
CACHE_TOKENS = 27_872
TINY = dict(heads=2, frame_tokens=16, grid_hw=(4, 4), cache_tokens=12 * 16)  # --tiny


def eager_shift_(pool, ranges, delta, theta=10000.0):
    """What streaming repos do today: rotate the temporal band through complex float32."""
    c_t = rope_bands(pool.shape[-1])[0]
    om = band_omega(c_t, theta, pool.device)
    for (s, e), d in zip(ranges, delta):
        band = pool[:, s:e, :, : 2 * c_t]
        z = torch.view_as_complex(band.float().reshape(*band.shape[:-1], c_t, 2).contiguous())
        rot = torch.polar(torch.ones_like(om), d * om).to(torch.complex64)
        band.copy_(torch.view_as_real(z * rot).flatten(-2))
    return pool


def eager_rope3d(x, grid, frame_offset, theta=10000.0):
    """Wan2.1's rope_apply: the whole head through complex float64."""
    B, L, H, D = x.shape
    F, h, w = grid
    c_t, c_h, c_w = rope_bands(D)
    dev = x.device
    pos = lambda n: torch.arange(n, device=dev, dtype=torch.float64)[:, None]
    ang_t = (pos(F) + frame_offset) * band_omega(c_t, theta, dev)
    ang_h = pos(h) * band_omega(c_h, theta, dev)
    ang_w = pos(w) * band_omega(c_w, theta, dev)
    freqs = torch.cat([
        ang_t[:, None, None, :].expand(F, h, w, c_t),
        ang_h[None, :, None, :].expand(F, h, w, c_h),
        ang_w[None, None, :, :].expand(F, h, w, c_w)], dim=-1).reshape(L, 1, -1)
    z = torch.view_as_complex(x.to(torch.float64).reshape(B, L, H, -1, 2))
    return torch.view_as_real(z * torch.polar(torch.ones_like(freqs), freqs)).flatten(3).to(x.dtype)


def copy_bandwidth(device, dtype, numel) -> float:
    """GB/s of a device-to-device copy, bytes read plus written."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = _common.time_ms(lambda: dst.copy_(src), device=device)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def kernel_backends(device) -> list[str]:
    return [b for b in ("cpu", "triton", "cuda") if b in vidstream.backends(device)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--cache-tokens", type=int, default=None,
                    help=f"default {CACHE_TOKENS} ({TINY['cache_tokens']} with --tiny)")
    ap.add_argument("--json", default=None, help="a file, or a folder for rope.json")
    _common.add_size_options(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    heads, frame_tokens, grid_hw = (TINY["heads"], TINY["frame_tokens"], TINY["grid_hw"]) if args.tiny \
        else (HEADS, FRAME_TOKENS, GRID_HW)
    timing = _common.TINY_TIMING if args.tiny else dict(reps=10) if args.headline else {}
    # --headline also times the torch backend: the CUDA default until a kernel is validated.
    backends = kernel_backends(device) + (["torch"] if args.headline else [])

    P = args.cache_tokens or (TINY["cache_tokens"] if args.tiny else CACHE_TOKENS)
    pool0 = torch.randn(1, P, heads, HEAD_DIM, device=device).to(dtype)
    # Sink, mid, recent and the current chunk, each moved by its own number of frames.
    cuts = [0, 3 * frame_tokens, P // 2, P - 3 * frame_tokens, P]
    ranges = [[cuts[i], cuts[i + 1]] for i in range(4)]
    delta = [-3.0, -16.0, 5.0, 1.0]
    ranges_t = torch.tensor(ranges, dtype=torch.int32)
    c_t = rope_bands(HEAD_DIM)[0]
    band_bytes = 2 * P * heads * 2 * c_t * pool0.element_size()  # read + write

    rows = []
    pool = pool0.clone()
    eager_ms = _common.time_ms(lambda: eager_shift_(pool, ranges, delta), device=device, **timing)
    rows.append(dict(op="rope3d_shift_", impl="eager complex64", ms=eager_ms,
                     GBps=band_bytes / eager_ms / 1e6, speedup=1.0))
    for b in backends:
        pool = pool0.clone()
        with vidstream.use_backend(b):
            ms = _common.time_ms(lambda p=pool: vidstream.rope3d_shift_(p, ranges_t, delta), device=device,
                                 **timing)
        rows.append(dict(op="rope3d_shift_", impl=b, ms=ms, GBps=band_bytes / ms / 1e6,
                         speedup=eager_ms / ms))

    grid = (3, *grid_hw)
    x = torch.randn(1, 3 * frame_tokens, heads, HEAD_DIM, device=device).to(dtype)
    io_bytes = 2 * x.numel() * x.element_size()
    eager_ms = _common.time_ms(lambda: eager_rope3d(x, grid, 18), device=device, **timing)
    rows.append(dict(op="rope3d", impl="eager complex128 (Wan)", ms=eager_ms,
                     GBps=io_bytes / eager_ms / 1e6, speedup=1.0))
    for b in backends:
        with vidstream.use_backend(b):
            ms = _common.time_ms(lambda: vidstream.rope3d(x, grid=grid, frame_offset=18), device=device,
                                 **timing)
        rows.append(dict(op="rope3d", impl=b, ms=ms, GBps=io_bytes / ms / 1e6, speedup=eager_ms / ms))

    extra = {}
    if device.type == "cuda":
        copy = copy_bandwidth(device, dtype, 1 << 28)
        extra["copy_GBps"] = copy
        for r in rows:
            r["pct_of_copy"] = 100 * r["GBps"] / copy
    env = _common.environment(device)
    _common.print_table(
        rows, ["op", "impl", "ms", "GBps", "speedup"] + (["pct_of_copy"] if extra else []),
        title=f"RoPE at {'tiny' if args.tiny else 'Wan-1.3B'} shapes ({heads}x{HEAD_DIM}, {P}-token cache, "
              f"{dtype}) on {env['device']}")
    if extra:
        print(f"device-to-device copy: {extra['copy_GBps']:.0f} GB/s (read + write)")
    print("GBps counts the bytes the op must move: the temporal band for the shift, all of x for rope3d.")
    _common.write_json(args.json, "rope", device, rows, dtype=str(dtype), cache_tokens=P,
                       size=_common.size_name(args), **extra)
    return rows


if __name__ == "__main__":
    main()
