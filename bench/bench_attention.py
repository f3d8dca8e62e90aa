"""Benchmark of chunk_attention (docs/spec.md §1) and cached_attention (docs/spec.md §2) against their peers,
measured in the same run: eager PyTorch (the reference, with a mask), scaled_dot_product_attention
with the equivalent boolean mask, FlexAttention (compiled, create_block_mask with the same mask)
and flash-attn when importable.

GPU: Wan-1.3B shapes (B=1, 12 heads, head dim 128, 1560 tokens per frame, 3-frame chunks = 4,680
queries): cached contexts of 18,720 / 27,872 / 32,760 tokens laid out as a sink range plus a
wrapped ring-buffer window, and the full form at 21 frames with a 3-frame sink and a 12-frame
window. CPU: a small Wan-like shape (64 tokens per frame, 12 frames, 4 heads, head dim 64).

Useful TFLOP/s count only the (query, key) pairs the mask allows: 4 * D * pairs per head.

    python bench/bench_attention.py --device cpu [--threads 1] [--quick] [--json bench/results/]
    python bench/bench_attention.py --device cuda --json bench/results/
    python bench/bench_attention.py --device cuda --headline   # bench/gpu_check.sh: one cached
        # context (27,872) and the full form, vidstream triton/cuda/torch against SDPA and Flex
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_size_options, print_table, size_name, time_ms, write_json  # noqa: E402

import vidstream  # noqa: E402
from vidstream import reference  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _wan_cases(quick: bool):
    ft, H, D, cf = 1560, 12, 128, 3
    cached = [(18720, "LongLive 3-frame sink + window"), (27872, "PackForcing active context"),
              (32760, "Self-Forcing 21 frames")]
    if quick:
        cached = cached[1:2]
    return dict(ft=ft, H=H, D=D, cf=cf, cached=cached, full_frames=21, sink=3, window=12)


def _cpu_cases(quick: bool):
    return dict(ft=64, H=4, D=64, cf=3, cached=[(7 * 64, "sink 1 + window 6 frames")] + (
        [] if quick else [(12 * 64, "12 frames")]), full_frames=12, sink=1, window=6)


def _tiny_cases():
    """--tiny: a few hundred tokens, to run the harness in seconds."""
    return dict(ft=16, H=2, D=64, cf=3, cached=[(7 * 16, "sink 1 + window 6 frames")],
                full_frames=6, sink=1, window=3)


def _cached_layout(ctx: int, lq: int, ft: int, sink_frames: int):
    """A pool and ranges that read `ctx` tokens: the sink, a ring window wrapped around the end
    of the pool (two ranges), and a one-frame hole that is never read."""
    sink = min(sink_frames * ft, ctx - lq)
    rest = ctx - sink
    pool = ctx + ft
    tail = rest // 2
    ranges = [[pool - tail, pool], [0, sink], [sink + ft, sink + ft + rest - tail]]
    return pool, [r for r in ranges if r[0] < r[1]]


def _range_mask(pool: int, ranges, device) -> torch.Tensor:
    keep = torch.zeros(pool, dtype=torch.bool, device=device)
    for s, e in ranges:
        keep[s:e] = True
    return keep


def _flex(device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def _flash_attn():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func
        return flash_attn_func
    except ImportError:
        return None


def _measure(name, fn, device, reps):
    try:
        return time_ms(fn, device=device, warmup=2, reps=reps)
    except (RuntimeError, torch.OutOfMemoryError, NotImplementedError) as e:  # a peer that can't run
        print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return None


def _ours(backends, fn, device, reps) -> dict:
    """vidstream on each requested backend, as impl 'vidstream[<backend>]'."""
    t = {}
    for b in backends:
        def run(b=b):
            with vidstream.use_backend(b):
                return fn()
        try:
            run()
        except (ValueError, RuntimeError) as e:  # backend unavailable here
            print(f"  vidstream[{b}]: skipped ({str(e).splitlines()[0][:100]})")
            continue
        t[f"vidstream[{b}]"] = _measure(f"vidstream[{b}]", run, device, reps)
    return t


def _rows(form, shape, pairs, D, H, B, timings):
    flops = 4.0 * D * pairs * H * B
    ours = [ms for name, ms in timings.items() if name.startswith("vidstream") and ms is not None]
    base = min(ours) if ours else None
    rows = []
    for name, ms in timings.items():
        rows.append({
            "form": form, "shape": shape, "impl": name, "ms": ms,
            "useful_TFLOPs": None if ms is None else flops / (ms * 1e-3) / 1e12,
            "vidstream_speedup": None if ms is None or base is None else ms / base,
        })
    return rows


def bench_cached(cfg, device, dtype, reps, backend, peers):
    rows = []
    for ctx, label in cfg["cached"]:
        rows += _bench_cached_context(cfg, ctx, label, device, dtype, reps, backend, peers)
    return rows


def _bench_cached_context(cfg, ctx, label, device, dtype, reps, backend, peers):
    B, H, D, ft, cf = 1, cfg["H"], cfg["D"], cfg["ft"], cfg["cf"]
    lq = cf * ft
    pool, ranges = _cached_layout(ctx, lq, ft, cfg["sink"])
    q = torch.randn(B, lq, H, D, device=device, dtype=dtype)
    k = torch.randn(B, pool, H, D, device=device, dtype=dtype)
    v = torch.randn(B, pool, H, D, device=device, dtype=dtype)
    kr = torch.tensor(ranges, dtype=torch.int32)
    keep = _range_mask(pool, ranges, device)
    t = _ours(backend, lambda: vidstream.cached_attention(q, k, v, kr), device, reps)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # SDPA's own layout
    mask = keep[None, :].expand(lq, pool)
    if "eager" in peers:
        prepared = vidstream.TokenRanges.trusted(ranges, device)
        t["eager"] = _measure("eager", lambda: reference.cached_attention(q, k, v, prepared), device,
                              reps)
    if "sdpa" in peers:
        t["sdpa_mask"] = _measure("sdpa", lambda: F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask), device, reps)
    flex = _flex(device) if "flex" in peers else None
    if flex is not None:
        flex_fn, cbm = flex
        bm = cbm(lambda b, h, qi, kj: keep[kj], None, None, lq, pool, device=device)
        t["flex"] = _measure("flex", lambda: flex_fn(qt, kt, vt, block_mask=bm), device, reps)
    fa = _flash_attn() if device.type == "cuda" else None
    if fa is not None:
        idx = [slice(s, e) for s, e in ranges]

        def gathered():  # what generators do today: copy the ranges into one K/V, then attend
            return fa(q, torch.cat([k[:, i] for i in idx], 1), torch.cat([v[:, i] for i in idx], 1))

        t["flash_attn+gather"] = _measure("flash_attn", gathered, device, reps)
    return _rows("cached", f"Lq={lq} ctx={ctx} ({label})", lq * ctx, D, H, B, t)


def bench_full(cfg, device, dtype, reps, backend, peers):
    B, H, D, ft, cf = 1, cfg["H"], cfg["D"], cfg["ft"], cfg["cf"]
    L = cfg["full_frames"] * ft
    sink, window = cfg["sink"], cfg["window"]
    q, k, v = (torch.randn(B, L, H, D, device=device, dtype=dtype) for _ in range(3))
    kw = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=sink, window_frames=window)
    mask = reference.chunk_mask(L, ft, cf, sink, window, device)
    pairs = int(mask.sum())
    t = _ours(backend, lambda: vidstream.chunk_attention(q, k, v, **kw), device, reps)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    if "eager" in peers:
        t["eager"] = _measure("eager", lambda: reference.chunk_attention(q, k, v, **kw), device, reps)
    if "sdpa" in peers:
        t["sdpa_mask"] = _measure("sdpa", lambda: F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask), device, reps)
    flex = _flex(device) if "flex" in peers else None
    if flex is not None:
        flex_fn, cbm = flex

        def mask_mod(b, h, i, j):
            fi, fj = i // ft, j // ft
            end = (fi // cf + 1) * cf
            return (fj // cf <= fi // cf) & ((fj < sink) | (fj >= end - window))

        bm = cbm(mask_mod, None, None, L, L, device=device)
        t["flex"] = _measure("flex", lambda: flex_fn(qt, kt, vt, block_mask=bm), device, reps)
    shape = f"L={L} ({cfg['full_frames']} frames) sink={sink} window={window} chunk={cf}"
    return _rows("full", shape, pairs, D, H, B, t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--backend", default=None,
                    help="comma list of vidstream backends (default: cpu on a CPU, triton,cuda on a GPU)")
    ap.add_argument("--peers", default=None, help="comma list among eager, sdpa, flex (default: all "
                    "three; sdpa,flex with --headline, sdpa with --tiny)")
    ap.add_argument("--quick", action="store_true", help="one cached context, fewer repetitions")
    add_size_options(ap)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for every implementation (default: torch's); 1 gives stable "
                         "numbers on a shared machine")
    ap.add_argument("--json", default=None, help="file or folder for the JSON record")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    short = args.quick or args.headline
    if args.tiny:
        cfg = _tiny_cases()
    else:
        cfg = _wan_cases(short) if device.type == "cuda" else _cpu_cases(short)
    default_backends = "cpu" if device.type == "cpu" else (
        "triton,cuda,torch" if args.headline else "triton,cuda")
    backend = (args.backend or default_backends).split(",")
    peers = set((args.peers or ("sdpa" if args.tiny else "sdpa,flex" if args.headline
                                else "eager,sdpa,flex")).split(","))
    reps = 2 if args.tiny else 10 if args.headline else 5 if args.quick else 20
    torch.manual_seed(0)
    rows = bench_cached(cfg, device, dtype, reps, backend, peers)
    rows += bench_full(cfg, device, dtype, reps, backend, peers)
    cols = ["form", "shape", "impl", "ms", "useful_TFLOPs", "vidstream_speedup"]
    print_table(rows, cols, title=f"attention on {device} ({dtype}; vidstream_speedup = "
                f"ms / best vidstream ms of the same shape)")
    write_json(args.json, f"attention_{device.type}", device, rows, dtype=str(dtype), backends=backend,
               size=size_name(args))


if __name__ == "__main__":
    main()
