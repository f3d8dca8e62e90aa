"""What ``vidstream demo`` shows and writes: the header line, a progress bar, the summary table,
DIR/demo.json and DIR/demo.png (ms per chunk and cache memory against frame index)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys

import torch

from .streaming.runner import StreamRun

PROBED_OPS = ("rope3d_store_", "rope3d_shift_", "cached_attention", "select_blocks")


def header(args, model) -> str:
    """One line: the model, the run and the kernel each streaming op resolves to here."""
    import vidstream

    cfg = model.config
    probe = torch.zeros(1, 1, 1, 2, device=args.device, dtype=model.dtype)
    kernels = ", ".join(f"{op}={vidstream.backend_for(op, probe)}" for op in PROBED_OPS)
    return (f"vidstream demo: preset {args.preset} ({cfg.num_layers} layers, dim {cfg.dim}, "
            f"{cfg.frame_shape[0] * cfg.frame_shape[1]} tokens/frame), {args.frames} latent frames, "
            f"device {args.device}, {args.dtype}; kernels: {kernels}")


@contextlib.contextmanager
def progress(label: str, frames: int):
    """Yields an ``on_chunk`` callback for ``run_stream`` that drives a tqdm bar (nothing
    without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    # Redirected to a log (CI), a bar redrawn ten times a second would flood it.
    bar = tqdm(total=frames, desc=label, unit="frame", dynamic_ncols=True, file=sys.stdout,
               mininterval=0.1 if sys.stdout.isatty() else 10.0)
    done = [0]

    def on_chunk(record, elapsed):
        bar.update(record.frame - done[0])
        done[0] = record.frame
        bar.set_postfix_str(f"{record.frame / elapsed:.1f} frames/s, cache "
                            f"{record.cache_bytes / 2**20:.2f} MiB",
                            refresh=False)  # the bar redraws at its own interval

    try:
        yield on_chunk
    finally:
        bar.close()


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s))"


def summary(args, label: str, fused: StreamRun, eager: StreamRun | None) -> dict:
    """The demo.json record (its keys are documented in the README)."""
    max_diff = None
    if eager is not None:
        max_diff = max(float((a - b).abs().max()) for a, b in zip(fused.chunks, eager.chunks))
    return {
        "frames": args.frames,
        "fps": fused.fps,
        "fps_eager": eager.fps if eager else None,
        "speedup": fused.fps / eager.fps if eager else None,
        "peak_memory_bytes": fused.peak_memory_bytes,
        "cache_bytes": fused.cache_bytes,
        "cache_bytes_eager_final": eager.cache_bytes if eager else None,
        "max_abs_diff": max_diff,
        "max_rope_position": fused.max_position,
        "device": str(args.device),
        "device_name": device_name(args.device),
        "preset": args.preset,
        "backend": label,
        "dtype": args.dtype,
        "chunk_frames": args.chunk_frames,
        "cache": {"sink_frames": args.sink_frames, "recent_frames": args.recent_frames,
                  "mid_blocks": args.mid_blocks, "top_k": args.top_k},
        "ms_per_chunk": [r.ms for r in fused.rows],
        "ms_per_chunk_eager": [r.ms for r in eager.rows] if eager else None,
        "chunk_end_frames": [r.frame for r in fused.rows],
        "cache_bytes_per_chunk_eager": [r.cache_bytes for r in eager.rows] if eager else None,
    }


def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def print_table(result: dict):
    eager = result["fps_eager"] is not None
    on_gpu = torch.device(result["device"]).type == "cuda"
    rows = [("frames", str(result["frames"])),
            ("frames/s fused", f"{result['fps']:.2f}"),
            ("frames/s eager", f"{result['fps_eager']:.2f}" if eager else "-"),
            ("speed-up", f"{result['speedup']:.2f}x" if eager else "-"),
            ("peak memory" + (" (GPU)" if on_gpu else " (process RSS)"),
             _fmt_bytes(result["peak_memory_bytes"])),
            ("cache bytes (fused, fixed)", _fmt_bytes(result["cache_bytes"])),
            ("cache bytes (eager, at end)", _fmt_bytes(result["cache_bytes_eager_final"]) if eager else "-"),
            ("max |fused - eager|", f"{result['max_abs_diff']:.3g}" if eager else "-"),
            ("max RoPE position", str(result["max_rope_position"]))]
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k.ljust(w)}  {v}")


def write(out_dir: str, result: dict, fused: StreamRun, eager: StreamRun | None):
    """DIR/demo.json and DIR/demo.png."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "demo.json"), os.path.join(out_dir, "demo.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    plot(png_path, fused, eager, f"vidstream demo: {result['preset']}, {result['frames']} latent frames, "
                                 f"{result['device_name']}")
    print(f"\nwrote {json_path} and {png_path}")


def _rolling_median(xs, n):
    """Median of the last n values at each point: the trend under one-off stalls of a shared machine."""
    out = []
    for i in range(len(xs)):
        w = sorted(xs[max(0, i - n + 1):i + 1])
        out.append(w[len(w) // 2])
    return out


def plot(path: str, fused: StreamRun, eager: StreamRun | None, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for run, name, color in ((fused, "vidstream (fixed pool, fused ops)", "tab:blue"),
                             (eager, "naive cache (cat / clone / re-rotate, eager)", "tab:red")):
        if run is None:
            continue
        f = [r.frame for r in run.rows]
        ms = [r.ms for r in run.rows]
        ax_t.plot(f, ms, color=color, lw=0.6, alpha=0.3)
        ax_t.plot(f, _rolling_median(ms, 15), color=color, lw=1.6, label=name + " (rolling median)")
        ax_m.plot(f, [r.cache_bytes / 2**20 for r in run.rows], color=color, lw=1.5, label=name)
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
