"""What ``vidstream demo`` shows and writes: the header line, the progress on stderr (a tqdm bar,
or a plain counter without tqdm), the summary table, DIR/demo.json and DIR/demo.png (ms per chunk
and cache memory against frame index; without matplotlib a one-line hint instead). ``plot`` also
draws bench/bench_stream.py's figure."""

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


def fps_upto(rows: list, horizon: int) -> Optional[float]:
    """Frames/s over the chunks that end at or before frame ``horizon``: runs of different lengths
    compared on the same work."""
    chunks = [r for r in rows if r.frame <= horizon]
    seconds = sum(r.ms for r in chunks) / 1e3
    return chunks[-1].frame / seconds if chunks and seconds > 0 else None


def rolling_summary(fused: StreamRun, rolling: Optional[StreamRun],
                    stopped: Optional[str]) -> dict:
    """demo.json's keys of the rolling-buffer baseline (Self-Forcing / LongLive's cache): None
    without one. ``speedup_vs_rolling`` compares the frames both runs made."""
    if rolling is None:
        return {"fps_rolling": None, "speedup_vs_rolling": None, "frames_done_rolling": None,
                "rolling_stopped": None, "cache_bytes_rolling": None, "ms_per_chunk_rolling": None,
                "chunk_end_frames_rolling": None}
    horizon = min(fused.frames, rolling.frames)
    a, b = fps_upto(fused.rows, horizon), fps_upto(rolling.rows, horizon)
    return {"fps_rolling": _fps(rolling), "speedup_vs_rolling": a / b if a and b else None,
            "frames_done_rolling": rolling.frames, "rolling_stopped": stopped,
            "cache_bytes_rolling": rolling.cache_bytes,
            "ms_per_chunk_rolling": [r.ms for r in rolling.rows],
            "chunk_end_frames_rolling": [r.frame for r in rolling.rows]}


def summary(args, label: str, fused: StreamRun, eager: Optional[StreamRun],
            interrupted: bool = False, rolling: Optional[StreamRun] = None,
            rolling_stopped: Optional[str] = None) -> dict:
    """The demo.json record (its keys are documented in the README). ``interrupted``: a Ctrl-C
    stopped the run; ``frames_done`` says how far the bounded run got (and
    ``frames_done_eager`` the eager one), and what was not measured is None. ``rolling``: the
    rolling-buffer run, ``rolling_stopped`` why it ended early (its RoPE table ran out)."""
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
        **rolling_summary(fused, rolling, rolling_stopped),
    }


def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _fmt_rate(v):
    return "-" if v is None else f"{v:.2f}"


def _fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def _fmt_stop(result: dict) -> str:
    if result.get("frames_done_rolling") is None:
        return "-"
    if result.get("rolling_stopped"):
        return f"frame {result['frames_done_rolling']:,} (RoPE table exhausted)"
    return "did not stop"


def print_table(result: dict) -> None:
    eager = result["fps_eager"] is not None
    on_gpu = torch.device(result["device"]).type == "cuda"
    rows = [("frames", str(result["frames"])),
            ("frames/s fused", f"{result['fps']:.2f}"),
            ("frames/s eager", f"{result['fps_eager']:.2f}" if eager else "-"),
            ("speed-up", f"{result['speedup']:.2f}x" if eager else "-"),
            ("frames/s rolling buffer", _fmt_rate(result.get("fps_rolling"))),
            ("speed-up vs rolling buffer", _fmt_ratio(result.get("speedup_vs_rolling"))),
            ("rolling buffer stopped at", _fmt_stop(result)),
            ("peak memory" + (" (GPU)" if on_gpu else " (process RSS)"),
             _fmt_bytes(result["peak_memory_bytes"])),
            ("cache bytes (fused, fixed)", _fmt_bytes(result["cache_bytes"])),
            ("cache bytes (eager, at end)", _fmt_bytes(result["cache_bytes_eager_final"]) if eager else "-"),
            ("cache bytes (rolling, fixed)", _fmt_bytes(result.get("cache_bytes_rolling"))),
            ("max |fused - eager|", f"{result['max_abs_diff']:.3g}" if eager else "-"),
            ("max RoPE position", str(result["max_rope_position"]))]
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k.ljust(w)}  {v}")


