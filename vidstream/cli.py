"""``vidstream demo``: stream a video with the fused cache, optionally the eager reference too,
and report speed, memory and the difference between them (table, DIR/demo.json, DIR/demo.png)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import torch


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _run(model, text, args, backend, label, keep_chunks):
    """Streams ``args.frames`` frames; per chunk: end frame, ms, cache bytes."""
    from .pipeline import StreamingGenerator

    gen = StreamingGenerator(model, chunk_frames=args.chunk_frames, sink_frames=args.sink_frames,
                             recent_frames=args.recent_frames, mid_blocks=args.mid_blocks,
                             top_k=args.top_k, backend=backend, seed=args.seed,
                             timesteps=tuple(args.timesteps))
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter without tqdm
        tqdm = None
    # Redirected to a log (CI), a bar redrawn ten times a second would flood it.
    bar = None if tqdm is None else tqdm(total=args.frames, desc=label, unit="frame", dynamic_ncols=True,
                                         file=sys.stdout,
                                         mininterval=0.1 if sys.stdout.isatty() else 10.0)
    rows, chunks, done = [], [], 0
    t_start = time.perf_counter()
    stream = gen.stream(text, args.frames)
    while True:
        t0 = time.perf_counter()
        try:
            x = next(stream)
        except StopIteration:
            break
        _sync(dev)
        ms = (time.perf_counter() - t0) * 1e3
        done += x.shape[2]
        rows.append(dict(frame=done, ms=ms, cache_bytes=gen.cache.nbytes))
        if keep_chunks:
            chunks.append(x.cpu())
        if bar is not None:
            elapsed = time.perf_counter() - t_start
            bar.update(x.shape[2])
            bar.set_postfix_str(f"{done / elapsed:.1f} frames/s, cache {gen.cache.nbytes / 2**20:.2f} MiB",
                                refresh=False)  # the bar redraws at its own interval
    if bar is not None:
        bar.close()
    total = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss_bytes()
    return dict(rows=rows, chunks=chunks, seconds=total, fps=args.frames / total, peak=peak,
                cache_bytes=gen.cache.nbytes, max_position=gen.cache.max_position)


def _rolling_median(xs, n):
    """Median of the last n values at each point: the trend under one-off stalls of a shared machine."""
    out = []
    for i in range(len(xs)):
        w = sorted(xs[max(0, i - n + 1):i + 1])
        out.append(w[len(w) // 2])
    return out


def _plot(path, fused, eager, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for res, name, color in ((fused, "vidstream (fixed pool, fused ops)", "tab:blue"),
                             (eager, "naive cache (cat / clone / re-rotate, eager)", "tab:red")):
        if res is None:
            continue
        f = [r["frame"] for r in res["rows"]]
        ms = [r["ms"] for r in res["rows"]]
        ax_t.plot(f, ms, color=color, lw=0.6, alpha=0.3)
        ax_t.plot(f, _rolling_median(ms, 15), color=color, lw=1.6, label=name + " (rolling median)")
        ax_m.plot(f, [r["cache_bytes"] / 2**20 for r in res["rows"]], color=color, lw=1.5, label=name)
    ax_t.set_xlabel("latent frame")
    ax_t.set_ylabel("ms per chunk")
    ax_t.set_title("time per chunk")
    ax_t.set_ylim(bottom=0)
    ax_m.set_xlabel("latent frame")
    ax_m.set_ylabel("KV cache (MiB)")
    ax_m.set_title("KV cache memory")
    ax_m.set_ylim(bottom=0)
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def demo(args) -> dict:
    import vidstream
    from vidstream.model import PRESETS, StreamingDiT

    torch.manual_seed(args.seed)
    if args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {sorted(PRESETS)}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = StreamingDiT(args.preset, seed=args.seed, dtype=dtype, device=args.device).eval()
    cfg = model.config
    gtext = torch.Generator().manual_seed(args.seed + 1)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gtext).to(args.device, dtype)
    probe = torch.zeros(1, 1, 1, 2, device=args.device, dtype=dtype)
    print(f"vidstream demo: preset {args.preset} ({cfg.num_layers} layers, dim {cfg.dim}, "
          f"{cfg.frame_shape[0] * cfg.frame_shape[1]} tokens/frame), {args.frames} latent frames, "
          f"device {args.device}, {args.dtype}; kernels: "
          + ", ".join(f"{op}={vidstream.backend_for(op, probe)}" for op in
                      ("rope3d_store_", "rope3d_shift_", "cached_attention", "select_blocks")))
    # One short untimed run so that first-call costs (allocation, kernel loading) do not count.
    warm = argparse.Namespace(**{**vars(args), "frames": min(args.frames, 2 * args.chunk_frames)})
    _run(model, text, warm, args.backend, "warm-up", False)
    fused = _run(model, text, args, args.backend, args.backend, args.compare)
    eager = None
    max_diff = None
    if args.compare:
        eager = _run(model, text, args, "reference", "eager reference", True)
        max_diff = max(float((a - b).abs().max()) for a, b in zip(fused["chunks"], eager["chunks"]))
    result = {
        "frames": args.frames,
        "fps": fused["fps"],
        "fps_eager": eager["fps"] if eager else None,
        "speedup": fused["fps"] / eager["fps"] if eager else None,
        "peak_memory_bytes": fused["peak"],
        "cache_bytes": fused["cache_bytes"],
        "cache_bytes_eager_final": eager["cache_bytes"] if eager else None,
        "max_abs_diff": max_diff,
        "max_rope_position": fused["max_position"],
        "device": str(args.device),
        "device_name": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else (
            f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s))"),
        "preset": args.preset,
        "backend": args.backend,
        "dtype": args.dtype,
        "chunk_frames": args.chunk_frames,
        "cache": {"sink_frames": args.sink_frames, "recent_frames": args.recent_frames,
                  "mid_blocks": args.mid_blocks, "top_k": args.top_k},
        "ms_per_chunk": [r["ms"] for r in fused["rows"]],
        "ms_per_chunk_eager": [r["ms"] for r in eager["rows"]] if eager else None,
        "chunk_end_frames": [r["frame"] for r in fused["rows"]],
        "cache_bytes_per_chunk_eager": [r["cache_bytes"] for r in eager["rows"]] if eager else None,
    }
    rows = [("frames", str(args.frames)),
            ("frames/s fused", f"{fused['fps']:.2f}"),
            ("frames/s eager", f"{eager['fps']:.2f}" if eager else "-"),
            ("speed-up", f"{result['speedup']:.2f}x" if eager else "-"),
            ("peak memory" + (" (GPU)" if torch.device(args.device).type == "cuda" else " (process RSS)"),
             _fmt_bytes(fused["peak"])),
            ("cache bytes (fused, fixed)", _fmt_bytes(fused["cache_bytes"])),
            ("cache bytes (eager, at end)", _fmt_bytes(eager["cache_bytes"]) if eager else "-"),
            ("max |fused - eager|", f"{max_diff:.3g}" if eager else "-"),
            ("max RoPE position", str(fused["max_position"]))]
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k.ljust(w)}  {v}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    _plot(os.path.join(args.out, "demo.png"), fused, eager,
          f"vidstream demo: {args.preset}, {args.frames} latent frames, {result['device_name']}")
    print(f"\nwrote {os.path.join(args.out, 'demo.json')} and {os.path.join(args.out, 'demo.png')}")
    return result


def _parser():
    p = argparse.ArgumentParser(prog="vidstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="stream a video and compare the fused cache with the eager reference")
    d.add_argument("--preset", default="tiny", help="tiny | wan-1.3b")
    d.add_argument("--frames", type=int, default=2000, help="latent frames to generate")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    d.add_argument("--backend", default="fused", choices=["fused", "reference"])
    d.add_argument("--compare", action="store_true", help="also run the eager reference and diff")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0,
                   help="CPU threads; 0: one for the tiny preset (its ops are too small to split), "
                        "else torch's default")
    d.add_argument("--chunk-frames", type=int, default=3)
    d.add_argument("--sink-frames", type=int, default=3)
    d.add_argument("--recent-frames", type=int, default=6)
    d.add_argument("--mid-blocks", type=int, default=8)
    d.add_argument("--top-k", type=int, default=4)
    d.add_argument("--timesteps", type=int, nargs="+", default=[1000, 750, 500, 250])
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.dtype is None:
            args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
        if args.frames < 1:
            raise SystemExit("--frames must be >= 1")
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        elif args.preset == "tiny" and torch.device(args.device).type == "cpu":
            torch.set_num_threads(1)
        demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
