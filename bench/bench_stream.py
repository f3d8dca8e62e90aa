"""End-to-end streaming generation: ms per chunk, frames/s and cache bytes of

  fused       the bounded cache (StreamingKVCache: sink + mid top-k + ring), vidstream kernels
  rolling     the baseline: Self-Forcing / LongLive's own cache (RollingBufferCache: a fixed
              buffer of sink + recent + chunk frames, clone-and-shift eviction, RoPE re-applied
              every pass in float64 at absolute positions, .item() index bookkeeping); it stops
              where Wan's 1,024-frame RoPE table ends, as theirs does
  reference   a second baseline: the naive cache (growing history, cat / clone / re-rotate) on
              the reference kernels
  no-mid      the bounded cache with sink + window only: the same attended frames as rolling,
              and what mid memory costs

measured in the same run (each with a progress display on stderr), with the per-chunk time near
frame 50 and after frame 1,000 (flat for a bounded cache, growing for the naive one), the speed-up
of fused and of no-mid over every config on the frames all of them made, and the cache bytes (also
the fused cache's at PackForcing-like partition sizes for 30 layers, computed without allocating).
--plot draws ms per chunk and cache MiB against the frame, marking where the rolling buffer stops.

  python bench/bench_stream.py                                  # wan-1.3b, bf16, on a GPU
  python bench/bench_stream.py --preset tiny --device cpu       # runs here in well under a minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, write_json  # noqa: E402

import vidstream  # noqa: E402
from vidstream import demo_report  # noqa: E402
from vidstream.streaming import PRESETS, CacheConfig, StreamingDiT, StreamingKVCache  # noqa: E402
from vidstream.streaming.compressors import AvgPoolCompressor, default_compressor  # noqa: E402
from vidstream.streaming.rolling_cache import RopeTableExhausted  # noqa: E402
from vidstream.streaming.runner import add_partition_options, partition_options, run_stream  # noqa: E402

# PackForcing-like partitions at Wan-1.3B (3-frame chunks): a 3-frame sink, 64 mid blocks
# (3-frame blocks pooled 2x in time and 4x in space: 91 tokens), 16 active, 3 recent frames.
PACKFORCING = dict(chunk_frames=3, sink_frames=3, recent_frames=3, mid_blocks=64, top_k=16)
CONFIG_NAMES = ("fused", "rolling", "reference", "no-mid")


def _median_near(rows, lo, hi):
    ms = [r.ms for r in rows if lo <= r.frame < hi]
    return statistics.median(ms) if ms else None


def run_config(model, text, frames, *, name, cache, mid_blocks, top_k, args, kernels=None):
    """One config's timed stream under a progress display. The rolling buffer stops where its
    RoPE table ends: its rows up to there are kept and ``stopped`` says why."""
    options = {**partition_options(args), "mid_blocks": mid_blocks, "top_k": top_k}
    if args.compile and cache == "bounded":
        options["compile"] = True
    stopped = None
    seen = []
    # The process's CPU time between chunks as well as the wall time: on a CPU shared with other
    # work the wall time of runs made one after another tracks the load, the CPU time much less.
    # The first chunk has none (nothing marks its start).
    cpu_ms, cpu_last = [], []

    def timed(on_chunk):
        def on_chunk_timed(record, elapsed):
            now = time.process_time()
            cpu_ms.append((now - cpu_last[-1]) * 1e3 if cpu_last else None)
            cpu_last.append(now)
            on_chunk(record, elapsed)
        return on_chunk_timed

    with demo_report.progress(name, frames, seen) as on_chunk:
        try:
            run_stream(model, text, frames, cache=cache, kernels=kernels, seed=0,
                       on_chunk=timed(on_chunk), compressor=default_compressor()
                       if args.space_pool is None else AvgPoolCompressor(2, args.space_pool),
                       **options)
        except RopeTableExhausted as e:
            stopped = str(e)
    if not seen:
        raise RuntimeError(f"config {name} made no chunk: {stopped}")
    seconds = sum(r.ms for r in seen) / 1e3
    return dict(rows=seen, cpu_ms=cpu_ms, fps=seen[-1].frame / seconds,
                cache_bytes=seen[-1].cache_bytes, stopped=stopped, ms_50=_median_near(seen, 40, 70),
                ms_1000=_median_near(seen, 1000, 1040), ms_median=statistics.median(r.ms for r in seen),
                cpu_ms_median=statistics.median(c for c in cpu_ms[1:]) if len(cpu_ms) > 1 else None)


def cpu_fps_upto(r, horizon):
    """Frames/s of CPU time over the chunks after the first that end by ``horizon``."""
    pairs = [(row, c) for row, c in zip(r["rows"], r["cpu_ms"]) if c is not None and row.frame <= horizon]
    if not pairs:
        return None
    frames = pairs[-1][0].frame - r["rows"][0].frame
    seconds = sum(c for _, c in pairs) / 1e3
    return frames / seconds if seconds > 0 else None


def packforcing_cache_bytes(preset: str, dtype) -> int:
    c = PRESETS[preset]
    cache = StreamingKVCache(num_layers=c.num_layers, batch=1, kv_heads=c.num_heads, head_dim=c.head_dim,
                             frame_shape=c.frame_shape, config=CacheConfig(**PACKFORCING),
                             compressor=AvgPoolCompressor(2, 4), dtype=dtype, device="meta")
    return cache.nbytes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan-1.3b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--frames", type=int, default=1041, help="latent frames per run (>= 1,040 for the "
                   "frame-1,000 figure)")
    p.add_argument("--configs", default="fused,rolling,reference,no-mid",
                   help="comma-separated, among fused, rolling, reference, no-mid")
    p.add_argument("--reference-frames", type=int, default=None,
                   help="frames of the reference run (default: --frames for tiny, 150 for wan-1.3b, "
                        "whose naive full history takes ~0.29 GB a frame in bf16); speed-ups compare "
                        "every config over these first frames")
    add_partition_options(p, recent_frames=3, mid_blocks=64, top_k=16)
    p.add_argument("--space-pool", type=int, default=None, help="use AvgPoolCompressor(2, N) for mid "
                   "blocks (default: compressors.default_compressor())")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="StreamingGenerator(compile=True) for the bounded-cache configs: a graph per "
                        "cache layout, so the first chunks include compile time (read ms_per_chunk, "
                        "a median)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of ms per chunk and cache MiB against the "
                   "frame, one line per config (needs matplotlib)")
    args = p.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIG_NAMES]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose among {', '.join(CONFIG_NAMES)}")
    dev = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.preset == "tiny" and dev.type == "cpu":
        torch.set_num_threads(1)
    model = StreamingDiT(args.preset, seed=0, dtype=dtype, device=dev).eval()
    cfg = model.config
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    text = text.to(dev, dtype)
    probe = torch.zeros(1, 1, 1, 2, device=dev, dtype=dtype)
    kernels = {op: vidstream.backend_for(op, probe)
               for op in ("rope3d_store_", "rope3d_shift_", "cached_attention", "select_blocks")}
    print(f"bench_stream: {args.preset}, {dtype_name}, {dev}, {args.frames} frames; kernels {kernels}")
    configs = {
        "fused": dict(cache="bounded", mid_blocks=args.mid_blocks, top_k=args.top_k),
        "rolling": dict(cache="rolling", mid_blocks=0, top_k=None),
        "reference": dict(cache="naive", kernels="reference", mid_blocks=args.mid_blocks,
                          top_k=args.top_k),
        "no-mid": dict(cache="bounded", mid_blocks=0, top_k=None),
    }
    ref_frames = args.reference_frames or (args.frames if args.preset == "tiny" else 150)
    results = {}
    for name in names:
        n = min(args.frames, ref_frames) if name == "reference" else args.frames
        results[name] = run_config(model, text, n, name=name, args=args, **configs[name])
        r = results[name]
        print(f"  {name}: {r['fps']:.2f} frames/s, median {r['ms_median']:.1f} ms/chunk, "
              f"{r['rows'][-1].frame} frames" + (f"; stopped: {r['stopped']}" if r["stopped"] else ""))
    # Every ratio compares the same work: the frames every config made (the rolling buffer's
    # 1,023 where it runs out of RoPE positions, the reference's first frames on a GPU).
    horizon = min(r["rows"][-1].frame for r in results.values())

    def fps_upto(r):
        return demo_report.fps_upto(r["rows"], horizon)

    def speedup(of, r, fps=fps_upto):
        return fps(of) / fps(r) if of and fps(of) and fps(r) else None

    def cpu_fps(r):
        return cpu_fps_upto(r, horizon)

    on_cpu = dev.type == "cpu"

    fused, no_mid = results.get("fused"), results.get("no-mid")
    rows = []
    for name, r in results.items():
        rows.append(dict(config=name, frames=r["rows"][-1].frame, frames_per_s=r["fps"],
                         fps_first_frames=fps_upto(r), ms_per_chunk=r["ms_median"],
                         ms_at_frame_50=r["ms_50"], ms_at_frame_1000=r["ms_1000"],
                         late_vs_early=(r["ms_1000"] / r["ms_50"]) if r["ms_1000"] and r["ms_50"] else None,
                         fused_speedup=speedup(fused, r), no_mid_speedup=speedup(no_mid, r),
                         cpu_ms_per_chunk=r["cpu_ms_median"] if on_cpu else None,
                         fused_speedup_cpu=speedup(fused, r, cpu_fps) if on_cpu else None,
                         no_mid_speedup_cpu=speedup(no_mid, r, cpu_fps) if on_cpu else None,
                         cache_MiB=r["cache_bytes"] / 2**20, stopped=r["stopped"]))
    print_table(rows, ["config", "frames", "frames_per_s", "fps_first_frames", "ms_per_chunk",
                       "ms_at_frame_50", "ms_at_frame_1000", "late_vs_early", "fused_speedup",
                       "no_mid_speedup", "cache_MiB"],
                title=f"\nstreaming generation, {args.preset} {dtype_name} on {dev} "
                      f"(fps_first_frames and the speed-ups over the first {horizon} frames; "
                      "a speed-up is that config's time over fused's or no-mid's)")
    if on_cpu:
        print_table(rows, ["config", "cpu_ms_per_chunk", "fused_speedup_cpu", "no_mid_speedup_cpu"],
                    title="\nthe same in CPU time of the process (what other load on the machine "
                          "leaves out)")
    if fused and no_mid:
        cost = 1 - fused["fps"] / no_mid["fps"]
        print(f"mid memory costs {100 * cost:.1f}% of throughput against sink + window only")
    rolling = results.get("rolling")
    stop = rolling["rows"][-1].frame if rolling and rolling["stopped"] else None
    if args.plot:
        plot(args.plot, results, stop, f"bench_stream: {args.preset} {dtype_name}, "
             f"{demo_report.device_name(dev)}, sink {args.sink_frames} + recent {args.recent_frames} "
             f"+ chunk {args.chunk_frames} frames (fused: + {args.top_k} of {args.mid_blocks} mid blocks)")
    pf = packforcing_cache_bytes("wan-1.3b", torch.bfloat16)
    print(f"fused cache at PackForcing-like partitions {PACKFORCING}, wan-1.3b bf16, 30 layers: "
          f"{pf / 2**30:.2f} GiB")
    write_json(args.json, "bench_stream", dev, rows, preset=args.preset, dtype=dtype_name,
               frames=args.frames, compiled=args.compile, kernels=kernels, packforcing_cache_bytes=pf,
               partitions=partition_options(args), ratio_horizon_frames=horizon,
               rolling_stop_frame=stop, plot=args.plot, per_chunk=per_chunk(results))


def per_chunk(results) -> dict:
    """Each config's chunks (end frame, ms, cache bytes): the data of the --plot figure."""
    return {name: {"frame": [c.frame for c in r["rows"]], "ms": [round(c.ms, 3) for c in r["rows"]],
                   "cpu_ms": [None if c is None else round(c, 3) for c in r["cpu_ms"]],
                   "cache_bytes": [c.cache_bytes for c in r["rows"]]} for name, r in results.items()}


def plot(path, results, stop, title):
    try:
        demo_report.plot(path, {name: r["rows"] for name, r in results.items()}, title,
                         stop_frame=stop)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        print(f"bench_stream: matplotlib is not installed, so no {path}", file=sys.stderr)
        return
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