MATPLOTLIB_HINT = ("vidstream demo: matplotlib is not installed, so no demo.png (the JSON has the "
                   "same figures): pip install matplotlib")


# What each run of the comparison is, in the figures' legends, and its colour.
LEGENDS = {
    "fused": ("vidstream bounded cache (fixed pool, fused ops)", "tab:blue"),
    "no-mid": ("vidstream bounded cache, sink + window only", "tab:cyan"),
    "rolling": ("rolling buffer (Self-Forcing / LongLive: clone-and-shift, float64 RoPE)",
                "tab:orange"),
    "reference": ("growing cache (cat / clone / re-rotate, eager)", "tab:red"),
}


def write(out_dir: str, result: dict, fused: StreamRun, eager: Optional[StreamRun], *,
          rolling: Optional[StreamRun] = None, quiet: bool = False) -> list[str]:
    """DIR/demo.json, then DIR/demo.png (without matplotlib: a one-line hint on stderr instead).
    Returns the paths written; says so on stdout unless ``quiet``."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "demo.json"), os.path.join(out_dir, "demo.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    written = [json_path]
    if fused.rows:
        runs = {"fused": fused.rows, "rolling": rolling.rows if rolling else None,
                "reference": eager.rows if eager else None}
        stop = rolling.frames if rolling is not None and result.get("rolling_stopped") else None
        try:
            plot(png_path, {k: v for k, v in runs.items() if v},
                 f"vidstream demo: {result['preset']}, {result['frames']} latent frames, "
                 f"{result['device_name']}", stop_frame=stop)
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


def plot(path: str, runs: dict, title: str, stop_frame: Optional[int] = None) -> None:
    """ms per chunk and KV cache MiB against the latent frame, one line per run: ``runs`` maps a
    ``LEGENDS`` key to its ``ChunkRecord`` rows. ``stop_frame``: where the rolling buffer stopped
    (its RoPE table ran out), marked on both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    for key, rows in runs.items():
        name, color = LEGENDS[key]
        # Equal sizes would hide one line under another: the baseline's is dashed, on top.
        style, z = ("--", 3) if key == "rolling" else ("-", 2)
        f = [r.frame for r in rows]
        ms = [r.ms for r in rows]
        ax_t.plot(f, ms, color=color, lw=0.6, alpha=0.25)
        ax_t.plot(f, _rolling_median(ms, 15), color=color, lw=1.6, ls=style, zorder=z,
                  label=name + " (rolling median of 15 chunks)")
        ax_m.plot(f, [r.cache_bytes / 2**20 for r in rows], color=color, lw=1.6, ls=style,
                  zorder=z)
    sizes = [r.cache_bytes for rows in runs.values() for r in rows]
    # A growing cache dwarfs the fixed ones on a linear axis: a log axis keeps them apart.
    log_memory = bool(sizes) and min(sizes) > 0 and max(sizes) > 10 * min(sizes)
    for ax in (ax_t, ax_m):
        if stop_frame is not None:
            ax.axvline(stop_frame, color="black", ls=":", lw=1.2,
                       label=f"rolling buffer stops at frame {stop_frame:,}: RoPE table exhausted"
                       if ax is ax_t else None)
        ax.set_xlabel("latent frame")
        ax.grid(alpha=0.3)
    ax_t.set_ylim(bottom=0)
    if log_memory:
        ax_m.set_yscale("log")
    else:
        ax_m.set_ylim(bottom=0)
    ax_t.set_ylabel("ms per chunk")
    ax_t.set_title("time per chunk")
    ax_m.set_ylabel("KV cache (MiB" + (", log scale)" if log_memory else ")"))
    ax_m.set_title("KV cache memory")
    fig.legend(*ax_t.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
