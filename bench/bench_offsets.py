"""Positions as metadata (issue #12): what reading keys with per-range offsets costs, in one run.

1. Streaming, per chunk: the tiny preset's generator (the streaming demo's model) with the legacy
   re-rotating bounded cache (``StreamingKVCache(rerotate=True)``: moved keys re-rotated in place
   with ``rope3d_shift_`` on each chunk's first pass) against the metadata cache (every key
   stored once, ranges read with ``kv_deltas``); the same config, mid blocks on,
   ``mid_evict="lowest"``. Median ms per chunk once the cache is full.
2. The op: ``cached_attention`` over a bounded cache's ranges (sink, mid blocks, a wrapped ring,
   the current chunk) without offsets, with offsets (``kv_deltas``), and shift-then-attend
   (``rope3d_shift_`` of the moved ranges in place, then attention without offsets: what the
   legacy cache does on a chunk's first pass), on each backend that can run it here; a backend
   without a kernel for offsets yet is skipped with the reason printed.

  python bench/bench_offsets.py                 # CPU: a Wan-like head layout at a small grid
  python bench/bench_offsets.py --tiny          # seconds: checks the harness only
  python bench/bench_offsets.py --json bench/results/bench_offsets_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import TINY_TIMING, add_size_options, print_table, size_name, sync, time_ms, write_json  # noqa: E402

import vidstream  # noqa: E402
from vidstream.streaming import StreamingDiT, StreamingGenerator, StreamingKVCache  # noqa: E402
from vidstream.streaming.model import PRESETS  # noqa: E402

BACKENDS = ("torch", "cpu", "triton", "cuda")


def stream_ms_per_chunk(rerotate: bool, frames: int, device, warm_frames: int) -> dict:
    """Median and mean ms per chunk of the tiny generator after ``warm_frames`` frames."""
    model = StreamingDiT(replace(PRESETS["tiny"]), seed=0, device=device).eval()
    cfg = model.config
    kw = dict(chunk_frames=3, sink_frames=3, recent_frames=6, mid_blocks=8, top_k=4,
              mid_evict="lowest", seed=0)
    gen = StreamingGenerator(model, **kw)
    gen.cache = StreamingKVCache(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_heads,
                                 head_dim=cfg.head_dim, frame_shape=cfg.frame_shape,
                                 config=gen.config, dtype=model.dtype, device=model.device,
                                 rerotate=rerotate)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    ms, done = [], 0
    t0 = time.perf_counter()
    for chunk in gen.stream(text.to(model.device), frames):
        sync(device)
        t1 = time.perf_counter()
        done += chunk.shape[2]
        if done > warm_frames:
            ms.append((t1 - t0) * 1e3)
        t0 = t1
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "chunks": len(ms)}


def op_case(size: str, device, dtype):
    """q, pools, ranges and offsets of a bounded cache's chunk: sink 3 frames, 4 of 8 mid blocks,
    a wrapped ring of 6 recent frames and the 3-frame chunk, frame_tokens tokens a frame."""
    H, D, ft = {"tiny": (2, 32, 16), "headline": (12, 128, 128), "full": (12, 128, 128)}[size]
    C, S, R, M, mt = 3, 3, 6, 8, ft // 4
    g = torch.Generator().manual_seed(0)
    ring_off = S * ft + M * mt
    P = ring_off + (R + C) * ft
    kp = torch.randn(1, P, H, D, generator=g).to(device, dtype)
    vp = torch.randn(1, P, H, D, generator=g).to(device, dtype)
    q = torch.randn(1, C * ft, H, D, generator=g).to(device, dtype)
    ranges = [[0, S * ft]]
    ranges += [[S * ft + m * mt, S * ft + (m + 1) * mt] for m in (1, 3, 4, 6)]
    # ring slots (frames): the window starts at slot 5 and wraps: 5..8, 0..1 recent, 2..4 current
    ranges += [[ring_off + 5 * ft, ring_off + 9 * ft], [ring_off, ring_off + 2 * ft],
               [ring_off + 2 * ft, ring_off + 5 * ft]]
    deltas = torch.tensor([0.0, 3.0, 0.0, -3.0, -6.0, -3.0, -3.0, 0.0], dtype=torch.float64)
    moved = [r for r, d in zip(ranges, deltas.tolist()) if d]
    moved_d = deltas[deltas != 0]
    return q, kp, vp, vidstream.TokenRanges.trusted(ranges, device), deltas, \
        vidstream.TokenRanges.trusted(moved, device), moved_d, dict(H=H, D=D, frame_tokens=ft,
                                                                    keys=sum(b - a for a, b in ranges))


def time_backend(name, case, timing, device) -> dict | str:
    q, kp, vp, ranges, deltas, moved, moved_d, _ = case
    try:
        with vidstream.use_backend(name):
            plain = time_ms(lambda: vidstream.cached_attention(q, kp, vp, ranges), device=device,
                            **timing)
            offsets = time_ms(lambda: vidstream.cached_attention(q, kp, vp, ranges, kv_deltas=deltas),
                              device=device, **timing)

            def shift_then_attend():
                vidstream.rope3d_shift_(kp, moved, moved_d)
                return vidstream.cached_attention(q, kp, vp, ranges)

            shifted = time_ms(shift_then_attend, device=device, **timing)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        return str(e).splitlines()[0]
    return {"backend": name, "no_offsets_ms": plain, "kv_deltas_ms": offsets,
            "shift_then_attend_ms": shifted, "offsets_overhead": offsets / plain}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_options(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--frames", type=int, default=None,
                   help="frames per streaming run (default 150; --tiny 24)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    size = size_name(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    timing = TINY_TIMING if args.tiny else (dict(warmup=2, reps=5, min_time_s=0.2)
                                           if args.headline else {})
    frames = args.frames or (24 if args.tiny else 150)

    stream_rows = []
    for rerotate in (True, False):
        r = stream_ms_per_chunk(rerotate, frames, device, warm_frames=min(frames // 2, 60))
        stream_rows.append({"cache": "legacy (rerotate=True)" if rerotate else "metadata (offsets)",
                            **r})
    stream_rows[1]["vs_legacy"] = stream_rows[0]["median_ms"] / stream_rows[1]["median_ms"]
    print_table(stream_rows, ["cache", "median_ms", "mean_ms", "chunks", "vs_legacy"],
                f"streaming, tiny preset, {frames} frames, ms per chunk once the cache is full "
                f"(chunk 3, sink 3, recent 6, 8 mid blocks, top-4, lowest eviction):")

    case = op_case(size, device, dtype)
    shape = case[-1]
    op_rows, skipped = [], {}
    for name in BACKENDS:
        if name == "triton" and device.type != "cuda":
            skipped[name] = "the Triton interpreter on a CPU times nothing useful"
            continue
        if name == "cuda" and device.type != "cuda":
            skipped[name] = "no CUDA device"
            continue
        r = time_backend(name, case, timing, device)
        if isinstance(r, str):
            skipped[name] = r
        else:
            op_rows.append(r)
    print()
    print_table(op_rows, ["backend", "no_offsets_ms", "kv_deltas_ms", "shift_then_attend_ms",
                          "offsets_overhead"],
                f"cached_attention, {args.dtype}, {shape['keys']} keys in 8 ranges (5 moved), "
                f"{3 * shape['frame_tokens']} queries, {shape['H']} heads x {shape['D']}:")
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")
    write_json(args.json, "bench_offsets", device, op_rows, stream=stream_rows, skipped=skipped,
               size=size, dtype=args.dtype, frames=frames, op_shape=shape)


if __name__ == "__main__":
    main()
