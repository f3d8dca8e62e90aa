"""Benchmark of forward + backward (issue #14) of chunk_attention (docs/spec.md §1) and
cached_attention (docs/spec.md §2) against their peers, measured in the same run: eager PyTorch
(the reference, with a mask, differentiated by autograd), scaled_dot_product_attention with the
equivalent dense boolean mask, and FlexAttention (compiled, create_block_mask with the same mask).

Each timing is one forward and one backward: ``torch.autograd.grad(out, (q, k, v), dout)`` with
q, k, v requiring grad (for cached_attention, the pools). Shapes are those of
bench/bench_attention.py (CPU: 64 tokens a frame, 4 heads of 64; GPU: Wan-1.3B).

    python bench/bench_backward.py [--device cpu] [--threads 1] [--quick] [--json bench/results/]
    python bench/bench_backward.py --device cuda --headline
    python bench/bench_backward.py --tiny          # the harness in seconds; numbers mean nothing
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_size_options, print_table, size_name, time_ms, write_json  # noqa: E402
from bench_attention import (  # noqa: E402
    DTYPES,
    _cached_layout,
    _cpu_cases,
    _flex,
    _range_mask,
    _tiny_cases,
    _wan_cases,
)

import vidstream  # noqa: E402
from vidstream import backend as _backend  # noqa: E402
from vidstream import reference  # noqa: E402


def _fwd_bwd(fn, leaves, dout):
    """A closure: one forward of ``fn(*leaves)`` and the backward of ``<out, dout>``."""

    def run():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, dout)

    return run


def _measure(name, fn, device, reps):
    try:
        fn()  # first call: compiles (flex), and fails here rather than inside the timer
        return time_ms(fn, device=device, warmup=1, reps=reps)
    except Exception as e:  # noqa: BLE001 -- a peer that cannot run is recorded, not fatal
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        print(f"  {name}: skipped ({why})")
        _skipped[name] = why
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return None


_skipped: dict[str, str] = {}


def _ours(op: str, backends, fn, leaves, dout, device, reps) -> dict:
    t = {}
    for b in backends:
        why = _backend.op(op).no_backward(b)
        if why is not None:
            print(f"  vidstream[{b}]: skipped (no backward here: {why})")
            _skipped[f"vidstream[{b}] {op}"] = f"no backward here: {why}"
            continue

        inner = _fwd_bwd(fn, leaves, dout)

        def run(b=b, inner=inner):
            with vidstream.use_backend(b):
                return inner()

        try:
            run()
        except (ValueError, RuntimeError) as e:
            print(f"  vidstream[{b}]: skipped ({str(e).splitlines()[0][:160]})")
            _skipped[f"vidstream[{b}] {op}"] = str(e).splitlines()[0][:300]
            continue
        t[f"vidstream[{b}]"] = _measure(f"vidstream[{b}]", run, device, reps)
    return t


def _rows(form, shape, timings):
    ours = [ms for name, ms in timings.items() if name.startswith("vidstream") and ms is not None]
    base = min(ours) if ours else None
    return [{"form": form, "shape": shape, "impl": name, "fwd_bwd_ms": ms,
             "vidstream_speedup": None if ms is None or base is None else ms / base}
            for name, ms in timings.items()]


def _leaves(*shapes, device, dtype):
    return [torch.randn(*s, device=device, dtype=dtype).requires_grad_() for s in shapes]


def bench_cached(cfg, device, dtype, reps, backends, peers):
    rows = []
    for ctx, label in cfg["cached"]:
        rows += _bench_cached_context(cfg, ctx, label, device, dtype, reps, backends, peers)
    return rows


def _bench_cached_context(cfg, ctx, label, device, dtype, reps, backends, peers):
    B, H, D, ft, cf = 1, cfg["H"], cfg["D"], cfg["ft"], cfg["cf"]
    lq = cf * ft
    pool, ranges = _cached_layout(ctx, lq, ft, cfg["sink"])
    q, k, v = _leaves((B, lq, H, D), (B, pool, H, D), (B, pool, H, D), device=device, dtype=dtype)
    dout = torch.randn(B, lq, H, D, device=device, dtype=dtype)
    prepared = vidstream.TokenRanges.trusted(ranges, device)
    keep = _range_mask(pool, ranges, device)
    t = _ours("cached_attention", backends,
              lambda q, k, v: vidstream.cached_attention(q, k, v, prepared), [q, k, v], dout,
              device, reps)
    if "eager" in peers:
        t["eager"] = _measure("eager", _fwd_bwd(
            lambda q, k, v: reference.cached_attention(q, k, v, prepared), [q, k, v], dout),
            device, reps)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dt = dout.transpose(1, 2).contiguous()
    if "sdpa" in peers:
        mask = keep[None, :].expand(lq, pool)
        t["sdpa_mask"] = _measure("sdpa", _fwd_bwd(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            [qt, kt, vt], dt), device, reps)
    flex = _flex(device) if "flex" in peers else None
    if flex is not None:
        flex_fn, cbm = flex
        bm = cbm(lambda b, h, qi, kj: keep[kj], None, None, lq, pool, device=device)
        t["flex"] = _measure("flex", _fwd_bwd(
            lambda q, k, v: flex_fn(q, k, v, block_mask=bm), [qt, kt, vt], dt), device, reps)
    return _rows("cached", f"Lq={lq} ctx={ctx} ({label})", t)


def bench_full(cfg, device, dtype, reps, backends, peers):
    B, H, D, ft, cf = 1, cfg["H"], cfg["D"], cfg["ft"], cfg["cf"]
    L = cfg["full_frames"] * ft
    sink, window = cfg["sink"], cfg["window"]
    kw = dict(frame_tokens=ft, chunk_frames=cf, sink_frames=sink, window_frames=window)
    q, k, v = _leaves((B, L, H, D), (B, L, H, D), (B, L, H, D), device=device, dtype=dtype)
    dout = torch.randn(B, L, H, D, device=device, dtype=dtype)
    t = _ours("chunk_attention", backends,
              lambda q, k, v: vidstream.chunk_attention(q, k, v, **kw), [q, k, v], dout, device,
              reps)
    if "eager" in peers:
        t["eager"] = _measure("eager", _fwd_bwd(
            lambda q, k, v: reference.chunk_attention(q, k, v, **kw), [q, k, v], dout), device, reps)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dt = dout.transpose(1, 2).contiguous()
    if "sdpa" in peers:
        mask = reference.chunk_mask(L, ft, cf, sink, window, device)
        t["sdpa_mask"] = _measure("sdpa", _fwd_bwd(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), [qt, kt, vt],
            dt), device, reps)
    flex = _flex(device) if "flex" in peers else None
    if flex is not None:
        flex_fn, cbm = flex

        def mask_mod(b, h, i, j):
            fi, fj = i // ft, j // ft
            end = (fi // cf + 1) * cf
            return (fj // cf <= fi // cf) & ((fj < sink) | (fj >= end - window))

        bm = cbm(mask_mod, None, None, L, L, device=device)
        t["flex"] = _measure("flex", _fwd_bwd(
            lambda q, k, v: flex_fn(q, k, v, block_mask=bm), [qt, kt, vt], dt), device, reps)
    shape = f"L={L} ({cfg['full_frames']} frames) sink={sink} window={window} chunk={cf}"
    return _rows("full", shape, t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--backend", default=None,
                    help="comma list of vidstream backends (default: cpu,torch on a CPU, "
                         "triton,torch on a GPU)")
    ap.add_argument("--peers", default=None,
                    help="comma list among eager, sdpa, flex (default: all three; sdpa,flex with "
                         "--headline, sdpa with --tiny)")
    ap.add_argument("--quick", action="store_true", help="one cached context, fewer repetitions")
    add_size_options(ap)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
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
    backends = (args.backend or ("cpu,torch" if device.type == "cpu" else "triton,torch")).split(",")
    peers = set((args.peers or ("sdpa" if args.tiny else "sdpa,flex" if args.headline
                                else "eager,sdpa,flex")).split(","))
    reps = 2 if args.tiny else 10 if args.headline else 5 if args.quick else 20
    torch.manual_seed(0)
    rows = bench_cached(cfg, device, dtype, reps, backends, peers)
    rows += bench_full(cfg, device, dtype, reps, backends, peers)
    print_table(rows, ["form", "shape", "impl", "fwd_bwd_ms", "vidstream_speedup"],
                title=f"forward + backward on {device} ({dtype}; vidstream_speedup = ms / best "
                      f"vidstream ms of the same shape)")
    write_json(args.json, f"backward_{device.type}", device, rows, dtype=str(dtype),
               backends=backends, size=size_name(args), skipped=_skipped)


if __name__ == "__main__":
    main()
