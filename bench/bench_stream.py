"""End-to-end streaming generation: ms per chunk and frames/s of

  fused       the bounded cache (StreamingKVCache: sink + mid top-k + ring), vidstream kernels
  reference   the naive cache (growing history, cat / clone / re-rotate) on the reference kernels
  no-mid      the bounded cache with sink + window only (memory-free baseline: what mid costs)

measured in the same run, with the per-chunk time near frame 50 and after frame 1,000 (flat for a
bounded cache, growing for the naive one), and the fused cache's bytes (also at PackForcing-like
partition sizes for 30 layers, computed without allocating).

  python bench/bench_stream.py                                  # wan-1.3b, bf16, on a GPU
  python bench/bench_stream.py --preset tiny --device cpu       # runs here in seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, write_json  # noqa: E402

import vidstream  # noqa: E402
from vidstream.streaming import PRESETS, CacheConfig, StreamingDiT, StreamingKVCache  # noqa: E402
from vidstream.streaming.compressors import AvgPoolCompressor, default_compressor  # noqa: E402
from vidstream.streaming.runner import add_partition_options, partition_options, run_stream  # noqa: E402

# PackForcing-like partitions at Wan-1.3B (3-frame chunks): a 3-frame sink, 64 mid blocks
# (3-frame blocks pooled 2x in time and 4x in space: 91 tokens), 16 active, 3 recent frames.
PACKFORCING = dict(chunk_frames=3, sink_frames=3, recent_frames=3, mid_blocks=64, top_k=16)


def _median_near(rows, lo, hi):
    ms = [r.ms for r in rows if lo <= r.frame < hi]
    return statistics.median(ms) if ms else None


def run_config(model, text, frames, *, cache, mid_blocks, top_k, args, kernels=None):
    options = {**partition_options(args), "mid_blocks": mid_blocks, "top_k": top_k}
    if args.compile and cache == "bounded":
        options["compile"] = True
    run = run_stream(model, text, frames, cache=cache, kernels=kernels, seed=0,
                     compressor=default_compressor() if args.space_pool is None
                     else AvgPoolCompressor(2, args.space_pool), **options)
    return dict(rows=run.rows, fps=run.fps, cache_bytes=run.cache_bytes,
                ms_50=_median_near(run.rows, 40, 70), ms_1000=_median_near(run.rows, 1000, 1040),
                ms_median=statistics.median(r.ms for r in run.rows))


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
    p.add_argument("--configs", default="fused,reference,no-mid")
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
    args = p.parse_args()
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
        "reference": dict(cache="naive", kernels="reference", mid_blocks=args.mid_blocks,
                          top_k=args.top_k),
        "no-mid": dict(cache="bounded", mid_blocks=0, top_k=None),
    }
    ref_frames = args.reference_frames or (args.frames if args.preset == "tiny" else 150)
    results = {}
    for name in args.configs.split(","):
        n = min(args.frames, ref_frames) if name == "reference" else args.frames
        results[name] = run_config(model, text, n, args=args, **configs[name])
        r = results[name]
        print(f"  {name}: {r['fps']:.2f} frames/s, median {r['ms_median']:.1f} ms/chunk")
    rows = []
    horizon = min(ref_frames, args.frames)

    def fps_upto(r):  # frames/s over the first `horizon` frames: the same work for every config
        chunks = [c for c in r["rows"] if c.frame <= horizon]
        return chunks[-1].frame / (sum(c.ms for c in chunks) / 1e3) if chunks else None

    fused = results.get("fused")
    for name, r in results.items():
        rows.append(dict(config=name, frames=r["rows"][-1].frame, frames_per_s=r["fps"],
                         fps_first_frames=fps_upto(r), ms_per_chunk=r["ms_median"],
                         ms_at_frame_50=r["ms_50"], ms_at_frame_1000=r["ms_1000"],
                         late_vs_early=(r["ms_1000"] / r["ms_50"]) if r["ms_1000"] and r["ms_50"] else None,
                         fused_speedup=(fps_upto(fused) / fps_upto(r)) if fused else None,
                         cache_MiB=r["cache_bytes"] / 2**20))
    print_table(rows, ["config", "frames", "frames_per_s", "fps_first_frames", "ms_per_chunk",
                       "ms_at_frame_50", "ms_at_frame_1000", "late_vs_early", "fused_speedup", "cache_MiB"],
                title=f"\nstreaming generation, {args.preset} {dtype_name} on {dev} "
                      f"(fps_first_frames and fused_speedup over the first {horizon} frames)")
    if fused and "no-mid" in results:
        cost = 1 - fused["fps"] / results["no-mid"]["fps"]
        print(f"mid memory costs {100 * cost:.1f}% of throughput against sink + window only")
    pf = packforcing_cache_bytes("wan-1.3b", torch.bfloat16)
    print(f"fused cache at PackForcing-like partitions {PACKFORCING}, wan-1.3b bf16, 30 layers: "
          f"{pf / 2**30:.2f} GiB")
    write_json(args.json, "bench_stream", dev, rows, preset=args.preset, dtype=dtype_name,
               frames=args.frames, compiled=args.compile, kernels=kernels, packforcing_cache_bytes=pf)


if __name__ == "__main__":
    main()
