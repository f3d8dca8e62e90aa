"""Top-k mid-block selection (docs/spec.md §5) at PackForcing's shape: fused kernels against the eager
way (materialised scores), with and without cached per-block key sums, and as a fraction of one
layer's attention over the 27,872-token context.

Shape: 12 heads x 128, 4,680 current + 6,240 recent queries sampled with stride 8 on the first 6
heads, 64 mid blocks of 182 tokens, k = 16.

Attention time: on a GPU, ``vidstream.cached_attention`` with whatever backend it resolves to (the
row says which). On a CPU its reference materialises a 6 GB score matrix, so the stand-in is
torch SDPA of the 4,680 current queries over the gathered 27,872-token context.

    python bench/bench_select_blocks.py --device cpu --json bench/results/
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, time_ms, write_json  # noqa: E402

import vidstream  # noqa: E402
from vidstream import testing  # noqa: E402
from vidstream.ops import select_blocks as selection  # noqa: E402
from vidstream.streaming import compressors as C  # noqa: E402

HEADS, HEAD_DIM = 12, 128
CURRENT, RECENT = 4680, 6240
STRIDE, M, BLOCK, TOPK = 8, 64, 182, 16
CONTEXT = 27872


def eager_mean(q, k_pool, ranges, heads, scale):
    """The eager way: QK^T of every sampled query and every mid key, summed per block."""
    ht = torch.tensor(heads, device=q.device)
    qs = q[:, ::STRIDE][:, :, ht]
    ks = k_pool[:, :, ht // (q.shape[2] // k_pool.shape[2])]
    s = torch.einsum("bihd,bjhd->bhij", qs, ks).float() * scale  # [B, Hs, S, P]
    per_key = s.sum(dim=(0, 1, 2))  # [P]
    seg = torch.repeat_interleave(torch.arange(ranges.shape[0], device=q.device),
                                  (ranges[:, 1] - ranges[:, 0]).to(q.device).long())
    tok = torch.cat([torch.arange(int(a), int(b)) for a, b in ranges.tolist()]).to(q.device)
    scores = torch.zeros(ranges.shape[0], device=q.device).index_add_(0, seg, per_key[tok])
    scores /= s.shape[0] * s.shape[1] * s.shape[2]
    return torch.sort(torch.topk(scores, TOPK).indices).values


def eager_max(q, k_pool, ranges, heads, scale):
    ht = torch.tensor(heads, device=q.device)
    qbar = q[:, ::STRIDE][:, :, ht].float().mean(1)
    ks = k_pool[:, :, ht // (q.shape[2] // k_pool.shape[2])].float()
    s = torch.einsum("bhd,bjhd->bhj", qbar, ks) * scale  # [B, Hs, P]
    seg = torch.repeat_interleave(torch.arange(ranges.shape[0], device=q.device),
                                  (ranges[:, 1] - ranges[:, 0]).to(q.device).long())
    tok = torch.cat([torch.arange(int(a), int(b)) for a, b in ranges.tolist()]).to(q.device)
    mx = torch.full((s.shape[0], s.shape[1], ranges.shape[0]), float("-inf"), device=q.device)
    mx = mx.scatter_reduce(2, seg.expand(s.shape[0], s.shape[1], -1), s[..., tok], "amax")
    return torch.sort(torch.topk(mx.mean(dim=(0, 1)), TOPK).indices).values


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: bfloat16 "
                    "on a GPU, float32 on a CPU)")
    ap.add_argument("--json", default=None, help="write results to this file or folder")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    Lq = CURRENT + RECENT
    q = torch.randn(1, Lq, HEADS, HEAD_DIM, device=dev, dtype=dtype)
    k_pool = torch.randn(1, M * BLOCK, HEADS, HEAD_DIM, device=dev, dtype=dtype)
    ranges = torch.tensor([[m * BLOCK, (m + 1) * BLOCK] for m in range(M)], dtype=torch.int32)
    heads = list(range(HEADS // 2))
    scale = HEAD_DIM**-0.5
    sums = selection.block_key_sums(k_pool, ranges)

    fused_backends = ["cpu"] if dev.type == "cpu" else [
        b for b in ("triton", "cuda") if testing.why_not(b, "select_blocks", dev, dtype) is None]

    rows = []
    t_eager = time_ms(lambda: eager_mean(q, k_pool, ranges, heads, scale), device=dev, reps=5)
    rows.append(dict(name="eager mean (QK^T materialised)", backend="torch", ms=t_eager))
    t_eager_max = time_ms(lambda: eager_max(q, k_pool, ranges, heads, scale), device=dev, reps=5)
    rows.append(dict(name="eager max (qbar K^T)", backend="torch", ms=t_eager_max))
    ref = eager_mean(q, k_pool, ranges, heads, scale)
    for b in fused_backends:
        with vidstream.use_backend(b):
            got = vidstream.select_blocks(q, k_pool, ranges, TOPK, query_stride=STRIDE)
            agree = torch.equal(got.cpu(), ref.cpu())
            for name, kw, base in (
                ("fused mean", {}, t_eager),
                ("fused mean, cached key sums", {"block_key_sums": sums}, t_eager),
                ("fused max", {"score": "max"}, t_eager_max),
            ):
                t = time_ms(lambda kw=kw: vidstream.select_blocks(
                    q, k_pool, ranges, TOPK, query_stride=STRIDE, **kw), device=dev)
                rows.append(dict(name=name, backend=b, ms=t, speedup_vs_eager=base / t,
                                 same_as_eager=agree if name == "fused mean" else None))

    kb = torch.randn(1, 6240, HEADS, HEAD_DIM, device=dev, dtype=dtype)
    rows.append(dict(name="compress one block (pool, RoPE-aware)", backend="torch",
                     ms=time_ms(lambda: C.compress_block(kb, kb, grid=(4, 30, 52), frame_offset=9.0),
                                device=dev, reps=5)))

    attn = None
    if not args.skip_attention:
        qa = torch.randn(1, CURRENT, HEADS, HEAD_DIM, device=dev, dtype=dtype)
        kp = torch.randn(1, CONTEXT, HEADS, HEAD_DIM, device=dev, dtype=dtype)
        if dev.type == "cuda":
            rng = torch.tensor([[0, CONTEXT]], dtype=torch.int32)
            which = "vidstream.cached_attention/" + vidstream.backend_for("cached_attention", qa)
            fn = lambda: vidstream.cached_attention(qa, kp, kp, rng)
        else:
            which = "torch SDPA stand-in (cpu)"
            qt, kt = qa.transpose(1, 2), kp.transpose(1, 2)
            fn = lambda: F.scaled_dot_product_attention(qt, kt, kt)
        attn = time_ms(fn, device=dev, warmup=1, reps=3, min_time_s=0.0)
        rows.append(dict(name=f"attention, one layer, {CONTEXT} ctx", backend=which, ms=attn))
        for r in rows:
            if r["name"].startswith(("fused", "eager")):
                r["frac_of_attention"] = r["ms"] / attn

    cols = ["name", "backend", "ms", "speedup_vs_eager", "frac_of_attention", "same_as_eager"]
    print_table(rows, cols, title=f"select_blocks, {dev.type} {dtype}: Lq={Lq} stride {STRIDE}, "
                f"{len(heads)}/{HEADS} heads x {HEAD_DIM}, M={M} x {BLOCK}, k={TOPK}")
    write_json(args.json, f"bench_select_{dev.type}", dev, rows, dtype=str(dtype))


if __name__ == "__main__":
    main()
