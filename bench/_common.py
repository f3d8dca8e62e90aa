"""Shared benchmark harness: timing, a printed table, and a JSON record with the device,
versions, date and command, so results committed under bench/results/ say where they came from."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import torch

from vidstream._git import head_commit


def add_size_options(parser):
    """``--headline`` and ``--tiny``: the two sizes bench/gpu_check.sh asks a benchmark for."""
    parser.add_argument("--headline", action="store_true",
                        help="only the headline shapes, few repetitions (bench/gpu_check.sh on a "
                             "lent GPU)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes, one or two repetitions: runs in seconds on a CPU to check "
                             "the harness (bench/gpu_check.sh --dry-run); the numbers mean nothing")


def size_name(args) -> str:
    """'tiny', 'headline' or 'full': recorded in the JSON of a run."""
    return "tiny" if getattr(args, "tiny", False) else (
        "headline" if getattr(args, "headline", False) else "full")


# time_ms keywords of a --tiny run: the harness runs, nothing is measured.
TINY_TIMING = dict(warmup=1, reps=2, min_time_s=0.0)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, *, device="cpu", warmup: int = 3, reps: int = 20, min_time_s: float = 0.2) -> float:
    """Median milliseconds of ``fn()``. On a GPU ``triton.testing.do_bench`` (CUDA events, the L2
    cache flushed between runs); on a CPU ``torch.utils.benchmark`` (blocks of runs at least
    ``min_time_s`` long, at torch's thread count)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        # do_bench takes milliseconds of warm-up and of measurement, not counts: a first call
        # sizes them so that about ``warmup`` and ``reps`` runs happen.
        fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        once_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        return triton.testing.do_bench(fn, warmup=max(1, int(warmup * once_ms)),
                                       rep=max(1, int(reps * once_ms)), return_mode="median")
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time_s)
    return m.median * 1e3


def _vidstream_version() -> str:
    import vidstream

    return vidstream.__version__


def environment(device) -> dict:
    dev = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "vidstream": _vidstream_version(),
        "commit": head_commit(mark_dirty=True),
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
