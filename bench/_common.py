"""Shared benchmark harness: timing, a printed table, and a JSON record with the device,
versions, date and command, so results committed under bench/results/ say where they came from."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, *, device="cpu", warmup: int = 3, reps: int = 20, min_time_s: float = 0.2) -> float:
    """Median milliseconds of ``fn()``; CUDA events on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        t_end = time.perf_counter() + min_time_s
        while len(times) < reps or (time.perf_counter() < t_end and len(times) < 10 * reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment(device) -> dict:
    dev = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def print_table(rows: list[dict], columns: list[str], title: str = ""):
    if title:
        print(title)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def write_json(path: str | None, name: str, device, rows: list[dict], **extra):
    """Writes {"benchmark", "environment", "rows", ...} to ``path`` (a file or a folder)."""
    if not path:
        return
    if os.path.isdir(path) or path.endswith("/"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "environment": environment(device), "rows": rows, **extra},
                  f, indent=2)
    print(f"wrote {path}")
