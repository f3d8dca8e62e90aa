"""What ``vidstream demo`` shows and writes: the header line, the progress on stderr (a tqdm bar,
or a plain counter without tqdm), the summary table, DIR/demo.json and DIR/demo.png (ms per chunk
and cache memory against frame index; without matplotlib a one-line hint instead)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from typing import Callable, Iterator, Optional

import torch

from .streaming.runner import ChunkRecord, StreamRun, peak_rss_bytes

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


OnChunk = Callable[[ChunkRecord, float], None]


@contextlib.contextmanager
def progress(label: str, frames: int, seen: Optional[list] = None) -> Iterator[OnChunk]:
    """Yields an ``on_chunk`` callback for ``run_stream`` that shows the progress on stderr (a
    tqdm bar, or a plain counter without tqdm) and appends each ``ChunkRecord`` to ``seen``
    (what a Ctrl-C leaves)."""
    seen = [] if seen is None else seen
    # Redirected to a log (CI), a display redrawn ten times a second would flood it.
    interval = 0.1 if sys.stderr.isatty() else 10.0
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None:
        show = _Counter(label, frames, interval)
        close = show.close
    else:
        # One rate, tqdm's own (frame/s); the postfix adds the cache size.
        bar = tqdm(total=frames, desc=label, unit="frame", dynamic_ncols=True, file=sys.stderr,
                   mininterval=interval)

        def show(record, elapsed):
            bar.update(record.frame - bar.n)
            bar.set_postfix_str(f"cache {record.cache_bytes / 2**20:.2f} MiB",
                                refresh=False)  # the bar redraws at its own interval

        close = bar.close

    def on_chunk(record: ChunkRecord, elapsed: float):
        seen.append(record)
        show(record, elapsed)

    try:
        yield on_chunk
    finally:
        close()


class _Counter:
    """The progress without tqdm: ``label: done/total frames, rate, cache`` on stderr, redrawn in
    place on a terminal, else a line every ``interval`` seconds, and a last line at the end."""

    def __init__(self, label: str, frames: int, interval: float):
        self.label, self.frames, self.interval = label, frames, interval
        self.tty = sys.stderr.isatty()
        self.last_shown = None
        self.line = ""
        self.shown_line = ""

    def __call__(self, record: ChunkRecord, elapsed: float):
        rate = record.frame / elapsed if elapsed > 0 else 0.0
        self.line = (f"{self.label}: {record.frame}/{self.frames} frames, {rate:.1f} frames/s, "
                     f"cache {record.cache_bytes / 2**20:.2f} MiB")
        now = time.monotonic()
        if self.last_shown is None or now - self.last_shown >= self.interval:
            self._show()
            self.last_shown = now

    def _show(self):
        sys.stderr.write(f"\r{self.line}" if self.tty else f"{self.line}\n")
        sys.stderr.flush()
        self.shown_line = self.line

    def close(self):
        if self.line and self.line != self.shown_line:
            self._show()
        if self.tty and self.line:
            sys.stderr.write("\n")
            sys.stderr.flush()


def partial_run(records: list, device) -> StreamRun:
    """The ``StreamRun`` of the chunks ``records`` a Ctrl-C left (no chunks, no RoPE position)."""
    device = torch.device(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    frames = records[-1].frame if records else 0
    seconds = sum(r.ms for r in records) / 1e3
    return StreamRun(frames=frames, seconds=seconds, rows=list(records),
                     cache_bytes=records[-1].cache_bytes if records else 0, max_position=None,
                     peak_memory_bytes=peak)


def device_name(device: str | torch.device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s))"


def _fps(run: Optional[StreamRun]) -> Optional[float]:
    return run.fps if run is not None and run.seconds > 0 else None


def summary(args, label: str, fused: StreamRun, eager: Optional[StreamRun],
            interrupted: bool = False) -> dict:
    """The demo.json record (its keys are documented in the README). ``interrupted``: a Ctrl-C
    stopped the run; ``frames_done`` says how far the bounded run got (and
    ``frames_done_eager`` the eager one), and what was not measured is None."""
    diffs = [float((a - b).abs().max()) for a, b in zip(fused.chunks, eager.chunks)] if (
        eager is not None) else []
    fps, fps_eager = _fps(fused), _fps(eager)
    return {
        "frames": args.frames,
        "interrupted": interrupted,
        "frames_done": fused.frames,
        "frames_done_eager": eager.frames if eager else None,
        "fps": fps,
        "fps_eager": fps_eager,
        "speedup": fps / fps_eager if fps and fps_eager else None,
        "peak_memory_bytes": fused.peak_memory_bytes,
        "cache_bytes": fused.cache_bytes,
        "cache_bytes_eager_final": eager.cache_bytes if eager else None,
        "max_abs_diff": max(diffs) if diffs else None,
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


def print_table(result: dict) -> None:
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


MATPLOTLIB_HINT = ("vidstream demo: matplotlib is not installed, so no demo.png (the JSON has the "
                   "same figures): pip install matplotlib")


def write(out_dir: str, result: dict, fused: StreamRun, eager: Optional[StreamRun], *,
          quiet: bool = False) -> list[str]:
    """DIR/demo.json, then DIR/demo.png (without matplotlib: a one-line hint on stderr instead).
    Returns the paths written; says so on stdout unless ``quiet``."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "demo.json"), os.path.join(out_dir, "demo.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    written = [json_path]
    if fused.rows:
        try:
            plot(png_path, fused, eager, f"vidstream demo: {result['preset']}, {result['frames']} "
                                         f"latent frames, {result['device_name']}")
            written.append(png_path)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] != "matplotlib":
                raise
            print(MATPLOTLIB_HINT, file=sys.stderr)
    if not quiet:
        print(f"\nwrote {' and '.join(written)}")
    return written


def _rolling_median(xs, n):
    """Median of the last n values at each point: the trend under one-off stalls of a shared machine."""
    out = []
    for i in range(len(xs)):
        w = sorted(xs[max(0, i - n + 1):i + 1])
        out.append(w[len(w) // 2])
    return out


def plot(path: str, fused: StreamRun, eager: Optional[StreamRun], title: str) -> None:
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
